"""The FMix mix out = m * x + (1 - m) * x[perm] in Triton: one pass over the batch, for NCHW and
channels-last storage.

Each program reads a tile of x, the same tile of the sample's partner x[perm[n]] and the mask (one H x W
mask for the batch, or one per sample), broadcast over the channels, and writes the tile of out. As in
fer_kernels/triton/recalibrate.py, NCHW is walked as [planes, H*W] tiles (plane = n * C + c, so the
partner's plane is p + (perm[n] - n) * C) and channels-last as [H*W rows, C] tiles of one image.
The specification is fer_kernels.reference.fmix_mix.
"""

import torch
import triton
import triton.language as tl

# Elements per tile: 2048 with 4 warps (16 per thread), as the block-tail kernels. Not tuned on a GPU yet
# (none was available when written).
TILE = 2048
NUM_WARPS = 4


@triton.jit
def _mix(x_ptr, out_ptr, offs, partner_offs, m, inside, COMPUTE_F64: tl.constexpr, ROUND: tl.constexpr):
    a = tl.load(x_ptr + offs, mask=inside, other=0)
    b = tl.load(x_ptr + partner_offs, mask=inside, other=0)
    if COMPUTE_F64:
        a = a.to(tl.float64)
        b = b.to(tl.float64)
    else:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    out = m * a + (1.0 - m) * b
    if ROUND:
        out = tl.floor(out + 0.5)  # integer storage: round half up (out is a convex combination, >= 0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _mix_nchw_kernel(x_ptr, m_ptr, perm_ptr, out_ptr, planes, C, HW, PER_SAMPLE: tl.constexpr,
                     COMPUTE_F64: tl.constexpr, ROUND: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    hw_blocks = tl.cdiv(HW, BLOCK_HW)
    p = (pid // hw_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    hw = (pid % hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
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
    pid = tl.program_id(0).to(tl.int64)
    c_blocks = tl.cdiv(C, BLOCK_C)
    hw_blocks = tl.cdiv(HW, BLOCK_HW)
    n = pid // (hw_blocks * c_blocks)
    hw = ((pid // c_blocks) % hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
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
        block_hw = min(triton.next_power_of_2(HW), 1024)
        block_p = max(1, min(triton.next_power_of_2(N * C), TILE // block_hw))
        grid = (triton.cdiv(N * C, block_p) * triton.cdiv(HW, block_hw),)
        _mix_nchw_kernel[grid](x, mask, perm, out, N * C, C, HW, BLOCK_P=block_p, BLOCK_HW=block_hw, **args)
    else:
        block_c = min(triton.next_power_of_2(C), 256)
        block_hw = max(1, min(triton.next_power_of_2(HW), TILE // block_c))
        grid = (N * triton.cdiv(HW, block_hw) * triton.cdiv(C, block_c),)
        _mix_nhwc_kernel[grid](x, mask, perm, out, C, HW, BLOCK_HW=block_hw, BLOCK_C=block_c, **args)
    return out
