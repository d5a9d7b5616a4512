"""Predict expressions of face images on disk: each whole image is taken as the face box and goes
through the evaluation transform of training (resize the shorter side, centre crop, ImageNet
normalisation; fer_train.recipe.augmentation with train=False), so a model sees what it saw on validation sets.

    paths = collect_images(["faces/", "one.jpg"])
    rows = predict(model, paths)                # [{"path", "class", "probabilities": {class: p}}]
    write_predictions(rows, "predictions.csv")  # or .json, or "-" for JSON on stdout
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import torch

from fer_train.data.base import CLASSES
from fer_train.errors import DataError
from fer_train.data.images import load
from fer_train.evaluation import _model_device, _unwrap
from fer_train.recipe.augmentation import AugmentConfig, apply, full_boxes, sample_params

__all__ = ["IMAGE_EXTENSIONS", "collect_images", "predict", "write_predictions"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")  # what torchvision's decode_image reads


def collect_images(inputs: list[str | Path]) -> list[Path]:
    """The image files named by `inputs`: files as given (decoded by content, whatever their extension),
    folders searched recursively for IMAGE_EXTENSIONS (any case), sorted. Duplicates are kept once, at
    their first place. Raises DataError naming a path that does not exist or a folder with no image."""
    found: dict[Path, None] = {}  # an ordered set
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not images:
                raise DataError(f"{path}: the folder holds no image ({', '.join(IMAGE_EXTENSIONS)} files, "
                                f"searched recursively)")
            found.update(dict.fromkeys(images))
        elif path.is_file():
            found[path] = None
        else:
            raise DataError(f"{path}: no such file or folder")
    if not found:
        raise DataError("no images given")
    return list(found)


def predict(model: torch.nn.Module, paths: list[str | Path], *, image_size: int = 224, device=None,
            batch_size: int = 64, channels_last: bool = False) -> list[dict]:
    """One row per path, in order: {"path": str, "class": the most probable class name, "probabilities":
    {class name: softmax probability}}. image_size: the model's input size (the crop); the shorter side
    is resized to image_size * 256 / 224 first, as in build_loader. device: default the model's. The
    model is run in eval mode and put back in its previous mode afterwards."""
    inner = _unwrap(model)  # no DDP collectives: prediction is a single-process affair
    device = torch.device(device) if device is not None else _model_device(inner)
    config = AugmentConfig(out_size=image_size, resize=round(image_size * 256 / 224))
    rows = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(paths), batch_size):
                chunk = paths[start:start + batch_size]
                images = [load(p).to(device) for p in chunk]
                params = sample_params(full_boxes([im.shape[1:] for im in images]), train=False, config=config)
                batch = apply(images, params, channels_last=channels_last)
                logits = inner(batch).float()
                if logits.dim() != 2 or logits.shape[1] != len(CLASSES):
                    raise ValueError(f"predict: the model gives outputs of shape {tuple(logits.shape)}, expected "
                                     f"N x {len(CLASSES)} (one logit per class of {CLASSES})")
                for path, probabilities in zip(chunk, logits.softmax(1).cpu().tolist()):
                    best = max(range(len(CLASSES)), key=probabilities.__getitem__)
                    rows.append({"path": str(path), "class": CLASSES[best],
                                 "probabilities": dict(zip(CLASSES, probabilities))})
    finally:
        model.train(was_training)
    return rows


def write_predictions(rows: list[dict], path: str | Path) -> None:
    """Write predict()'s rows to `path`: ".json" (a list of the rows), ".csv" (columns path, class, then
    one probability column per class, in CLASSES order), or "-" for JSON on standard output."""
    if str(path) == "-":
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise ValueError(f"write_predictions: {path}: the output must end in .json or .csv (or be '-' for stdout)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        if suffix == ".json":
            json.dump(rows, f, indent=2)
            f.write("\n")
        else:
            writer = csv.writer(f)
            writer.writerow(["path", "class", *CLASSES])
            for row in rows:
                # repr() of a float is its shortest exact form: the CSV reads back to the same numbers
                writer.writerow([row["path"], row["class"], *(repr(row["probabilities"][c]) for c in CLASSES)])
