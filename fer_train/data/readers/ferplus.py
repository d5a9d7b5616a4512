"""FERPlus (docs/method.md section 7): folders FER2013Train, FER2013Valid and FER2013Test of 48 x 48 grey PNGs,
each with a headerless label.csv of 10 vote counts per image, turned into labels by one of three rules. A row
naming an image that an earlier row named is counted ("duplicate row") and left out: the first row decides."""

from __future__ import annotations

import re
from pathlib import Path

from fer_train.config import FERPLUS_LABEL_MODES
from fer_train.data.base import CLASSES, Record
from fer_train.data.readers.common import Issues, checked_box, csv_rows, need

__all__ = ["EXPECTS", "FOLDERS", "OPTIONS", "SPLITS", "ferplus_target", "read"]

FOLDERS = {  # split -> folder under the FERPlus root
    "train": "FER2013Train", "valid": "FER2013Valid", "test": "FER2013Test"}
EXPECTS = "the folder holding FER2013Train/, FER2013Valid/ and FER2013Test/ (FERPlus layout)"
_FIELDS = 12  # image name, face box, then votes: the 8 emotions in CLASSES order, unknown, NF
_BOX = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)")


def ferplus_target(votes: list[int], label_mode: str) -> tuple[int, tuple[float, ...] | None] | str:
    """(hard label, soft target or None) from FERPlus's 10 vote counts, or the reason the image is dropped.

    majority: FERPlus's official rule, votes of 1 are outliers and set to 0; the top class is kept only if
    it holds more than half of the remaining votes (unknown and NF included) and is an emotion.
    plurality: the top class of the raw votes, dropped if unknown or NF; ties go to the first column,
    as numpy's argmax in the authors' code. soft: the 8 emotion votes normalised (label: their arg-max).
    """
    if label_mode == "soft":
        emotions = votes[:len(CLASSES)]
        total = sum(emotions)
        if total == 0:
            return "no emotion votes"
        return emotions.index(max(emotions)), tuple(v / total for v in emotions)
    if label_mode == "majority":
        votes = [v if v > 1 else 0 for v in votes]
        if 2 * max(votes) <= sum(votes):
            return "no majority"
    elif label_mode != "plurality":
        raise ValueError(f"ferplus label_mode must be one of {FERPLUS_LABEL_MODES}, got {label_mode!r}")
    if max(votes) == 0:
        return "no votes"
    top = votes.index(max(votes))
    if top >= len(CLASSES):
        return "unknown or NF wins"
    return top, None


def read(root: Path, split: str, issues: Issues, label_mode: str = "majority") -> list[Record]:
    if label_mode not in FERPLUS_LABEL_MODES:
        raise ValueError(f"open_dataset: ferplus label_mode must be one of {FERPLUS_LABEL_MODES}, "
                         f"got {label_mode!r}")
    folder = need(root / FOLDERS[split], f"the {split} split's folder", "ferplus", EXPECTS)
    listing = need(folder / "label.csv", "the label list", "ferplus", EXPECTS)
    records, seen = [], set()
    for line, row in csv_rows(listing):
        where = f"{listing} line {line}"
        if len(row) != _FIELDS:
            issues.bad("malformed row", f"{where}: expected {_FIELDS} fields (image name, \"(x, y, w, h)\" "
                                        f"box, 10 vote counts), found {len(row)}; fix the row")
            continue
        name, box_text, vote_text = row[0], row[1], row[2:]
        if name in seen:  # the first row of an image decides, as in facial_expressions; the image is read once
            issues.drop("duplicate row")
            continue
        seen.add(name)
        box_match = _BOX.fullmatch(box_text)
        if box_match is None:
            issues.bad("malformed row", f"{where}: face box {box_text!r} is not \"(x, y, w, h)\"; fix the row")
            continue
        if not all(v.isdigit() for v in vote_text):
            issues.bad("unknown label", f"{where}: votes {vote_text} are not 10 non-negative integers; fix the row")
            continue
        target = ferplus_target([int(v) for v in vote_text], label_mode)
        if isinstance(target, str):
            issues.drop(target)
            continue
        path = folder / name
        x, y, w, h = (int(v) for v in box_match.groups())
        box = checked_box(path, (x, y, x + w, y + h), where, issues)
        if box is not None:
            records.append(Record(str(path), target[0], target[1], box, "ferplus"))
    return records


SPLITS = tuple(FOLDERS)
OPTIONS = ("label_mode",)
