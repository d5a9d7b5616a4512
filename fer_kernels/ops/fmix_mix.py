"""fer_kernels.fmix_mix: FMix's mix ``m * x + (1 - m) * x[perm]`` as one op of the registry.

"triton" and "cpu" (the C++ twin, csrc/cpu/fmix_mix.cpp) are one pass over the batch (NCHW or channels-last)
and have no backward; "reference" is fer_kernels.reference.fmix_mix in eager torch. How lambda, the masks and
the permutation are drawn, and the loss, are the training recipe's business (fer_train.recipe.fmix).
"""

from __future__ import annotations

import torch

from fer_kernels import reference
from fer_kernels._accuracy import half_to_float, math_dtype, to_float64, within_tolerance
from fer_kernels._dispatch import Inputs, Op, extension, requested
from fer_kernels.ops._layout import is_channels_last

__all__ = ["MIX_DTYPES", "check_mix", "fmix_mix", "mix"]

MIX_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8)


def _reference(x, mask, perm, channels_last):
    return torch.empty_like(x).copy_(reference.fmix_mix(half_to_float(x), mask, perm))


def _dense(x, mask, perm, channels_last):
    """The arguments as the one-pass kernels read them: x dense in its layout, the mask in x's math dtype,
    perm int64, all contiguous."""
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return x, mask.to(math_dtype(x.dtype)).contiguous(), perm.to(torch.int64).contiguous()


def _triton(x, mask, perm, channels_last):
    from fer_kernels.triton.fmix import fmix_mix_triton
    return fmix_mix_triton(*_dense(x, mask, perm, channels_last), channels_last)


_MIX_CPU = extension("fmix_mix_cpu")


def _cpu(x, mask, perm, channels_last):
    return _MIX_CPU(*_dense(x, mask, perm, channels_last))


def _no_backward(inputs: Inputs) -> str | None:
    if inputs.requires_grad:
        return ("the fused mix has no backward and x requires grad; use backend='reference' (plain autograd) or "
                "x.detach()")
    return None


def _verify(stage, args, out):
    x, mask, perm, _ = args
    if not x.is_floating_point():  # uint8 with a binary mask: an exact selection
        want = reference.fmix_mix(x, mask, perm)
        return None if torch.equal(out, want) else "uint8 result differs from the reference"
    ref64 = reference.fmix_mix(to_float64(x), mask, perm)
    return within_tolerance([("fmix_mix", out, ref64, reference.fmix_mix(x, mask, perm))])


MIX = Op("fmix_mix", verify=_verify)
MIX.implement("triton", supports=_no_backward, mix=_triton)
MIX.implement("cpu", supports=_no_backward, mix=_cpu)
MIX.implement("reference", mix=_reference)


def check_mix(x, mask, perm, op: str = "fmix_mix") -> None:
    """Shapes, dtypes and devices of a mix's arguments; the error names the argument."""
    for name, t in (("x", x), ("mask", mask), ("perm", perm)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be N x C x H x W, got shape {tuple(x.shape)}")
    if x.dtype not in MIX_DTYPES:
        raise TypeError(f"{op}: x must be float16, bfloat16, float32, float64 or uint8, got {x.dtype}")
    n, _, h, w = x.shape
    if tuple(mask.shape) not in ((h, w), (n, h, w)):
        raise ValueError(f"{op}: mask must be H x W = {(h, w)} (one for the batch) or N x H x W = {(n, h, w)} "
                         f"(one per sample) for x of shape {tuple(x.shape)}, got {tuple(mask.shape)}")
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise TypeError(f"{op}: mask must be a floating-point or bool tensor, got {mask.dtype}")
    if perm.shape != (n,) or perm.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: perm must be {n} int64 indices into the batch, got shape {tuple(perm.shape)} "
                         f"and dtype {perm.dtype}")
    for name, t in (("mask", mask), ("perm", perm)):
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def mix(x: torch.Tensor, mask: torch.Tensor, perm: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """fmix_mix without its argument checks (for callers that made x, mask and perm themselves)."""
    inputs = Inputs(x.device, x.dtype, "channels_last" if is_channels_last(x) else "nchw",
                    requires_grad=torch.is_grad_enabled() and x.requires_grad, size=(x.numel(),))
    if x.numel() == 0:
        requested("fmix_mix", backend)
        return torch.empty_like(x)
    return MIX("mix", backend, inputs, x, mask, perm, inputs.layout == "channels_last")


def fmix_mix(x: torch.Tensor, mask: torch.Tensor, perm: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """FMix's mix, out = m * x + (1 - m) * x[perm], the mask broadcast over the channels
    (docs/method.md section 5).

    x: N x C x H x W, float16, bfloat16, float32, float64 or uint8, NCHW or channels-last (the result keeps
    the layout); mask: H x W (shared by the batch) or N x H x W (one per sample), float or bool, values in
    [0, 1]; perm: N int64 indices in [0, N), normally torch.randperm(N). Half-precision inputs compute in
    float32, uint8 rounds half up: with FMix's binary masks every output element is an exact copy of x's.

    backend: None/"auto" (one pass over x: the Triton kernel for CUDA tensors, the C++ twin for CPU tensors
    when the extension is built; the reference for an x that requires grad: the kernels have no backward),
    "triton" (also on CPU tensors under TRITON_INTERPRET=1), "cpu" or "reference". Checking that perm's
    indices are in range costs one host sync on a GPU; fer_train's FMix calls mix() instead, its perm is a
    randperm.
    """
    check_mix(x, mask, perm)
    if perm.numel() and bool(((perm < 0) | (perm >= x.shape[0])).any()):
        raise ValueError(f"fmix_mix: perm must hold indices in [0, {x.shape[0]}), got values from "
                         f"{int(perm.min())} to {int(perm.max())}")
    return mix(x, mask, perm, backend)
