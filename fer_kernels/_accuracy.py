"""The accuracy rule every fast path meets, in the test suite and in auto's check of a kernel before it is
trusted (fer_kernels/_dispatch.py): after flash-attention's, the error against a float64 reference may be
at most twice the error plain PyTorch makes in the same precision, plus one rounding of the storage dtype."""

from __future__ import annotations

import torch

__all__ = ["ATOL", "half_to_float", "math_dtype", "to_float64", "tolerance_excess", "within_tolerance"]

# Differences below these are rounding noise of the storage format.
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def tolerance_excess(ours: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor,
                     dtype: torch.dtype | None = None) -> str | None:
    """The accuracy rule of the test suite and of auto's check (after flash-attention's): a result's error
    against the float64 reference may be at most twice the error plain PyTorch makes in the same dtype,
    plus one rounding of the storage dtype (eps * |value|) and a small absolute floor; NaN and inf must sit
    where the reference has them. Returns what is wrong, or None.

    ours: the result; ref64: the reference in float64; plain: the reference in ours' precision. dtype: the
    precision the result was computed from when it differs from its storage.
    """
    if ours.shape != ref64.shape:
        return f"shape {tuple(ours.shape)} instead of {tuple(ref64.shape)}"
    ours64, plain64 = ours.detach().double(), plain.detach().double()
    nan = torch.isnan(ref64)
    if not torch.equal(torch.isnan(ours64), nan):
        return "NaN where the reference has none, or none where it has"
    infinite = ~torch.isfinite(ref64) & ~nan
    if not torch.equal(ours64[infinite], ref64[infinite]):
        return "infinities differ from the reference's"
    finite = torch.isfinite(ref64)
    if not finite.any():
        return None
    both = finite & torch.isfinite(plain64)
    plain_err = (plain64[both] - ref64[both]).abs().max().item() if both.any() else 0.0
    dtype = dtype or ours.dtype
    excess = ((ours64[finite] - ref64[finite]).abs() - torch.finfo(dtype).eps * ref64[finite].abs()).max().item()
    bound = 2 * plain_err + ATOL[dtype]
    if not excess <= bound:  # also catches NaN at a finite reference value
        return (f"max error beyond one rounding {excess:.3g} > 2 x plain PyTorch's error {plain_err:.3g} + "
                f"{ATOL[dtype]:g}")
    return None


def within_tolerance(pairs) -> str | None:
    """The first failure of tolerance_excess over (name, ours, ref64, plain) tuples, or None."""
    for name, ours, ref64, plain in pairs:
        error = tolerance_excess(ours, ref64, plain)
        if error is not None:
            return f"{name}: {error}"
    return None


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision every backend computes and keeps statistics and optimizer state in for a tensor of
    `dtype`: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def half_to_float(t):
    """float16/bfloat16 tensors widened to float32 (the math precision of every backend); others as given."""
    return t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t


def to_float64(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
