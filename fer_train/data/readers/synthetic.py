"""The built-in synthetic set: cartoon faces drawn with torch ops, one expression per class, so that the
whole training engine runs (and can be seen to learn) without any data on disk.

Each class is a set of facial features (eye opening, brow height and tilt, mouth curve, opening, width
and a one-sided smirk; EXPRESSIONS). Every sample jitters those features and draws its own pose (position,
scale, rotation), face shape, skin tone, background, lighting and noise, so the class is in the shapes
and where they are relative to each other, and no single pixel gives it away. A sample is a pure
function of (seed, split, index): the same on every run.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torchvision.io import encode_png

from fer_train.data.base import CLASSES, FERDataset, Record

SPLIT_LENGTHS = {"train": 8000, "val": 1000, "test": 1000}
OPTIONS = ("size", "length", "seed")  # what open_dataset("synthetic", ...) passes on to open_synthetic

# Per class: eye opening, brow raise, brow inner-end raise (tilt), mouth curve (+ smile, - frown),
# mouth opening, mouth width, smirk (right corner up). Each sample adds N(0, FEATURE_JITTER) to each.
EXPRESSIONS = torch.tensor([
    # eyes  brow  tilt  curve  open  width smirk
    [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0],     # neutral
    [0.7, 0.1, 0.0, 1.0, 0.3, 1.15, 0.0],    # happy: smile, narrowed eyes
    [1.6, 1.0, 0.0, 0.0, 1.0, 0.6, 0.0],     # surprise: wide eyes, raised brows, round open mouth
    [0.8, 0.0, 0.9, -0.9, 0.0, 0.9, 0.0],    # sad: inner brows up, frown
    [0.8, -0.6, -1.0, -0.3, 0.0, 0.85, 0.0],  # anger: brows down and drawn in, tight mouth
    [0.5, -0.3, -0.5, -0.6, 0.4, 1.0, 0.0],  # disgust: squint, lowered brows, open downturned mouth
    [1.5, 0.7, 0.9, -0.3, 0.6, 1.2, 0.0],    # fear: wide eyes, inner brows up, stretched open mouth
    [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0],     # contempt: one-sided smirk
], dtype=torch.float64)
FEATURE_JITTER = 0.12


def sample_seed(seed: int, split: str, index: int) -> int:
    """The generator seed of one sample: a hash, so splits and neighbouring indices share no stream."""
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def draw_face(label: int, generator: torch.Generator, size: int = 64) -> torch.Tensor:
    """uint8 3 x size x size: one face showing class `label`, every free parameter drawn from `generator`."""

    def uniform(low, high, n=()):
        return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)

    features = EXPRESSIONS[label] + FEATURE_JITTER * torch.randn(7, generator=generator, dtype=torch.float64)
    eyes, brow, tilt, curve, opening, width, smirk = features.tolist()

    # Face coordinates: the face spans about [-1, 1] in both axes, v pointing down.
    axis = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    cx, cy = uniform(-0.12, 0.12).item(), uniform(-0.12, 0.12).item()
    scale = uniform(0.72, 0.92).item()
    angle = math.radians(uniform(-15.0, 15.0).item())
    cos, sin = math.cos(angle), math.sin(angle)
    u = ((x - cx) * cos + (y - cy) * sin) / scale
    v = (-(x - cx) * sin + (y - cy) * cos) / scale
    pixel = 2 / size / scale  # one pixel in face units: the width of the anti-aliased edges

    def cover(distance):
        """Pixel coverage from a signed distance (negative inside), one pixel of soft edge."""
        return (0.5 - distance / pixel).clamp(0, 1)

    def ellipse(cu, cv, ru, rv):
        # scaled distance times the smaller radius: approximate, exact on circles, fine for small shapes
        return (torch.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2) - 1) * min(ru, rv)

    def segment(u0, v0, u1, v1, half_width):
        du, dv = u1 - u0, v1 - v0
        t = (((u - u0) * du + (v - v0) * dv) / (du * du + dv * dv)).clamp(0, 1)
        return torch.sqrt((u - u0 - t * du) ** 2 + (v - v0 - t * dv) ** 2) - half_width

    skin = torch.tensor([0.95, 0.78, 0.66], dtype=torch.float64) * uniform(0.45, 1.05).item()
    skin = (skin + uniform(-0.05, 0.05, 3)).clamp(0, 1)
    background = uniform(0.0, 1.0, 3)
    dark = skin * uniform(0.15, 0.35).item()
    white = torch.full((3,), 0.95, dtype=torch.float64)
    image = background[:, None, None].expand(3, size, size)
    image = _paint(image, cover(ellipse(0, 0, uniform(0.62, 0.78).item(), 0.95)), skin)
    image = _paint(image, 0.5 * cover(segment(0, 0.02, 0, 0.2, 0.035)), dark)  # nose shadow, in every class

    eye_height = max(0.065 * eyes, 0.012)
    for side in (-1, 1):
        eye = ellipse(0.3 * side, -0.12, 0.13, eye_height)
        image = _paint(image, cover(eye), white)
        iris = torch.maximum(ellipse(0.3 * side, -0.12, 0.055, 0.055), eye)  # the iris, clipped by the lids
        image = _paint(image, cover(iris), dark * 0.5)
        brow_v = -0.3 - 0.09 * brow
        brow_line = segment(0.12 * side, brow_v - 0.07 * tilt, 0.44 * side, brow_v + 0.03 * tilt, 0.03)
        image = _paint(image, cover(brow_line), dark)

    # Mouth: a lip line that bends with `curve` (corners up for a smile) and `smirk` (right corner only),
    # over an opening between it and a lower lip `opening` deep at the middle.
    half_width = 0.26 * max(width, 0.3)
    t = (u / half_width).clamp(-1, 1)
    lip = 0.47 - 0.1 * curve * (t * t - 0.3) - 0.12 * smirk * t.clamp(min=0) ** 2
    lower = lip + 0.2 * max(opening, 0) * (1 - t * t)
    outside = u.abs() - half_width
    line = torch.maximum((v - lip).abs() - 0.025, outside)
    mouth = torch.minimum(line, torch.maximum(torch.maximum(lip - v, v - lower), outside))
    image = _paint(image, cover(mouth), dark * 0.7)

    light = uniform(0, 2 * math.pi).item()  # direction of a linear lighting gradient
    image = image * (1 + uniform(0.0, 0.35).item() * (x * math.cos(light) + y * math.sin(light)))
    image = image + uniform(0.01, 0.06).item() * torch.randn(3, size, size, generator=generator, dtype=torch.float64)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def _paint(image: torch.Tensor, coverage: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """image with `colour` laid over it where coverage is 1, blended where it is between 0 and 1."""
    return image + coverage * (colour[:, None, None] - image)


class SyntheticDataset(FERDataset):
    """Drawn faces: sample i of a split shows class i % 8 (so every class is equally frequent), drawn
    from the generator seeded by (seed, split, i). Records have no path; encoded() gives a PNG."""

    def __init__(self, split: str, size: int, length: int, seed: int, on_error: str):
        records = [Record(None, i % len(CLASSES), None, None, "synthetic") for i in range(length)]
        super().__init__("synthetic", split, records, on_error=on_error)
        self.size, self.seed = size, seed
        self._draws = list(range(length))  # the sample index each record is drawn from (subsets keep theirs)

    def image(self, i: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.split, self._draws[i]))
        return draw_face(self.records[i].label, generator, self.size)

    def encoded(self, i: int) -> bytes:
        return encode_png(self.image(i)).numpy().tobytes()

    def sample_id(self, i: int) -> str:
        return str(self._draws[i])

    def subset(self, indices) -> SyntheticDataset:
        part = super().subset(indices)
        part._draws = [self._draws[i] for i in indices]
        return part


def open_synthetic(split: str, *, on_error: str = "raise", size: int = 64, length: int | None = None,
                   seed: int = 0) -> SyntheticDataset:
    """The synthetic set's split "train", "val" (or "valid") or "test"; length defaults to SPLIT_LENGTHS."""
    split = "val" if split == "valid" else split
    if split not in SPLIT_LENGTHS:
        raise ValueError(f"open_dataset: synthetic has the splits {tuple(SPLIT_LENGTHS)}, not {split!r}")
    if size < 16:
        raise ValueError(f"open_dataset: synthetic size must be at least 16 pixels for the features to show, "
                         f"got {size}")
    length = SPLIT_LENGTHS[split] if length is None else length
    if length < 1:
        raise ValueError(f"open_dataset: synthetic length must be at least 1, got {length}")
    return SyntheticDataset(split, size, length, seed, on_error)
