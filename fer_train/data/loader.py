"""build_loader: the one entry point from data sets to augmented, normalised (and FMix-mixed) batches on
the device, through NVIDIA DALI for a GPU where it is installed and through the PyTorch pipeline elsewhere."""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch

from fer_train.config import DATA_BACKENDS, DataConfig
from fer_train.data.base import CombinedDataset
from fer_train.data.dali_pipeline import DaliPipeline, dali_available
from fer_train.data.torch_pipeline import TorchPipeline
from fer_train.recipe.augmentation import AugmentConfig, resized_side

__all__ = ["Loader", "MixedTargets", "build_loader"]


class MixedTargets(NamedTuple):
    """Targets of an FMix batch: the loss is lam * CE(out, targets) + (1 - lam) * CE(out, targets_perm)
    (fer_train.recipe.fmix.fmix_loss); lam is a scalar, or one value per sample in the per-sample mode."""

    targets: torch.Tensor
    targets_perm: torch.Tensor
    lam: torch.Tensor


class Loader:
    """Iterates one epoch of (images, targets) per `for` loop; state_dict() / load_state_dict() hold the
    position (epoch, batch) so a resumed run reads what it would have read."""

    def __init__(self, pipeline, fmix, seed: int):
        self.pipeline, self.fmix, self.seed = pipeline, fmix, seed
        self.backend = "dali" if isinstance(pipeline, DaliPipeline) else "torch"

    def __len__(self) -> int:
        return len(self.pipeline)

    @property
    def epoch(self) -> int:
        return self.pipeline.epoch

    @property
    def skipped(self) -> Counter:
        """Samples left out while reading (data.on_error="skip"), by reason, since the loader was made: each
        sample once, whichever process read it."""
        return self.pipeline.skipped

    def __iter__(self):
        for images, targets in self.pipeline:
            if self.fmix is not None:
                # one generator per batch, seeded by (seed, epoch, the batch's place in the epoch's order across
                # ranks): mixing is reproducible, resumable, and the same for a batch however many ranks read
                order, batch = self.pipeline.order, self.pipeline.position - 1  # position: the next batch
                generator = torch.Generator(device=images.device).manual_seed(
                    (self.seed * 1_000_003 + self.pipeline.epoch) * 1_000_003 + batch * order.world + order.rank)
                images, targets, targets_perm, lam = self.fmix(images, targets, generator=generator)
                targets = MixedTargets(targets, targets_perm, lam)
            yield images, targets

    def state_dict(self) -> dict:
        return self.pipeline.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.pipeline.load_state_dict(state)

    def close(self) -> None:
        """Ends the input worker processes now (a later iteration starts new ones where this one stopped)."""
        self.pipeline.close()


def build_loader(datasets, batch_size: int, train: bool, image_size: int = 224, device=None, backend: str = "auto",
                 fmix=None, seed: int = 0, *, rank: int = 0, world: int = 1, num_workers: int | None = None,
                 out_dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 config: AugmentConfig | None = None, timeout: float = DataConfig.timeout,
                 class_balance: float = 0.0, crop: float = DataConfig.crop, zoom: float = DataConfig.zoom,
                 translate: float = DataConfig.translate,
                 decoded_cache_mb: float = DataConfig.decoded_cache_mb) -> Loader:
    """Batches of (images N x 3 x image_size x image_size on `device`, targets) from one data set or a list
    of them (combined into one training set).

    train: shuffle (seeded by (seed, epoch)), the random augmentation of docs/method.md section 6 and FMix; else
    the evaluation transform in order, every sample once. backend: "dali" (NVIDIA DALI; decode on the
    GPU when device is CUDA), "torch" (torchvision decode and the fused augmentation kernel), or "auto"
    (DALI for a CUDA device when it is installed, else "torch"). num_workers: input worker processes; None:
    2 for a CUDA device, 0 for the CPU, where the training step already keeps every core busy: a ResNet-18
    step at 48 px, batch 32 on 2 cores took 340 ms fed by "torch" in the main process (decoded images
    kept), 362 ms by DALI's CPU graph and 400-415 ms by "torch" with 2 workers (taking turns in one
    process, medians of 3 blocks of 30 steps). fmix: None, or a callable (images, targets, generator=...) -> (images,
    targets, targets_perm, lam), e.g. fer_train.recipe.fmix.FMix(); training batches then carry MixedTargets.
    rank / world: this process's shard of every epoch (distinct samples per rank). Targets are class
    indices (int64), or N x 8 probabilities when a set has soft targets. timeout: seconds without a batch
    from the worker processes before InputWorkerError (data.timeout), which also reports a worker that
    died. An image that cannot be read mid-run raises DataError, or with the set's on_error="skip" is
    replaced by the next sample that reads and counted in Loader.skipped. class_balance (training): 0 reads
    every sample once per epoch; above 0, samples are drawn with replacement, weighted by their class's count
    to the power -class_balance (1: every class equally often; data.class_balance). crop: the centre crop's
    share of the resized shorter side (data.crop); zoom, translate: training's random crops (data.zoom,
    data.translate); `config`, when given, says all three instead. decoded_cache_mb:
    decoded images the PyTorch pipeline keeps when it reads in the main process (data.decoded_cache_mb; 0: none).
    """
    if backend not in DATA_BACKENDS:
        raise ValueError(f"build_loader: backend must be one of {DATA_BACKENDS}, got {backend!r}")
    if backend == "dali" and not dali_available():
        raise ValueError("build_loader: backend='dali' but nvidia.dali cannot be imported; pip install "
                         "nvidia-dali-cuda130, or use backend='torch'")
    if isinstance(datasets, (list, tuple)):
        datasets = datasets[0] if len(datasets) == 1 else CombinedDataset(list(datasets))
    if len(datasets) == 0:
        raise ValueError("build_loader: the data set is empty")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    config = config or AugmentConfig(out_size=image_size, resize=resized_side(image_size, crop), zoom=zoom,
                                     translate=translate)
    if num_workers is None:
        num_workers = 2 if device.type == "cuda" else 0
    use_dali = backend == "dali" or (backend == "auto" and device.type == "cuda" and dali_available())
    kind = DaliPipeline if use_dali else TorchPipeline
    pipeline = kind(datasets, batch_size, train, device, config=config, seed=seed, rank=rank, world=world,
                    num_workers=num_workers, out_dtype=out_dtype, channels_last=channels_last, timeout=timeout,
                    class_balance=class_balance, decoded_cache_mb=decoded_cache_mb)
    return Loader(pipeline, fmix if train else None, seed)
