"""Mish forward and backward in Triton: flat, memory-bound passes over a dense buffer."""

import torch
import triton
import triton.language as tl

from fer_kernels.triton.math import load_math, mish_derivative, mish_forward

# 2048 elements per program, 4 warps: 16 elements (four 16-byte fp32 accesses) per thread. Not tuned yet;
# benchmarks/bench_mish.py measures it.
BLOCK = 2048
NUM_WARPS = 4


@triton.jit
def _mish_forward_kernel(x_ptr, y_ptr, n, COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = load_math(x_ptr, offs, mask, COMPUTE_F64)
    tl.store(y_ptr + offs, mish_forward(x).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mish_backward_kernel(dy_ptr, x_ptr, dx_ptr, n, COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = load_math(x_ptr, offs, mask, COMPUTE_F64)
    dy = load_math(dy_ptr, offs, mask, COMPUTE_F64)
    tl.store(dx_ptr + offs, (dy * mish_derivative(x)).to(dx_ptr.dtype.element_ty), mask=mask)


def mish_forward_triton(x: torch.Tensor) -> torch.Tensor:
    """x dense (any strides without gaps); the result has x's strides."""
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        _mish_forward_kernel[(triton.cdiv(n, BLOCK),)](x, y, n, COMPUTE_F64=x.dtype == torch.float64, BLOCK=BLOCK,
                                                        num_warps=NUM_WARPS)
    return y


def mish_backward_triton(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad and x dense with the same strides; the result has x's strides."""
    dx = torch.empty_like(x)
    n = x.numel()
    if n:
        _mish_backward_kernel[(triton.cdiv(n, BLOCK),)](grad, x, dx, n, COMPUTE_F64=x.dtype == torch.float64,
                                                         BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dx
