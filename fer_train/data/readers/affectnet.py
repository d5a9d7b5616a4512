"""AffectNet (docs/method.md section 7): the manually annotated lists with a face box and an expression code
per image; codes 8-10 (none, uncertain, no face) are left out."""

from __future__ import annotations

from pathlib import Path

from fer_train.data.base import Record
from fer_train.data.readers.common import Issues, checked_box, need, table_rows

__all__ = ["EXPECTS", "SPLITS", "read"]

_LISTS = {"train": "training.csv", "val": "validation.csv"}
EXPECTS = "the folder holding Manually_Annotated_file_lists/ and Manually_Annotated_Images/ (AffectNet)"
_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression")
# AffectNet's codes: 0 Neutral, 1 Happy, 2 Sad, 3 Surprise, 4 Fear, 5 Disgust, 6 Anger, 7 Contempt
_CLASSES = {0: 0, 1: 1, 2: 3, 3: 2, 4: 6, 5: 5, 6: 4, 7: 7}
_DROPPED = {8: "code 8 (None)", 9: "code 9 (Uncertain)", 10: "code 10 (No-Face)"}


def read(root: Path, split: str, issues: Issues) -> list[Record]:
    listing = need(root / "Manually_Annotated_file_lists" / _LISTS[split], f"the {split} list",
                    "affectnet", EXPECTS)
    images = need(root / "Manually_Annotated_Images", "the image folder", "affectnet", EXPECTS)
    column, rows = table_rows(listing, _COLUMNS, issues)
    records = []
    for where, row in rows:
        code = row[column["expression"]]
        if code.isdigit() and int(code) in _DROPPED:
            issues.drop(_DROPPED[int(code)])
            continue
        if not (code.isdigit() and int(code) in _CLASSES):
            issues.bad("unknown label", f"{where}: expression {code!r} is not an AffectNet code 0-10; fix the row")
            continue
        try:
            x, y, w, h = (int(row[column[c]]) for c in _COLUMNS[1:5])
        except ValueError:
            issues.bad("malformed row", f"{where}: the face box {[row[column[c]] for c in _COLUMNS[1:5]]} "
                                        f"is not 4 integers; fix the row")
            continue
        path = images / row[column["subDirectory_filePath"]]
        # PIL's crop, as the authors' code used it, wants (left, top, right, bottom), not (x, y, w, h)
        box = checked_box(path, (x, y, x + w, y + h), where, issues)
        if box is not None:
            records.append(Record(str(path), _CLASSES[int(code)], None, box, "affectnet"))
    return records


SPLITS = tuple(_LISTS)
