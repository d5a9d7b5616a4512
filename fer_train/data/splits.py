"""Class weights for the loss and the mixed evaluation split (docs/method.md sections 4 and 7)."""

from __future__ import annotations

import hashlib

import torch

from fer_train.config import WEIGHT_SCHEMES
from fer_train.data.base import CombinedDataset, FERDataset

__all__ = ["class_weights", "mixed_split"]


def class_weights(counts: torch.Tensor, scheme: str | None) -> torch.Tensor:
    """float32 per-class loss weights from per-class sample counts (docs/method.md section 4).

    "eq3": w_i = 1 - n_i / sum_j n_j (normalised); "eq4": w_i = 1 / n_i; None or "none": all ones.
    With eq3 and eq4 a class with n_i = 0 gets weight 0: the training set cannot teach it, and eq4
    would divide by zero (a class that never occurs as a target does not change the loss either way).
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.dim() != 1 or (counts < 0).any():
        raise ValueError(f"class_weights: counts must be a 1-D tensor of non-negative counts, got {counts}")
    scheme = "none" if scheme is None else scheme
    present = counts > 0
    if scheme == "none":
        weights = torch.ones_like(counts)
    elif scheme == "eq3":
        weights = torch.where(present, 1 - counts / counts.sum().clamp_min(1), 0.0)
    elif scheme == "eq4":
        weights = torch.where(present, 1 / counts.clamp_min(1), 0.0)
    else:
        raise ValueError(f"class_weights: scheme must be None or one of {WEIGHT_SCHEMES}, got {scheme!r}")
    return weights.float()


def mixed_split(datasets: list[FERDataset], seed: int = 0) -> tuple[CombinedDataset, CombinedDataset]:
    """The mixed evaluation of docs/method.md section 7: the given sets pooled and split 50/50 into (mixed-val,
    mixed-test).

    The split is stratified: within each set, samples are ordered by class and then by a hash of
    (seed, set, split, sample_id), and alternate between the halves, so both halves hold half of every
    class of every set (to one sample) and the sizes differ by at most one. The hash, not a random
    generator, decides, so the split is the same on every machine and torch version, and a sample stays
    in its half when other samples are added or removed.
    """
    if not datasets:
        raise ValueError("mixed_split: no evaluation sets given")
    halves: tuple[list, list] = ([], [])
    offset = 0  # carries the alternation across sets, so odd-sized sets do not all favour one half
    for dataset in datasets:
        order = sorted(range(len(dataset)), key=lambda i: _split_key(seed, dataset, i))
        for half in (0, 1):
            picked = sorted(order[(half + offset) % 2::2])
            if picked:
                halves[half].append(dataset.subset(picked))
        offset += len(dataset)
    return CombinedDataset(halves[0], "mixed", "val"), CombinedDataset(halves[1], "mixed", "test")


def _split_key(seed: int, dataset: FERDataset, i: int) -> tuple[int, bytes]:
    tag = f"{seed}/{dataset.name}/{dataset.split}/{dataset.sample_id(i)}".encode()
    return dataset.records[i].label, hashlib.blake2b(tag, digest_size=8).digest()
