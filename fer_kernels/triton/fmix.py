"""The FMix mix out = m * x + (1 - m) * x[perm] in Triton: one pass over the batch, for NCHW and
channels-last storage.

Each program reads a tile of x, the same tile of the sample's partner x[perm[n]] and the mask (one H x W
mask for the batch, or one per sample), broadcast over the channels, and writes the tile of out. As for
the block tail (fer_kernels/triton/tiles.py), NCHW is walked as [planes, H*W] tiles (plane = n * C + c, so the
partner's plane is p + (perm[n] - n) * C) and channels-last as [H*W rows, C] tiles of one image.
The specification is fer_kernels.reference.fmix_mix.
"""

import torch
import triton
import triton.language as tl

from fer_kernels.triton.math import load_math
from fer_kernels.triton.tiles import NUM_WARPS, nchw_tile, nhwc_tile, tiles_nchw, tiles_nhwc


@triton.jit
def _mix(x_ptr, out_ptr, offs, partner_offs, m, inside, COMPUTE_F64: tl.constexpr, ROUND: tl.constexpr):
    a = load_math(x_ptr, offs, inside, COMPUTE_F64)
    b = load_math(x_ptr, partner_offs, inside, COMPUTE_F64)
    out = m * a + (1.0 - m) * b
    if ROUND:
        out = tl.floor(out + 0.5)  # integer storage: round half up (out is a convex combination, >= 0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _mix_nchw_kernel(x_ptr, m_ptr, perm_ptr, out_ptr, planes, C, HW, PER_SAMPLE: tl.constexpr,
                     COMPUTE_F64: tl.constexpr, ROUND: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr):
    p, hw = nchw_tile(HW, BLOCK_P, BLOCK_HW)
    p_in = p < planes
    hw_in = hw < HW
    inside = p_in[:, None] & hw_in[None, :]
    n = p // C
    partner = tl.load(perm_ptr + n, mask=p_in, other=0)
    offs = p[:, None] * HW + hw[None, :]
    partner_offs = (p + (partner - n) * C)[:, None] * HW + hw[None, :]
    if PER_SAMPLE:
        m = tl.load(m_ptr + n[:, None] * HW + hw[None, :], mask=inside, other=0.0)
    else:
        m = tl.load(m_ptr + hw, mask=hw_in, other=0.0)[None, :]
    _mix(x_ptr, out_ptr, offs, partner_offs, m, inside, COMPUTE_F64, ROUND)


@triton.jit
def _mix_nhwc_kernel(x_ptr, m_ptr, perm_ptr, out_ptr, C, HW, PER_SAMPLE: tl.constexpr, COMPUTE_F64: tl.constexpr,
                     ROUND: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    n, hw, c = nhwc_tile(HW, C, BLOCK_HW, BLOCK_C)
    hw_in = hw < HW
    inside = hw_in[:, None] & (c < C)[None, :]
    partner = tl.load(perm_ptr + n)
    offs = (n * HW + hw)[:, None] * C + c[None, :]
    partner_offs = (partner * HW + hw)[:, None] * C + c[None, :]
    if PER_SAMPLE:
        m = tl.load(m_ptr + n * HW + hw, mask=hw_in, other=0.0)[:, None]
    else:
        m = tl.load(m_ptr + hw, mask=hw_in, other=0.0)[:, None]
    _mix(x_ptr, out_ptr, offs, partner_offs, m, inside, COMPUTE_F64, ROUND)


def fmix_mix_triton(x: torch.Tensor, mask: torch.Tensor, perm: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x: N x C x H x W, contiguous in NCHW or (channels_last) in NHWC; mask: H x W or N x H x W, contiguous,
    float32 (float64 for float64 x); perm: N int64 indices in [0, N). The result has x's strides."""
    N, C, H, W = x.shape
    HW = H * W
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    args = dict(PER_SAMPLE=mask.dim() == 3, COMPUTE_F64=x.dtype == torch.float64,
                ROUND=not x.is_floating_point(), num_warps=NUM_WARPS)
    if not channels_last:
        block_p, block_hw = tiles_nchw(N * C, HW)
        grid = (triton.cdiv(N * C, block_p) * triton.cdiv(HW, block_hw),)
        _mix_nchw_kernel[grid](x, mask, perm, out, N * C, C, HW, BLOCK_P=block_p, BLOCK_HW=block_hw, **args)
    else:
        block_hw, block_c = tiles_nhwc(HW, C)
        grid = (N * triton.cdiv(HW, block_hw) * triton.cdiv(C, block_c),)
        _mix_nhwc_kernel[grid](x, mask, perm, out, C, HW, BLOCK_HW=block_hw, BLOCK_C=block_c, **args)
    return out
