"""open_dataset: the registry of data-set readers, one module per set (docs/method.md section 7).

Each reader module has read(root, split, issues, **options) -> records, its SPLITS, the OPTIONS it takes,
what its root must hold (EXPECTS) and, where a set lacks classes, PRESENT_CLASSES. Opening a set checks
every listed image cheaply (fer_train.data.images), so a broken set fails when it is opened, not mid-epoch:
bad input raises DataError naming the file, the line and what to do, or with on_error="skip" is left out and
counted by reason. Items left out by design (FERPlus's label rules, AffectNet's codes 8-10,
facial_expressions' known defects) are always counted too, so report() accounts for every row and image.
"""

from __future__ import annotations

import os
from pathlib import Path

from fer_train.config import ON_ERROR
from fer_train.data.base import ALL_CLASSES, FERDataset
from fer_train.data.images import MAX_IMAGE_PIXELS
from fer_train.errors import DataError
from fer_train.data.readers import affectnet, facial_expressions, ferplus, rafdb, synthetic
from fer_train.data.readers.common import Issues

__all__ = ["READERS", "open_dataset"]

READERS = {"affectnet": affectnet, "ferplus": ferplus, "rafdb": rafdb, "facial_expressions": facial_expressions}


def open_dataset(name: str, root: str | os.PathLike | None, split: str, *, on_error: str = "raise",
                 max_image_pixels: int | None = MAX_IMAGE_PIXELS, **options) -> FERDataset:
    """One split of a data set, read from its on-disk layout (docs/method.md section 7).

    name: "affectnet" (splits train, val), "ferplus" (train, valid, test; option label_mode "majority",
    "plurality" or "soft"), "rafdb" (train, test), "facial_expressions" (train) or "synthetic" (train,
    val, test; drawn, root None; options size, length, seed: fer_train.data.readers.synthetic).
    on_error: "raise" (DataError at the first bad item) or "skip" (leave bad items out, counted in
    `skipped` and shown by report()). A missing folder or list file, a missing column and an empty
    result raise in either mode. max_image_pixels: images larger than this by their header are bad input
    (counted as "image too large"), here and when they are read later (data.max_image_pixels); None: no
    limit. The drawn synthetic faces are small and take no limit.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"open_dataset: on_error must be one of {ON_ERROR}, got {on_error!r}")
    if name == "synthetic":
        _check_options(name, options, synthetic.OPTIONS)
        if root is not None:
            raise ValueError(f"open_dataset: the synthetic set is drawn, not read; pass root=None, not {root!r}")
        return synthetic.open_synthetic(split, on_error=on_error, **options)
    if name not in READERS:
        raise ValueError(f"open_dataset: unknown data set {name!r}; choose one of {(*READERS, 'synthetic')}")
    reader = READERS[name]
    split = _split_name(name, split, reader.SPLITS)
    _check_options(name, options, getattr(reader, "OPTIONS", ()))
    if root is None:
        raise ValueError(f"open_dataset: {name} needs root: {reader.EXPECTS}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{name}: root {root} is not a folder; expected {reader.EXPECTS}")
    if max_image_pixels is not None and max_image_pixels < 1:
        raise ValueError(f"open_dataset: max_image_pixels must be positive or None, got {max_image_pixels!r}")
    issues = Issues(on_error, max_image_pixels)
    records = reader.read(root, split, issues, **options)
    if not records:
        why = ", ".join(f"{reason} {n}" for reason, n in sorted(issues.skipped.items())) or "the list has no rows"
        raise DataError(f"{name} {split} under {root}: no images left (left out: {why}); check the list file "
                        f"and the options{' (label_mode)' if name == 'ferplus' else ''}")
    return FERDataset(name, split, records, root=root, skipped=issues.skipped,
                      present_classes=getattr(reader, "PRESENT_CLASSES", ALL_CLASSES), on_error=on_error,
                      max_image_pixels=max_image_pixels)


def _check_options(name: str, options: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"open_dataset: {name} takes the options {allowed or 'none'}, not {unknown}")


def _split_name(name: str, split: str, splits: tuple[str, ...]) -> str:
    if split in ("val", "valid"):
        split = next((s for s in splits if s in ("val", "valid")), split)
    if split not in splits:
        raise ValueError(f"open_dataset: {name} has the splits {splits}, not {split!r}")
    return split
