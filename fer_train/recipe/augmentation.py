"""The augmentation recipe (docs/method.md section 6): the paper's parameters, and how each sample's are drawn.

The transforms (face crop, resize the shorter side to 256, centre-crop 224, horizontal flip, colour jitter,
rotation and shear with a mirrored border, ImageNet normalisation) are composed into one 2 x 3 matrix per
image that maps each output pixel straight to its source position in the whole decoded image, plus four
colour factors; fer_kernels.augment then writes the batch in one pass. The border is mirrored about the
edges of the whole image, so around a face box the kernel sees the real surroundings.

    keys = sample_keys(seed, epoch, indices)                     # per-sample random keys
    params = sample_params(boxes, train=True, keys=keys)         # per-image matrices and colour factors
    batch = apply(images, params)                                # N x 3 x 224 x 224, float
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import fer_kernels
from fer_kernels import reference

__all__ = ["AugmentConfig", "AugmentParams", "apply", "full_boxes", "resized_side", "sample_keys", "sample_params"]


def resized_side(size: int, crop: float) -> int:
    """The side the face's shorter side is resized to so that the centre size x size crop is `crop` of it
    (data.crop): the paper's 256 for 224 (crop 0.875); crop 1 keeps the whole face box."""
    return round(size / crop)


@dataclass(frozen=True)
class AugmentConfig:
    """docs/method.md section 6. Colour factors are drawn from [1 - v, 1 + v], the hue shift from [-hue, hue] (of the
    hue circle), angles in degrees from [-a, a]; eval takes none of the random parts. zoom and translate are not
    the paper's (it has neither; 0 keeps them off): a magnification drawn from [1 - zoom, 1 + zoom] about the
    crop's centre and a shift of the face by up to `translate` of the output side along each axis, the random
    crops that small-input recipes train with (data.zoom, data.translate)."""

    out_size: int = 224
    resize: int = 256  # resized_side(out_size, data.crop)
    flip: float = 0.5
    rotation: float = 15.0
    shear: float = 15.0
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.05
    hue: float = 0.05
    zoom: float = 0.0
    translate: float = 0.0
    mean: tuple[float, float, float] = reference.IMAGENET_MEAN
    std: tuple[float, float, float] = reference.IMAGENET_STD


@dataclass
class AugmentParams:
    """Per image: `matrices` N x 2 x 3 (output pixel -> source pixel, float32) and `colour` N x 4
    (brightness, contrast, saturation factors and hue shift)."""

    matrices: torch.Tensor
    colour: torch.Tensor
    config: AugmentConfig


def sample_keys(seed: int, epoch: int, indices: torch.Tensor | list,
                repeats: torch.Tensor | list | None = None) -> torch.Tensor:
    """One 64-bit key per sample from (seed, epoch, sample index, and with class-balanced sampling the
    number of earlier draws of that sample in the epoch, EpochOrder.repeats): the draws of a sample depend on
    these alone, so every pipeline, worker count and resumed run gives a sample the same augmentation, and a
    sample drawn again in an epoch gets new draws. A first draw's key (repeat 0) is the one without
    repeats."""
    indices = torch.as_tensor(indices, dtype=torch.int64)
    keys = _mix(_mix(torch.full_like(indices, seed) ^ _mix(torch.full_like(indices, epoch) + 0x632BE59BD9B4E019))
                ^ indices)
    if repeats is None:
        return keys
    repeats = torch.as_tensor(repeats, dtype=torch.int64)
    return torch.where(repeats == 0, keys, _mix(keys ^ _mix(repeats)))


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic): a well-mixed hash of each value."""
    z = z + -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit value
    z = (z ^ _shr(z, 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    z = (z ^ _shr(z, 27)) * -7723592293110705685  # 0x94D049BB133111EB
    return z ^ _shr(z, 31)


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 values."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _uniforms(keys: torch.Tensor, count: int) -> torch.Tensor:
    """N x count uniforms in [0, 1) from the samples' keys (53-bit, float64)."""
    draws = _mix(keys[:, None] ^ _mix(torch.arange(1, count + 1, dtype=torch.int64))[None, :])
    return _shr(draws, 11).double() * 2.0 ** -53


def full_boxes(sizes: torch.Tensor | list) -> torch.Tensor:
    """(left, top, right, bottom) boxes covering whole images of the given (height, width) sizes."""
    sizes = torch.as_tensor(sizes, dtype=torch.float64).reshape(-1, 2)
    zeros = torch.zeros_like(sizes[:, 0])
    return torch.stack([zeros, zeros, sizes[:, 1], sizes[:, 0]], 1)


def sample_params(boxes: torch.Tensor | list, train: bool, keys: torch.Tensor | None = None,
                  config: AugmentConfig = AugmentConfig()) -> AugmentParams:
    """Parameters for sources whose faces lie in `boxes` (N x 4: left, top, right, bottom, in source
    pixels; full_boxes() for whole images). train: random draws from `keys` (sample_keys()); eval: none."""
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    n = boxes.shape[0]
    left, top = boxes[:, 0], boxes[:, 1]
    w, h = boxes[:, 2] - left, boxes[:, 3] - top
    if (w <= 0).any() or (h <= 0).any():
        raise ValueError(f"sample_params: empty boxes at {torch.nonzero((w <= 0) | (h <= 0)).flatten().tolist()}")
    s = float(config.out_size)
    scale = config.resize / torch.minimum(h, w)  # source pixels -> resized pixels
    crop_x, crop_y = (w * scale - s) / 2, (h * scale - s) / 2
    if train:
        if keys is None or len(keys) != n:
            raise ValueError(f"sample_params: training needs one key per box ({n}), from sample_keys()")
        r = _uniforms(torch.as_tensor(keys, dtype=torch.int64), 10)  # a column's draws do not depend on the count
        spread = lambda column, bound, centre=0.0: centre + bound * (2 * r[:, column] - 1)  # noqa: E731
        flip = r[:, 0] < config.flip
        theta = torch.deg2rad(spread(1, config.rotation))
        shear = torch.deg2rad(spread(2, config.shear))
        colour = torch.stack([spread(3, config.brightness, 1.0), spread(4, config.contrast, 1.0),
                              spread(5, config.saturation, 1.0), spread(6, config.hue)], 1)
        zoom = spread(7, config.zoom, 1.0)
        move = torch.stack([spread(8, config.translate), spread(9, config.translate)], -1) * s
    else:
        flip = torch.zeros(n, dtype=torch.bool)
        theta = shear = torch.zeros(n, dtype=torch.float64)
        zoom, move = torch.ones(n, dtype=torch.float64), torch.zeros(n, 2, dtype=torch.float64)
        colour = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64).expand(n, 4)
    # Output pixel centre o = (u + 1/2, v + 1/2). The crop was zoomed, rotated and sheared about its centre c by
    # F = zoom R(theta) @ [[1, tan(shear)], [0, 1]] after an optional flip, then moved by t: o = F (a - c) + c + t,
    # a = flipped crop point; so a = F^-1 (o - c - t) + c, the crop point is a (x mirrored if flipped), the source
    # point is box corner + (crop point + crop offset) / scale, and its index coordinate is that minus 1/2.
    cos, sin, tan = torch.cos(theta), torch.sin(theta), torch.tan(shear)
    forward = torch.stack([torch.stack([cos, cos * tan - sin], -1), torch.stack([sin, sin * tan + cos], -1)], -2)
    inverse = torch.linalg.inv(forward * zoom[:, None, None])  # N x 2 x 2
    centre = torch.full((n, 2), s / 2, dtype=torch.float64)
    shift = (inverse @ (0.5 - centre - move)[..., None])[..., 0] + centre  # a(u, v) = inverse @ (u, v) + shift
    lin = inverse.clone()
    lin[:, 0, :] *= torch.where(flip, -1.0, 1.0)[:, None]  # flipped: a_x -> s - a_x
    shift[:, 0] = torch.where(flip, s - shift[:, 0], shift[:, 0])
    offset = torch.stack([crop_x, crop_y], -1)
    matrices = torch.cat([lin, (shift + offset)[..., None]], -1) / scale[:, None, None]
    matrices[:, 0, 2] += left - 0.5
    matrices[:, 1, 2] += top - 0.5
    return AugmentParams(matrices.float(), colour.float(), config)


def apply(images: list[torch.Tensor], params: AugmentParams, out_dtype: torch.dtype = torch.float32,
          channels_last: bool = False, backend: str | None = None) -> torch.Tensor:
    """The augmented, normalised batch N x 3 x S x S (channels_last: stored NHWC) of uint8 C x H x W sources
    (C = 1 or 3, any strides: CHW or HWC storage), by fer_kernels.augment (backend: as its)."""
    if len(images) != params.matrices.shape[0]:
        raise ValueError(f"augment: {len(images)} images but parameters for {params.matrices.shape[0]}")
    c = params.config
    return fer_kernels.augment(images, params.matrices, params.colour, c.out_size, c.mean, c.std, out_dtype,
                               channels_last, backend)
