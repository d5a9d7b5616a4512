"""What the DALI and PyTorch pipelines share: which samples a rank reads (EpochOrder), the position in the
epoch that a checkpoint holds, how a sample's record and target are found, and how each batch's
augmentation parameters are drawn (from (seed, epoch, sample index) alone: every pipeline, worker count and
resumed run gives a sample the same draws)."""

from __future__ import annotations

from collections import Counter

import torch

from fer_train.data.base import CLASSES, FERDataset, Record
from fer_train.data.order import EpochOrder
from fer_train.recipe.augmentation import AugmentConfig, AugmentParams, sample_keys, sample_params

__all__ = ["Pipeline", "stack_targets"]


def stack_targets(targets: list[torch.Tensor], classes: int = len(CLASSES)) -> torch.Tensor:
    """Class indices (int64 N), or N x classes probabilities if any sample has soft targets (a combined
    set of FERPlus vote distributions and hard labels): the hard ones become one-hot."""
    if all(t.dim() == 0 for t in targets):
        return torch.stack(targets).long()
    return torch.stack([t.float() if t.dim() else torch.nn.functional.one_hot(t.long(), classes).float()
                        for t in targets])


class Pipeline:
    """Batches of (normalised images on `device`, targets) for one rank; one epoch per iteration. An
    iteration stopped early resumes at the first batch not handed out; state_dict() holds (epoch, position)."""

    def __init__(self, dataset, batch_size: int, train: bool, device: torch.device, *, config=AugmentConfig(),
                 seed: int = 0, rank: int = 0, world: int = 1, num_workers: int = 2, out_dtype=torch.float32,
                 channels_last: bool = False):
        self.dataset, self.batch_size, self.train, self.device = dataset, batch_size, train, device
        self.config, self.seed, self.out_dtype, self.channels_last = config, seed, out_dtype, channels_last
        self.num_workers = num_workers
        self.order = EpochOrder(len(dataset), batch_size, train, seed, rank, world)
        self.epoch, self.position = 0, 0  # the next batch to read
        self.skipped: Counter = Counter()  # samples of this process left out while reading, by reason

    def __len__(self) -> int:
        return len(self.order)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def sample(self, index: int) -> tuple[FERDataset, int, Record]:
        """(the data set holding sample `index`, its index there, its record)."""
        part, local = self.dataset.locate(int(index))
        return part, local, part.records[local]

    @staticmethod
    def target(record: Record) -> torch.Tensor:
        if record.soft is not None:
            return torch.tensor(record.soft, dtype=torch.float32)
        return torch.tensor(record.label, dtype=torch.int64)

    def params(self, boxes: torch.Tensor, indices, epoch: int) -> AugmentParams:
        """The augmentation parameters of samples `indices` of `epoch` whose faces lie in `boxes`."""
        keys = sample_keys(self.seed, epoch, indices) if self.train else None
        return sample_params(boxes, self.train, keys, self.config)
