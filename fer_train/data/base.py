"""The data types every reader and pipeline shares: the class order, a record per image, one split of a
data set (FERDataset) and several read as one (CombinedDataset)."""

from __future__ import annotations

import bisect
import copy
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, Dataset

from fer_train.data.images import MAX_IMAGE_PIXELS, ImageError, decode
from fer_train.errors import DataError

__all__ = ["ALL_CLASSES", "CLASSES", "CombinedDataset", "FERDataset", "Record", "SKIP_HINT", "unusable"]

CLASSES = ("neutral", "happy", "surprise", "sad", "anger", "disgust", "fear", "contempt")  # docs/method.md section 1
ALL_CLASSES = tuple(range(len(CLASSES)))
SKIP_HINT = "or open the set with on_error='skip' to leave it out"


def unusable(reason: str, message: str) -> str:
    """The message of an image that cannot be used (ImageError: reason, message), with what to do about it."""
    fix = "replace the file or raise data.max_image_pixels" if reason == "image too large" else "restore the file"
    return f"{message}; {fix}, {SKIP_HINT}"


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
    that passed the opening checks but does not load raises DataError (ImageError, with its reason);
    with on_error="skip" the next sample that loads stands in and the image is counted under "unreadable
    image". (The pipelines read through encoded() and decode() themselves and keep their own counts:
    fer_train.data.pipeline.) Images of more than max_image_pixels pixels do not load.
    """

    def __init__(self, name: str, split: str, records: list[Record], *, root: Path | None = None,
                 skipped: Counter | None = None, present_classes: tuple[int, ...] = ALL_CLASSES,
                 on_error: str = "raise", max_image_pixels: int | None = MAX_IMAGE_PIXELS):
        self.name, self.split, self.records, self.root = name, split, records, root
        self.skipped = skipped if skipped is not None else Counter()
        self.present_classes, self.on_error, self.max_image_pixels = present_classes, on_error, max_image_pixels
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
                return self.image(j).expand(3, -1, -1).contiguous(), self.target(j)
            except ImageError as err:
                if self.on_error == "raise":
                    raise ImageError(err.reason, unusable(err.reason, str(err))) from err
                self._unreadable.add(j)
                self.skipped["unreadable image"] = len(self._unreadable)
        raise DataError(f"{self.name} {self.split}: none of its {n} images loads; check the files under "
                        f"{self.root}")

    def image(self, i: int) -> torch.Tensor:
        """Sample i's image, uint8 C x H x W (C = 1 for grey, else 3), cropped to its face box."""
        record = self.records[i]
        image = decode(self.encoded(i), record.path, self.max_image_pixels)
        if record.box is not None:
            left, top, right, bottom = record.box
            image = image[:, top:bottom, left:right]
        return image

    def target(self, i: int) -> torch.Tensor:
        record = self.records[i]
        if record.soft is not None:
            return torch.tensor(record.soft, dtype=torch.float32)
        return torch.tensor(record.label, dtype=torch.int64)

    def encoded(self, i: int) -> bytes:
        """The image file's bytes, as they are on disk (for decoders such as DALI's)."""
        path = self.records[i].path
        try:
            return Path(path).read_bytes()
        except FileNotFoundError as err:
            raise ImageError("missing image", f"{path}: the image has gone (no such file) since the set was "
                                              f"opened") from err
        except OSError as err:
            raise ImageError("unreadable image", f"{path}: cannot read the image ({err.strerror}), which was "
                                                 f"readable when the set was opened") from err

    def locate(self, i: int) -> tuple[FERDataset, int]:
        """(the FERDataset holding sample i, its index there): this set itself (CombinedDataset: a part)."""
        return self, i

    def sample_id(self, i: int) -> str:
        """A name for sample i that is the same on every machine: its path below the data set's root."""
        return Path(self.records[i].path).relative_to(self.root).as_posix()

    def subset(self, indices) -> FERDataset:
        """The same set restricted to `indices`, in that order, with its own (empty) skip counts."""
        part = copy.copy(self)
        part.records = [self.records[i] for i in indices]
        part.skipped, part._unreadable = Counter(), set()
        return part

    def labels(self) -> torch.Tensor:
        """int64 [N]: each sample's hard label (for FERPlus vote distributions, the majority or plurality)."""
        return torch.tensor([r.label for r in self.records], dtype=torch.int64)

    def class_counts(self) -> torch.Tensor:
        """float64 [8]: samples per class, by hard label."""
        return torch.bincount(self.labels(), minlength=len(CLASSES)).double()

    def report(self) -> str:
        """One line: name, split, size, count per class the set can have, items left out by reason."""
        counts = self.class_counts()
        classes = ", ".join(f"{CLASSES[c]} {int(counts[c])}" for c in self.present_classes)
        left_out = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items())) or "none"
        return f"{self.name} {self.split}: {len(self)} images ({classes}); left out: {left_out}"


class CombinedDataset(ConcatDataset):
    """Several FERDatasets read as one (e.g. the training sets of a multi-set run). Nested combined sets
    are flattened, so every part is a FERDataset and locate(i) says where sample i comes from."""

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

    @property
    def present_classes(self) -> tuple[int, ...]:
        return tuple(sorted({c for d in self.datasets for c in d.present_classes}))

    @property
    def skipped(self) -> Counter:
        return sum((d.skipped for d in self.datasets), Counter())

    def labels(self) -> torch.Tensor:
        return torch.cat([d.labels() for d in self.datasets])

    def class_counts(self) -> torch.Tensor:
        return sum(d.class_counts() for d in self.datasets)

    def report(self) -> str:
        """A summary line, then each part's report() line."""
        counts = self.class_counts()
        classes = ", ".join(f"{CLASSES[c]} {int(counts[c])}" for c in self.present_classes)
        lines = [f"{self.name} {self.split}: {len(self)} images from {len(self.datasets)} sets ({classes})"]
        return "\n".join(lines + ["  " + d.report() for d in self.datasets])
