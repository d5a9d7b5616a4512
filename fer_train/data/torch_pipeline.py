"""The pipeline for machines without DALI: torchvision decodes (JPEG on the GPU where there is one), and
the augmentation of SPEC section 6 runs on the device as one fused pass (fer_kernels.augment).

DataLoader workers read the files (and decode what the GPU cannot: PNG, WebP, or everything on a CPU
machine); the main process decodes the batch's JPEGs on the GPU, draws each sample's parameters from
(seed, epoch, index) and writes the normalised batch with one kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from fer_kernels.augment import AugmentConfig, augment, full_boxes, sample_keys, sample_params
from fer_train.data.datasets import DataError
from fer_train.data.order import EpochOrder

_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class _Item:
    data: torch.Tensor  # decoded uint8 C x H x W, or the encoded bytes of a JPEG left for the GPU
    encoded: bool
    box: tuple | None
    path: str | None


def locate(dataset, index: int):
    """(the FERDataset holding sample `index` of a possibly combined data set, its index there)."""
    while hasattr(dataset, "cumulative_sizes"):  # ConcatDataset and its subclasses
        part = int(torch.searchsorted(torch.tensor(dataset.cumulative_sizes), index, right=True))
        index -= dataset.cumulative_sizes[part - 1] if part else 0
        dataset = dataset.datasets[part]
    return dataset, index


def stack_targets(targets: list[torch.Tensor], classes: int = 8) -> torch.Tensor:
    """Class indices (int64 N), or N x classes probabilities if any sample has soft targets (a combined
    set of FERPlus vote distributions and hard labels): the hard ones become one-hot."""
    if all(t.dim() == 0 for t in targets):
        return torch.stack(targets).long()
    return torch.stack([t.float() if t.dim() else torch.nn.functional.one_hot(t.long(), classes).float()
                        for t in targets])


def decode_cpu(data: torch.Tensor, path: str | None) -> torch.Tensor:
    """uint8 C x H x W with C 1 (grey) or 3 (RGB); alpha channels dropped."""
    try:
        image = decode_image(data, mode=ImageReadMode.UNCHANGED)
    except RuntimeError as err:
        raise DataError(f"{path}: cannot decode the image ({err})") from err
    return image[:1] if image.shape[0] == 2 else image[:3]


class _Fetch:
    """DataLoader worker side: one batch of samples, read and (unless left to the GPU) decoded; for a CPU
    batch also augmented (`augment_epoch` set), so the workers share that work as they share decoding."""

    def __init__(self, dataset, gpu_jpeg: bool, pipeline: TorchPipeline | None = None,
                 augment_epoch: int | None = None):
        self.dataset, self.gpu_jpeg, self.pipeline, self.augment_epoch = dataset, gpu_jpeg, pipeline, augment_epoch

    def __call__(self, indices):
        items, targets = [], []
        for index in indices:
            part, local = locate(self.dataset, int(index))
            record = part.records[local]
            if record.path is None:  # generated (synthetic): the data set draws it
                image, target = part[local]
                items.append(_Item(image, False, None, None))
            else:
                data = torch.frombuffer(bytearray(part.encoded(local)), dtype=torch.uint8)
                target = torch.tensor(record.soft, dtype=torch.float32) if record.soft is not None else record.label
                if self.gpu_jpeg and bytes(data[:3]) == _JPEG_MAGIC:
                    items.append(_Item(data, True, record.box, record.path))
                else:
                    items.append(_Item(decode_cpu(data, record.path), False, record.box, record.path))
            targets.append(torch.as_tensor(target))
        if self.augment_epoch is not None:
            return self.pipeline.augment([it.data for it in items], items, indices, self.augment_epoch), \
                stack_targets(targets)
        return items, stack_targets(targets)


class TorchPipeline:
    """Batches of (normalised images on `device`, targets) for one rank; one epoch per iteration."""

    def __init__(self, dataset, batch_size: int, train: bool, device: torch.device, *, config=AugmentConfig(),
                 seed: int = 0, rank: int = 0, world: int = 1, num_workers: int = 2, out_dtype=torch.float32,
                 channels_last: bool = False):
        self.dataset, self.train, self.device, self.config, self.seed = dataset, train, device, config, seed
        self.out_dtype, self.channels_last = out_dtype, channels_last
        self.order = EpochOrder(len(dataset), batch_size, train, seed, rank, world)
        self.num_workers = num_workers
        self.epoch, self.position = 0, 0  # the next batch to read

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        batches = self.order.batches(self.epoch)[self.position:]
        gpu = self.device.type == "cuda"
        # On the CPU the workers augment too. One thread each: beside the other busy processes, two OpenMP
        # threads made its small per-image ops 50x slower (measured: 1.4 s against 27 ms for 16 images).
        fetch = _Fetch(self.dataset, gpu_jpeg=gpu, pipeline=self, augment_epoch=None if gpu else self.epoch)
        loader = DataLoader(batches, batch_size=None, collate_fn=fetch, num_workers=self.num_workers, pin_memory=gpu,
                            prefetch_factor=4 if self.num_workers else None)
        for indices, (batch, targets) in zip(batches, loader):
            if gpu:
                batch = self.augment(self._decode(batch), batch, indices, self.epoch)
            self.position += 1
            yield batch, targets.to(self.device, non_blocking=True)
        self.epoch, self.position = self.epoch + 1, 0

    def augment(self, images: list[torch.Tensor], items: list[_Item], indices, epoch: int) -> torch.Tensor:
        """The normalised batch of decoded `images` (the samples `indices` of `epoch`)."""
        sizes = torch.tensor([im.shape[1:] for im in images])
        boxes = torch.where(torch.tensor([it.box is not None for it in items])[:, None],
                            torch.tensor([it.box or (0, 0, 0, 0) for it in items], dtype=torch.float64),
                            full_boxes(sizes))
        keys = sample_keys(self.seed, epoch, indices) if self.train else None
        params = sample_params(boxes, self.train, keys, self.config)
        return augment(images, params, self.out_dtype, self.channels_last)

    def _decode(self, items: list[_Item]) -> list[torch.Tensor]:
        images = [None] * len(items)
        jpegs = [k for k, it in enumerate(items) if it.encoded]
        if jpegs:
            try:
                decoded = decode_jpeg([items[k].data for k in jpegs], mode=ImageReadMode.UNCHANGED, device=self.device)
            except RuntimeError as err:
                paths = [items[k].path for k in jpegs]
                raise DataError(f"cannot decode one of {paths} on {self.device} ({err})") from err
            for k, image in zip(jpegs, decoded):
                images[k] = image
        for k, it in enumerate(items):
            if not it.encoded:
                images[k] = it.data.to(self.device, non_blocking=True)
        return images

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
