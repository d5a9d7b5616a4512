"""facial_expressions (muxspace; docs/method.md section 7): data/legend.csv over images/, labels in mixed case
and older aliases, with its known defects (duplicate and conflicting rows, images without a row) counted."""

from __future__ import annotations

import os
from pathlib import Path

from fer_train.data.base import CLASSES, Record
from fer_train.data.readers.common import Issues, checked, need, table_rows

__all__ = ["EXPECTS", "SPLITS", "read"]

EXPECTS = "the facial_expressions repository folder, holding data/legend.csv and images/"
_CLASSES = {name: CLASSES.index(c) for name, c in {
    "neutral": "neutral", "happiness": "happy", "surprise": "surprise", "sadness": "sad", "anger": "anger",
    "disgust": "disgust", "fear": "fear", "contempt": "contempt",
    # older aliases that appear in the set's history
    "angry": "anger", "surprised": "surprise", "disgusted": "disgust", "fearful": "fear", "sad": "sad",
}.items()}


def read(root: Path, split: str, issues: Issues) -> list[Record]:
    legend = need(root / "data" / "legend.csv", "the label list", "facial_expressions", EXPECTS)
    images = need(root / "images", "the image folder", "facial_expressions", EXPECTS)
    column, rows = table_rows(legend, ("image", "emotion"), issues)
    labels: dict[str, tuple[int, str]] = {}  # image -> (label, where its first row is); dicts keep row order
    conflicting: set[str] = set()
    for where, row in rows:
        name, emotion = row[column["image"]], row[column["emotion"]]
        label = _CLASSES.get(emotion.lower())
        if label is None:
            issues.bad("unknown label", f"{where}: emotion {emotion!r} is not one of {sorted(_CLASSES)} (any case); "
                                        f"fix the row")
            continue
        if name not in labels:
            labels[name] = label, where
        elif labels[name][0] == label:
            issues.drop("duplicate row (same label, kept once)")
        else:
            conflicting.add(name)
    # a known defect: one image carries two different labels; neither can be trusted
    issues.drop("image with conflicting rows", len(conflicting))
    issues.drop("image without a row", len({e.name for e in os.scandir(images) if e.is_file()} - set(labels)))
    records = []
    for name, (label, where) in labels.items():
        path = images / name
        if name not in conflicting and checked(path, where, issues):
            records.append(Record(str(path), label, None, None, "facial_expressions"))
    return records


SPLITS = ("train",)
