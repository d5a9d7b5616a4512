"""Data-set readers: each set of SPEC section 7 read from its own on-disk layout into a FERDataset of
Records (image file, label in the common class order, optional vote distribution, face box).

Opening a set checks every listed image cheaply (it exists, it starts with a JPEG, PNG or WebP
signature, a JPEG ends with its end marker, a WebP is as long as its header says, a PNG's chunks and
image data are whole), so a broken set fails when it is opened, not mid-epoch. Bad input
raises DataError naming the file, the line and what to do; with on_error="skip" the item is left out
and counted in `skipped` by reason instead. Items left out by design (FERPlus label rules, AffectNet's
codes 8-10, facial_expressions' known defects) are always counted there too, so report() accounts
for every row and every image.
"""

from __future__ import annotations

import bisect
import copy
import csv
import hashlib
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset
from torchvision.io import ImageReadMode, decode_image

CLASSES = ("neutral", "happy", "surprise", "sad", "anger", "disgust", "fear", "contempt")  # SPEC section 1
ON_ERROR = ("raise", "skip")
WEIGHT_SCHEMES = ("eq3", "eq4", "none")
FERPLUS_LABEL_MODES = ("majority", "plurality", "soft")

_ALL_CLASSES = tuple(range(len(CLASSES)))

_SKIP_HINT = "or open the set with on_error='skip' to leave it out"


class DataError(ValueError):
    """A data set cannot be read as it is on disk; the message names the file (and line) and what to do."""


@dataclass(frozen=True)
class Record:
    path: str | None                       # image file; None for synthetic samples
    label: int                             # index into CLASSES (for soft targets: the arg-max)
    soft: tuple[float, ...] | None         # 8 probabilities (FERPlus soft mode), else None
    box: tuple[int, int, int, int] | None  # face box (left, top, right, bottom) in pixels; None = whole image
    source: str                            # data-set name, e.g. "ferplus"


class FERDataset(Dataset):
    """One split of one data set: (uint8 3 x H x W RGB image cropped to the face box, target) per record.

    The target is an int64 scalar, or float32 [8] probabilities for records with soft targets. An image
    that passed the opening checks but does not load raises DataError; with on_error="skip" the next
    sample that loads stands in and the image is counted under "unreadable image" (in the process that
    read it: DataLoader workers keep their own counts).
    """

    def __init__(self, name: str, split: str, records: list[Record], *, root: Path | None = None,
                 skipped: Counter | None = None, present_classes: tuple[int, ...] = _ALL_CLASSES,
                 on_error: str = "raise"):
        self.name, self.split, self.records, self.root = name, split, records, root
        self.skipped = skipped if skipped is not None else Counter()
        self.present_classes, self.on_error = present_classes, on_error
        self._unreadable: set[int] = set()  # indices that failed to load (skip mode), tried once

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.records)
        if not -n <= i < n:
            raise IndexError(f"{self.name} {self.split}: index {i} out of range for {n} samples")
        for step in range(n):
            j = (i + step) % n
            if j in self._unreadable:
                continue
            try:
                return self._image(j), self._target(j)
            except DataError:
                if self.on_error == "raise":
                    raise
                self._unreadable.add(j)
                self.skipped["unreadable image"] = len(self._unreadable)
        raise DataError(f"{self.name} {self.split}: none of its {n} images loads; check the files under "
                        f"{self.root}")

    def _image(self, i: int) -> torch.Tensor:
        """Sample i's image, decoded (by content, whatever the extension says) and cropped to its face box."""
        record = self.records[i]
        try:
            image = decode_image(torch.frombuffer(bytearray(self.encoded(i)), dtype=torch.uint8),
                                 mode=ImageReadMode.RGB)
        except RuntimeError as err:
            raise DataError(f"{record.path}: cannot decode the image ({err}); replace the file, {_SKIP_HINT}") \
                from err
        if record.box is not None:
            left, top, right, bottom = record.box
            image = image[:, top:bottom, left:right]
        return image

    def _target(self, i: int) -> torch.Tensor:
        record = self.records[i]
        if record.soft is not None:
            return torch.tensor(record.soft, dtype=torch.float32)
        return torch.tensor(record.label, dtype=torch.int64)

    def encoded(self, i: int) -> bytes:
        """The image file's bytes, as they are on disk (for decoders such as DALI's)."""
        path = self.records[i].path
        try:
            return Path(path).read_bytes()
        except OSError as err:
            raise DataError(f"{path}: cannot read the image ({err.strerror}); it was readable when the set was "
                            f"opened: restore the file") from err

    def sample_id(self, i: int) -> str:
        """A name for sample i that is the same on every machine: its path below the data set's root."""
        return Path(self.records[i].path).relative_to(self.root).as_posix()

    def subset(self, indices) -> FERDataset:
        """The same set restricted to `indices`, in that order, with its own (empty) skip counts."""
        part = copy.copy(self)
        part.records = [self.records[i] for i in indices]
        part.skipped, part._unreadable = Counter(), set()
        return part

    def class_counts(self) -> torch.Tensor:
        """float64 [8]: samples per class, by hard label."""
        labels = torch.tensor([r.label for r in self.records], dtype=torch.int64)
        return torch.bincount(labels, minlength=len(CLASSES)).double()

    def report(self) -> str:
        """One line: name, split, size, count per class the set can have, items left out by reason."""
        counts = self.class_counts()
        classes = ", ".join(f"{CLASSES[c]} {int(counts[c])}" for c in self.present_classes)
        left_out = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items())) or "none"
        return f"{self.name} {self.split}: {len(self)} images ({classes}); left out: {left_out}"


class CombinedDataset(ConcatDataset):
    """Several FERDatasets read as one (e.g. the training sets of a multi-set run). Nested combined sets
    are flattened, so every part is a FERDataset and record(i).source says where sample i comes from."""

    def __init__(self, datasets: list, name: str = "combined", split: str = "train"):
        parts = [p for d in datasets for p in (d.datasets if isinstance(d, CombinedDataset) else [d])]
        if not parts:
            raise ValueError(f"CombinedDataset {name!r}: no data sets given")
        super().__init__(parts)
        self.name, self.split = name, split

    def locate(self, i: int) -> tuple[FERDataset, int]:
        """(the part holding sample i, the sample's index there)."""
        if not 0 <= i < len(self):
            raise IndexError(f"{self.name} {self.split}: index {i} out of range for {len(self)} samples")
        part = bisect.bisect_right(self.cumulative_sizes, i)
        return self.datasets[part], i - (self.cumulative_sizes[part - 1] if part else 0)

    def record(self, i: int) -> Record:
        part, local = self.locate(i)
        return part.records[local]

    @property
    def present_classes(self) -> tuple[int, ...]:
        return tuple(sorted({c for d in self.datasets for c in d.present_classes}))

    @property
    def skipped(self) -> Counter:
        return sum((d.skipped for d in self.datasets), Counter())

    def class_counts(self) -> torch.Tensor:
        return sum(d.class_counts() for d in self.datasets)

    def report(self) -> str:
        """A summary line, then each part's report() line."""
        counts = self.class_counts()
        classes = ", ".join(f"{CLASSES[c]} {int(counts[c])}" for c in self.present_classes)
        lines = [f"{self.name} {self.split}: {len(self)} images from {len(self.datasets)} sets ({classes})"]
        return "\n".join(lines + ["  " + d.report() for d in self.datasets])


def class_weights(counts: torch.Tensor, scheme: str | None) -> torch.Tensor:
    """float32 per-class loss weights from per-class sample counts (SPEC section 4).

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
    """SPEC section 7's mixed evaluation: the given sets pooled and split 50/50 into (mixed-val,
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


# ---------------------------------------------------------------------------------------------------
# Opening a set


@dataclass(frozen=True)
class _Layout:
    read: Callable           # (root, split, issues, **options) -> list[Record]
    splits: tuple[str, ...]  # the set's own split names; "val" and "valid" are accepted for either
    options: tuple[str, ...]
    expects: str             # what root must hold, for error messages
    present_classes: tuple[int, ...] = _ALL_CLASSES


class _Issues:
    """Where a reader sends what it leaves out: bad input raises or is counted (on_error), items left
    out by the set's own rules are always counted."""

    def __init__(self, on_error: str):
        self.on_error, self.skipped = on_error, Counter()

    def bad(self, reason: str, message: str) -> None:
        if self.on_error == "raise":
            raise DataError(f"{message}; {_SKIP_HINT}")
        self.skipped[reason] += 1

    def drop(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n


def open_dataset(name: str, root: str | os.PathLike | None, split: str, *, on_error: str = "raise",
                 **options) -> FERDataset:
    """One split of a data set, read from its on-disk layout (SPEC section 7).

    name: "affectnet" (splits train, val), "ferplus" (train, valid, test; option label_mode "majority",
    "plurality" or "soft"), "rafdb" (train, test), "facial_expressions" (train) or "synthetic" (train,
    val, test; drawn, root None; options size, length, seed: fer_train.data.synthetic).
    on_error: "raise" (DataError at the first bad item) or "skip" (leave bad items out, counted in
    `skipped` and shown by report()). A missing folder or list file, a missing column and an empty
    result raise in either mode.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"open_dataset: on_error must be one of {ON_ERROR}, got {on_error!r}")
    if name == "synthetic":
        # synthetic.py builds on this module, so it is imported here rather than at the top
        from fer_train.data.synthetic import OPTIONS, open_synthetic
        _check_options(name, options, OPTIONS)
        if root is not None:
            raise ValueError(f"open_dataset: the synthetic set is drawn, not read; pass root=None, not {root!r}")
        return open_synthetic(split, on_error=on_error, **options)
    if name not in _LAYOUTS:
        raise ValueError(f"open_dataset: unknown data set {name!r}; choose one of {(*_LAYOUTS, 'synthetic')}")
    layout = _LAYOUTS[name]
    split = _split_name(name, split, layout.splits)
    _check_options(name, options, layout.options)
    if root is None:
        raise ValueError(f"open_dataset: {name} needs root: {layout.expects}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{name}: root {root} is not a folder; expected {layout.expects}")
    issues = _Issues(on_error)
    records = layout.read(root, split, issues, **options)
    if not records:
        why = ", ".join(f"{reason} {n}" for reason, n in sorted(issues.skipped.items())) or "the list has no rows"
        raise DataError(f"{name} {split} under {root}: no images left (left out: {why}); check the list file "
                        f"and the options{' (label_mode)' if name == 'ferplus' else ''}")
    return FERDataset(name, split, records, root=root, skipped=issues.skipped,
                      present_classes=layout.present_classes, on_error=on_error)


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


def _need(path: Path, what: str, name: str, expects: str) -> Path:
    """path, or a DataError saying which file or folder of the layout is missing."""
    if not path.exists():
        raise DataError(f"{name}: {path} not found ({what}); root must be {expects}")
    return path


def _csv_rows(path: Path):
    """(line number, fields) per non-blank row of a CSV file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            for row in reader:
                if any(field.strip() for field in row):
                    yield reader.line_num, [field.strip() for field in row]
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: not a readable CSV text file ({err}); restore the original file") from err


def _table_rows(path: Path, needed: tuple[str, ...], issues: _Issues):
    """(column name -> index, an iterator of (where, fields)) for a CSV file with a header: each row that
    has as many fields as the header, `where` naming its file and line; the others go to issues."""
    rows = _csv_rows(path)
    _, header = next(rows, (1, []))
    column = _columns(path, header, needed)

    def checked():
        for line, row in rows:
            where = f"{path} line {line}"
            if len(row) != len(header):
                issues.bad("malformed row", f"{where}: expected {len(header)} fields as in the header, found "
                                            f"{len(row)}; fix the row")
                continue
            yield where, row
    return column, checked()


def _columns(path: Path, header: list[str], needed: tuple[str, ...]) -> dict[str, int]:
    """Column name -> index, or a DataError naming the columns the header lacks."""
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(f"{path} line 1: the header lacks the column(s) {missing} (it has {header}); the reader "
                        f"needs {list(needed)}")
    return {c: header.index(c) for c in needed}


# ---------------------------------------------------------------------------------------------------
# Image checks

_JPEG, _PNG = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
# Bytes searched for a JPEG's end marker at the end of the file. Some writers append data after it; a
# window too small rejects files that decode, one too large can find a thumbnail's marker in a short
# truncated file, which is safe: truncated JPEGs fail cleanly (DataError) when decoded.
_TAIL = 4096


def _image_problem(path: Path) -> tuple[str, str] | None:
    """(reason, what is wrong) if the file cannot be a whole JPEG, PNG or WebP image, None if it looks
    whole. JPEG and WebP are judged by their first and last bytes, PNG in full (_png_problem)."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            head = file.read(16)
            if head.startswith(_PNG):
                return _png_problem(head + file.read())
            file.seek(max(0, size - _TAIL))
            tail = file.read()
    except FileNotFoundError:
        return "missing image", "does not exist"
    except OSError as err:
        return "corrupt image", f"cannot be read ({err.strerror})"
    if size == 0:
        return "corrupt image", "is empty"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        if int.from_bytes(head[4:8], "little") + 8 > size:  # the RIFF header states the whole length
            return "corrupt image", "is a truncated WebP file (shorter than its RIFF header says)"
        return None
    if not head.startswith(_JPEG):
        return "corrupt image", f"is not a JPEG, PNG or WebP file (it starts with {head[:8].hex(' ')})"
    if b"\xff\xd9" not in tail:
        return "corrupt image", "is a truncated JPEG file (no end marker FFD9)"
    return None


_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # colour type -> bits
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_problem(data: bytes) -> tuple[str, str] | None:
    """What libpng would stop at in a PNG file, or None. torchvision 0.29's decode_png kills the process
    (SIGSEGV) on any libpng error, seen with a CRC error and with a corrupt deflate stream, so a PNG is
    checked in full before anything decodes it: chunk structure, the CRCs of the critical chunks (libpng
    only warns about the others), the header, and the inflated image data's length and row filters.
    For FERPlus's 2 KB files this is as cheap as reading them."""
    pos, header, palette, idat = len(_PNG), None, False, []
    while pos + 12 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > len(data):
            return "corrupt image", "is a truncated PNG file (a chunk runs past the end)"
        body = data[pos + 8:end - 4]
        if not kind[0] & 0x20 and zlib.crc32(kind + body) != int.from_bytes(data[end - 4:end], "big"):
            return "corrupt image", f"is a corrupt PNG file (CRC error in its {kind.decode('latin-1')} chunk)"
        if kind == b"IEND":
            break
        header = body if kind == b"IHDR" else header
        palette |= kind == b"PLTE"
        if kind == b"IDAT":
            idat.append(body)
        pos = end
    else:
        return "corrupt image", "is a truncated PNG file (no IEND chunk)"
    if header is None or len(header) != 13:
        return "corrupt image", "is a corrupt PNG file (no valid IHDR chunk)"
    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, interlaced = header[8], header[9], header[12]
    if not width or not height or depth not in _PNG_DEPTHS.get(colour, ()) or interlaced > 1 or \
            (colour == 3 and not palette):
        return "corrupt image", f"is a corrupt PNG file (invalid header: {width} x {height}, colour type " \
                                f"{colour}, bit depth {depth})"
    try:
        pixels = zlib.decompress(b"".join(idat))
    except zlib.error as err:
        return "corrupt image", f"is a corrupt PNG file (its image data does not inflate: {err})"
    start = 0
    for x0, y0, dx, dy in _ADAM7 if interlaced else ((0, 0, 1, 1),):
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns <= 0 or rows <= 0:
            continue
        row = 1 + -(-(columns * _PNG_CHANNELS[colour] * depth) // 8)  # a filter byte, then the samples
        if len(pixels) < start + rows * row:
            return "corrupt image", "is a corrupt PNG file (too little image data)"
        filters = pixels[start:start + rows * row:row]
        if max(filters) > 4:
            return "corrupt image", f"is a corrupt PNG file (unknown row filter {max(filters)})"
        start += rows * row
    return None


def _image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) from the file's header, None if the header is unreadable. PNG's is read directly
    (through PIL it took as long as the whole _png_problem check); other formats through PIL, which
    reads no pixels."""
    try:
        with open(path, "rb") as file:
            head = file.read(24)
        if head.startswith(_PNG) and head[12:16] == b"IHDR":
            return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, SyntaxError, ValueError):  # PIL reports broken headers with any of these
        return None


def _checked(path: Path, where: str, issues: _Issues) -> bool:
    """Whether the image looks whole; if not, reports it (where: the list file and line naming it)."""
    problem = _image_problem(path)
    if problem is not None:
        reason, what = problem
        issues.bad(reason, f"{where}: image {path} {what}; restore the file")
    return problem is None


def _checked_box(path: Path, box: tuple[int, int, int, int], where: str,
                 issues: _Issues) -> tuple[int, int, int, int] | None:
    """The face box (left, top, right, bottom) clipped to the image; None (reported) if the image does
    not look whole or nothing of the box is inside it."""
    if not _checked(path, where, issues):
        return None
    size = _image_size(path)
    if size is None:
        issues.bad("corrupt image", f"{where}: image {path} has an unreadable header; restore the file")
        return None
    height, width = size
    left, top, right, bottom = max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)
    if right <= left or bottom <= top:
        issues.bad("face box outside the image",
                   f"{where}: face box {box} lies outside the {width} x {height} image {path}; fix the row")
        return None
    return left, top, right, bottom


# ---------------------------------------------------------------------------------------------------
# FERPlus

FERPLUS_FOLDERS = {  # split -> folder under the FERPlus root
    "train": "FER2013Train", "valid": "FER2013Valid", "test": "FER2013Test"}
_FERPLUS_EXPECTS = "the folder holding FER2013Train/, FER2013Valid/ and FER2013Test/ (FERPlus layout)"
_FERPLUS_FIELDS = 12  # image name, face box, then votes: the 8 emotions in CLASSES order, unknown, NF
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


def _read_ferplus(root: Path, split: str, issues: _Issues, label_mode: str = "majority") -> list[Record]:
    if label_mode not in FERPLUS_LABEL_MODES:
        raise ValueError(f"open_dataset: ferplus label_mode must be one of {FERPLUS_LABEL_MODES}, "
                         f"got {label_mode!r}")
    folder = _need(root / FERPLUS_FOLDERS[split], f"the {split} split's folder", "ferplus", _FERPLUS_EXPECTS)
    listing = _need(folder / "label.csv", "the label list", "ferplus", _FERPLUS_EXPECTS)
    records = []
    for line, row in _csv_rows(listing):
        where = f"{listing} line {line}"
        if len(row) != _FERPLUS_FIELDS:
            issues.bad("malformed row", f"{where}: expected {_FERPLUS_FIELDS} fields (image name, \"(x, y, w, h)\" "
                                        f"box, 10 vote counts), found {len(row)}; fix the row")
            continue
        name, box_text, vote_text = row[0], row[1], row[2:]
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
        box = _checked_box(path, (x, y, x + w, y + h), where, issues)
        if box is not None:
            records.append(Record(str(path), target[0], target[1], box, "ferplus"))
    return records


# ---------------------------------------------------------------------------------------------------
# AffectNet

_AFFECTNET_LISTS = {"train": "training.csv", "val": "validation.csv"}
_AFFECTNET_EXPECTS = "the folder holding Manually_Annotated_file_lists/ and Manually_Annotated_Images/ (AffectNet)"
_AFFECTNET_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression")
# AffectNet's codes: 0 Neutral, 1 Happy, 2 Sad, 3 Surprise, 4 Fear, 5 Disgust, 6 Anger, 7 Contempt
_AFFECTNET_CLASSES = {0: 0, 1: 1, 2: 3, 3: 2, 4: 6, 5: 5, 6: 4, 7: 7}
_AFFECTNET_DROPPED = {8: "code 8 (None)", 9: "code 9 (Uncertain)", 10: "code 10 (No-Face)"}


def _read_affectnet(root: Path, split: str, issues: _Issues) -> list[Record]:
    listing = _need(root / "Manually_Annotated_file_lists" / _AFFECTNET_LISTS[split], f"the {split} list",
                    "affectnet", _AFFECTNET_EXPECTS)
    images = _need(root / "Manually_Annotated_Images", "the image folder", "affectnet", _AFFECTNET_EXPECTS)
    column, rows = _table_rows(listing, _AFFECTNET_COLUMNS, issues)
    records = []
    for where, row in rows:
        code = row[column["expression"]]
        if code.isdigit() and int(code) in _AFFECTNET_DROPPED:
            issues.drop(_AFFECTNET_DROPPED[int(code)])
            continue
        if not (code.isdigit() and int(code) in _AFFECTNET_CLASSES):
            issues.bad("unknown label", f"{where}: expression {code!r} is not an AffectNet code 0-10; fix the row")
            continue
        try:
            x, y, w, h = (int(row[column[c]]) for c in _AFFECTNET_COLUMNS[1:5])
        except ValueError:
            issues.bad("malformed row", f"{where}: the face box {[row[column[c]] for c in _AFFECTNET_COLUMNS[1:5]]} "
                                        f"is not 4 integers; fix the row")
            continue
        path = images / row[column["subDirectory_filePath"]]
        # PIL's crop, as the authors' code used it, wants (left, top, right, bottom), not (x, y, w, h)
        box = _checked_box(path, (x, y, x + w, y + h), where, issues)
        if box is not None:
            records.append(Record(str(path), _AFFECTNET_CLASSES[int(code)], None, box, "affectnet"))
    return records


# ---------------------------------------------------------------------------------------------------
# RAF-DB (basic)

_RAFDB_EXPECTS = "RAF-DB's basic/ folder, holding EmoLabel/list_patition_label.txt and Image/aligned/"
# RAF-DB's labels: 1 Surprise, 2 Fear, 3 Disgust, 4 Happiness, 5 Sadness, 6 Anger, 7 Neutral
_RAFDB_CLASSES = {1: 2, 2: 6, 3: 5, 4: 1, 5: 3, 6: 4, 7: 0}


def _read_rafdb(root: Path, split: str, issues: _Issues) -> list[Record]:
    # "patition" is the file's own spelling
    listing = _need(root / "EmoLabel" / "list_patition_label.txt", "the label list", "rafdb", _RAFDB_EXPECTS)
    images = _need(root / "Image" / "aligned", "the aligned image folder", "rafdb", _RAFDB_EXPECTS)
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
        if not (code.isdigit() and int(code) in _RAFDB_CLASSES):
            issues.bad("unknown label", f"{where}: label {code!r} is not a RAF-DB basic label 1-7; fix the line")
            continue
        stem, dot, extension = name.rpartition(".")
        path = images / f"{stem}_aligned{dot}{extension}"
        if _checked(path, where, issues):
            records.append(Record(str(path), _RAFDB_CLASSES[int(code)], None, None, "rafdb"))
    return records


# ---------------------------------------------------------------------------------------------------
# facial_expressions (muxspace)

_FE_EXPECTS = "the facial_expressions repository folder, holding data/legend.csv and images/"
_FE_CLASSES = {name: CLASSES.index(c) for name, c in {
    "neutral": "neutral", "happiness": "happy", "surprise": "surprise", "sadness": "sad", "anger": "anger",
    "disgust": "disgust", "fear": "fear", "contempt": "contempt",
    # older aliases that appear in the set's history
    "angry": "anger", "surprised": "surprise", "disgusted": "disgust", "fearful": "fear", "sad": "sad",
}.items()}


def _read_facial_expressions(root: Path, split: str, issues: _Issues) -> list[Record]:
    legend = _need(root / "data" / "legend.csv", "the label list", "facial_expressions", _FE_EXPECTS)
    images = _need(root / "images", "the image folder", "facial_expressions", _FE_EXPECTS)
    column, rows = _table_rows(legend, ("image", "emotion"), issues)
    labels: dict[str, tuple[int, str]] = {}  # image -> (label, where its first row is); dicts keep row order
    conflicting: set[str] = set()
    for where, row in rows:
        name, emotion = row[column["image"]], row[column["emotion"]]
        label = _FE_CLASSES.get(emotion.lower())
        if label is None:
            issues.bad("unknown label", f"{where}: emotion {emotion!r} is not one of {sorted(_FE_CLASSES)} (any case); "
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
        if name not in conflicting and _checked(path, where, issues):
            records.append(Record(str(path), label, None, None, "facial_expressions"))
    return records


_LAYOUTS = {
    "affectnet": _Layout(_read_affectnet, ("train", "val"), (), _AFFECTNET_EXPECTS),
    "ferplus": _Layout(_read_ferplus, tuple(FERPLUS_FOLDERS), ("label_mode",), _FERPLUS_EXPECTS),
    "rafdb": _Layout(_read_rafdb, ("train", "test"), (), _RAFDB_EXPECTS,
                     present_classes=tuple(sorted(_RAFDB_CLASSES.values()))),
    "facial_expressions": _Layout(_read_facial_expressions, ("train",), (), _FE_EXPECTS),
}
