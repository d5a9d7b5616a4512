"""RAF-DB basic (docs/method.md section 7): one label list for both splits (by the train_/test_ prefix) and
the aligned face images; it has no contempt."""

from __future__ import annotations

from pathlib import Path

from fer_train.data.base import Record
from fer_train.errors import DataError
from fer_train.data.readers.common import Issues, checked, need

__all__ = ["EXPECTS", "PRESENT_CLASSES", "SPLITS", "read"]

EXPECTS = "RAF-DB's basic/ folder, holding EmoLabel/list_patition_label.txt and Image/aligned/"
# RAF-DB's labels: 1 Surprise, 2 Fear, 3 Disgust, 4 Happiness, 5 Sadness, 6 Anger, 7 Neutral
_CLASSES = {1: 2, 2: 6, 3: 5, 4: 1, 5: 3, 6: 4, 7: 0}


def read(root: Path, split: str, issues: Issues) -> list[Record]:
    # "patition" is the file's own spelling
    listing = need(root / "EmoLabel" / "list_patition_label.txt", "the label list", "rafdb", EXPECTS)
    images = need(root / "Image" / "aligned", "the aligned image folder", "rafdb", EXPECTS)
    records = []
    try:
        lines = listing.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{listing}: not a text file ({err}); restore the original file") from err
    for line, text in enumerate(lines, start=1):
        where = f"{listing} line {line}"
        fields = text.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[0].split("_")[0] not in ("train", "test"):
            issues.bad("malformed row", f"{where}: expected 'train_NNNNN.jpg LABEL' or 'test_NNNNN.jpg LABEL', "
                                        f"found {text.strip()!r}; fix the line")
            continue
        name, code = fields
        if not name.startswith(split + "_"):
            continue
        if not (code.isdigit() and int(code) in _CLASSES):
            issues.bad("unknown label", f"{where}: label {code!r} is not a RAF-DB basic label 1-7; fix the line")
            continue
        stem, dot, extension = name.rpartition(".")
        path = images / f"{stem}_aligned{dot}{extension}"
        if checked(path, where, issues):
            records.append(Record(str(path), _CLASSES[int(code)], None, None, "rafdb"))
    return records


SPLITS = ("train", "test")
PRESENT_CLASSES = tuple(sorted(_CLASSES.values()))
