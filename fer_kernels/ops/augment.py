"""fer_kernels.augment: the fused augmentation pass, one op of the registry.

Each output pixel of a batch is mapped to its source position by the sample's 2 x 3 matrix (any geometry:
face crop, resize, centre crop, flip, rotation, shear), the source (uint8, any size, grey or RGB, CHW or HWC
storage, a view of a larger image) is sampled bilinearly with a mirrored border, then brightness, contrast,
saturation and hue are applied and the result normalised: one pass, no intermediate image. What the
matrices and colour factors are is the training recipe's business (fer_train.recipe.augmentation).

The specification is fer_kernels.reference.augment; "triton" serves CUDA tensors, "cpu" (the C++ twin,
csrc/cpu/augment.cpp) CPU tensors, "reference" runs the specification image by image (in float32, float64
for float64 output) on any device.
"""

from __future__ import annotations

import torch

from fer_kernels import reference
from fer_kernels._accuracy import math_dtype
from fer_kernels._dispatch import Inputs, Op, extension, lazy, requested

__all__ = ["augment"]

# Largest difference from the float64 specification that auto's check accepts, per output dtype. The
# kernel computes source positions in float32: for sources of a few thousand pixels they are off by up to
# ~2e-4 pixel, which at a hard edge (255 levels per pixel) moves a normalised value by up to ~1e-3; half
# precision adds one rounding of values up to about 2.7. A wrong kernel (a flip, a channel, a colour step)
# is off by tenths or more.
_TOLERANCE = {torch.float64: 2e-3, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
_CHECKED_IMAGES = 4  # the check recomputes only the first few images of the batch in float64


def _reference(images, matrices, colour, out, mean, std):
    for i, image in enumerate(images):
        out[i] = reference.augment(image, matrices[i], colour[i], out.shape[-1], mean, std,
                                   dtype=math_dtype(out.dtype))
    return out


def _verify(stage, args, out):
    images, matrices, colour, _, mean, std = args
    worst = 0.0
    for i, image in enumerate(images[:_CHECKED_IMAGES]):
        want = reference.augment(image, matrices[i], colour[i], out.shape[-1], mean, std, dtype=torch.float64)
        worst = max(worst, (out[i].double() - want).abs().max().item())
    bound = _TOLERANCE[out.dtype]
    return None if worst <= bound else f"max difference {worst:.3g} from the float64 specification > {bound:g}"


AUGMENT = Op("augment", verify=_verify)
AUGMENT.implement("triton", warp=lazy("fer_kernels.triton.augment", "augment_triton"))
AUGMENT.implement("cpu", warp=extension("augment_cpu"))
AUGMENT.implement("reference", warp=_reference)


def augment(images: list[torch.Tensor], matrices: torch.Tensor, colour: torch.Tensor, size: int,
            mean=reference.IMAGENET_MEAN, std=reference.IMAGENET_STD, out_dtype: torch.dtype = torch.float32,
            channels_last: bool = False, backend: str | None = None) -> torch.Tensor:
    """The augmented, normalised batch N x 3 x size x size (channels_last: stored NHWC) of N uint8 C x H x W
    sources (C = 1 or 3, any strides: CHW or HWC storage), all on one device.

    matrices: N x 2 x 3, output pixel (column u, row v) -> source position in pixel index coordinates;
    colour: N x 4 (brightness, contrast, saturation factors, hue shift as a fraction of the circle), see
    fer_kernels.reference.augment. mean, std: per channel, applied to [0, 1] values.
    backend: None/"auto" (Triton for CUDA tensors, the C++ twin for CPU tensors when the extension is built,
    else the reference), "triton", "cpu" or "reference".
    """
    n = len(images)
    if matrices.shape != (n, 2, 3) or colour.shape != (n, 4):
        raise ValueError(f"augment: {n} images need matrices of shape ({n}, 2, 3) and colour of shape ({n}, 4), got "
                         f"{tuple(matrices.shape)} and {tuple(colour.shape)}")
    for i, image in enumerate(images):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"augment: images[{i}] must be uint8 C x H x W with C 1 or 3, got {image.dtype} "
                             f"{tuple(image.shape)}")
    devices = {image.device for image in images}
    if len(devices) > 1:
        raise ValueError(f"augment: images on several devices {sorted(map(str, devices))}")
    device = images[0].device if images else torch.device("cpu")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(n, 3, size, size, dtype=out_dtype, device=device, memory_format=fmt)
    if n == 0:
        requested("augment", backend)
        return out
    inputs = Inputs(device, out_dtype, "channels_last" if channels_last else "nchw", size=(n * size * size,))
    return AUGMENT("warp", backend, inputs, images, matrices.to(device, torch.float32).contiguous(),
                   colour.to(device, torch.float32).contiguous(), out, tuple(mean), tuple(std))
