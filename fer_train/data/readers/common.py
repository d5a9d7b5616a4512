"""What the readers share: where they send what they leave out (Issues), the list files' CSV rows with their
line numbers, and the checks that an image named on a line is whole and its face box inside it."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from fer_train.data.base import SKIP_HINT
from fer_train.errors import DataError
from fer_train.data.images import MAX_IMAGE_PIXELS, Header, check_file

__all__ = ["Issues", "checked", "checked_box", "columns", "csv_rows", "need", "table_rows"]


class Issues:
    """Where a reader sends what it leaves out: bad input raises or is counted (on_error), items left
    out by the set's own rules are always counted. max_pixels: the largest image accepted, by its header."""

    def __init__(self, on_error: str, max_pixels: int | None = MAX_IMAGE_PIXELS):
        self.on_error, self.max_pixels, self.skipped = on_error, max_pixels, Counter()

    def bad(self, reason: str, message: str) -> None:
        if self.on_error == "raise":
            raise DataError(f"{message}; {SKIP_HINT}")
        self.skipped[reason] += 1

    def drop(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n


def need(path: Path, what: str, name: str, expects: str) -> Path:
    """path, or a DataError saying which file or folder of the layout is missing."""
    if not path.exists():
        raise DataError(f"{name}: {path} not found ({what}); root must be {expects}")
    return path


def csv_rows(path: Path):
    """(line number, fields) per non-blank row of a CSV file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            for row in reader:
                if any(field.strip() for field in row):
                    yield reader.line_num, [field.strip() for field in row]
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: not a readable CSV text file ({err}); restore the original file") from err


def table_rows(path: Path, needed: tuple[str, ...], issues: Issues):
    """(column name -> index, an iterator of (where, fields)) for a CSV file with a header: each row that
    has as many fields as the header, `where` naming its file and line; the others go to issues."""
    rows = csv_rows(path)
    _, header = next(rows, (1, []))
    column = columns(path, header, needed)

    def checked():
        for line, row in rows:
            where = f"{path} line {line}"
            if len(row) != len(header):
                issues.bad("malformed row", f"{where}: expected {len(header)} fields as in the header, found "
                                            f"{len(row)}; fix the row")
                continue
            yield where, row
    return column, checked()


def columns(path: Path, header: list[str], needed: tuple[str, ...]) -> dict[str, int]:
    """Column name -> index, or a DataError naming the columns the header lacks."""
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(f"{path} line 1: the header lacks the column(s) {missing} (it has {header}); the reader "
                        f"needs {list(needed)}")
    return {c: header.index(c) for c in needed}


def checked(path: Path, where: str, issues: Issues) -> Header | None:
    """The image's header if it looks whole and is not too large; if not, None, reported (where: the list
    file and line naming it)."""
    header, problem = check_file(path, issues.max_pixels)
    if problem is not None:
        reason, what = problem
        fix = "replace the file or raise data.max_image_pixels" if reason == "image too large" else "restore the file"
        issues.bad(reason, f"{where}: image {path} {what}; {fix}")
        return None
    return header


def checked_box(path: Path, box: tuple[int, int, int, int], where: str,
                 issues: Issues) -> tuple[int, int, int, int] | None:
    """The face box (left, top, right, bottom) clipped to the image; None (reported) if the image does
    not look whole or nothing of the box is inside it. The box is in the upright image's pixels (after its
    EXIF orientation), as every decoder here gives it."""
    header = checked(path, where, issues)
    if header is None:
        return None
    height, width = header.height, header.width
    left, top, right, bottom = max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)
    if right <= left or bottom <= top:
        issues.bad("face box outside the image",
                   f"{where}: face box {box} lies outside the {width} x {height} image {path}; fix the row")
        return None
    return left, top, right, bottom
