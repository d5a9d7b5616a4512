"""The block tail out = act(x * g[n, c] + identity) in Triton, for NCHW and channels-last storage.

Both layouts are read in memory order as 2-D tiles: NCHW as [planes, H*W] (the gate is one value per
row), channels-last as [H*W rows, C] (the gate is one vector per image). The backward's per-(n, c) sum of
dz * x accumulates in a register tile and is reduced once per program, into a fixed number of splits per
plane that a final torch.sum adds up: deterministic, no atomics.
"""

import torch
import triton
import triton.language as tl

from fer_kernels._accuracy import math_dtype
from fer_kernels.triton.math import act_backward, act_forward, load_math
from fer_kernels.triton.tiles import NUM_WARPS, nchw_tile, nhwc_tile, tiles_nchw, tiles_nhwc


@triton.jit
def _forward_nchw_kernel(x_ptr, g_ptr, id_ptr, out_ptr, planes, HW, HAS_GATE: tl.constexpr, ACT: tl.constexpr,
                         COMPUTE_F64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr):
    p, hw = nchw_tile(HW, BLOCK_P, BLOCK_HW)
    mask = (p < planes)[:, None] & (hw < HW)[None, :]
    offs = p[:, None] * HW + hw[None, :]
    z = load_math(x_ptr, offs, mask, COMPUTE_F64)
    if HAS_GATE:
        z = z * load_math(g_ptr, p, p < planes, COMPUTE_F64)[:, None]
    z = z + load_math(id_ptr, offs, mask, COMPUTE_F64)
    tl.store(out_ptr + offs, act_forward(z, ACT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _forward_nhwc_kernel(x_ptr, g_ptr, id_ptr, out_ptr, HW, C, HAS_GATE: tl.constexpr, ACT: tl.constexpr,
                         COMPUTE_F64: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    n, hw, c = nhwc_tile(HW, C, BLOCK_HW, BLOCK_C)
    mask = (hw < HW)[:, None] & (c < C)[None, :]
    offs = (n * HW + hw)[:, None] * C + c[None, :]
    z = load_math(x_ptr, offs, mask, COMPUTE_F64)
    if HAS_GATE:
        z = z * load_math(g_ptr, n * C + c, c < C, COMPUTE_F64)[None, :]
    z = z + load_math(id_ptr, offs, mask, COMPUTE_F64)
    tl.store(out_ptr + offs, act_forward(z, ACT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_tile(dy_ptr, x_ptr, id_ptr, dx_ptr, did_ptr, offs, mask, g, ACT: tl.constexpr,
                   COMPUTE_F64: tl.constexpr):
    """Writes dx and didentity of one tile; returns its terms dz * x of the gate gradient, in float64."""
    x = load_math(x_ptr, offs, mask, COMPUTE_F64)
    z = x * g + load_math(id_ptr, offs, mask, COMPUTE_F64)
    dz = act_backward(load_math(dy_ptr, offs, mask, COMPUTE_F64), z, ACT)
    tl.store(dx_ptr + offs, (dz * g).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(did_ptr + offs, dz.to(did_ptr.dtype.element_ty), mask=mask)
    return tl.where(mask, dz * x, 0.0).to(tl.float64)


@triton.jit
def _backward_nchw_kernel(dy_ptr, x_ptr, g_ptr, id_ptr, dx_ptr, did_ptr, partial_ptr, planes, HW, splits, chunk,
                          HAS_GATE: tl.constexpr, ACT: tl.constexpr, COMPUTE_F64: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr):
    # program (pid_p, split): rows p of BLOCK_P planes, columns [split * chunk, (split + 1) * chunk)
    split = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < planes
    if HAS_GATE:
        g = load_math(g_ptr, p, p_mask, COMPUTE_F64)[:, None]
    else:
        g = 1.0  # exact: x * 1 + identity and dz * 1 round like x + identity and dz
    acc = tl.zeros((BLOCK_P, BLOCK_HW), dtype=tl.float64)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, HW)
    for start in range(lo, hi, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = p_mask[:, None] & (hw < hi)[None, :]
        offs = p[:, None] * HW + hw[None, :]
        acc += _backward_tile(dy_ptr, x_ptr, id_ptr, dx_ptr, did_ptr, offs, mask, g, ACT, COMPUTE_F64)
    tl.store(partial_ptr + p * splits + split, tl.sum(acc, axis=1), mask=p_mask)


@triton.jit
def _backward_nhwc_kernel(dy_ptr, x_ptr, g_ptr, id_ptr, dx_ptr, did_ptr, partial_ptr, HW, C, splits, chunk,
                          HAS_GATE: tl.constexpr, ACT: tl.constexpr, COMPUTE_F64: tl.constexpr,
                          BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    # program (n * c_blocks + c_block, split): channels of one tile, rows [split * chunk, (split + 1) * chunk)
    split = tl.program_id(1).to(tl.int64)
    c_blocks = tl.cdiv(C, BLOCK_C)
    n = tl.program_id(0).to(tl.int64) // c_blocks
    c = (tl.program_id(0) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if HAS_GATE:
        g = load_math(g_ptr, n * C + c, c_mask, COMPUTE_F64)[None, :]
    else:
        g = 1.0
    acc = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float64)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, HW)
    for start in range(lo, hi, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = (hw < hi)[:, None] & c_mask[None, :]
        offs = (n * HW + hw)[:, None] * C + c[None, :]
        acc += _backward_tile(dy_ptr, x_ptr, id_ptr, dx_ptr, did_ptr, offs, mask, g, ACT, COMPUTE_F64)
    tl.store(partial_ptr + (n * splits + split) * C + c, tl.sum(acc, axis=0), mask=c_mask)


def _target_programs(device: torch.device) -> int:
    """Programs that fill the device: 4 per SM on a GPU; on the CPU interpreter a few, so that tests also
    walk the split path."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _splits(programs, length, block, target):
    """How many pieces to cut each reduction row into: enough programs for the device, each piece at
    least 4 tiles long. Depends on the shape and device only, never on timing, so results are repeatable."""
    max_splits = max(1, length // (4 * block))
    splits = min(max(1, triton.cdiv(target, max(programs, 1))), max_splits)
    chunk = triton.cdiv(triton.cdiv(length, splits), block) * block
    return triton.cdiv(length, chunk), chunk


def _prepare_gate(gate, N, C, x):
    if gate is None:
        return x, False  # any pointer: never read
    return gate.reshape(N, C).to(math_dtype(x.dtype)).contiguous(), True


def recalibrate_forward_triton(x, gate, identity, act: int, channels_last: bool):
    N, C = x.shape[0], x.shape[1]
    HW = x.numel() // max(N * C, 1)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    g, has_gate = _prepare_gate(gate, N, C, x)
    f64 = x.dtype == torch.float64
    if not channels_last:
        block_p, block_hw = tiles_nchw(N * C, HW)
        grid = (triton.cdiv(N * C, block_p) * triton.cdiv(HW, block_hw),)
        _forward_nchw_kernel[grid](x, g, identity, out, N * C, HW, HAS_GATE=has_gate, ACT=act, COMPUTE_F64=f64,
                                   BLOCK_P=block_p, BLOCK_HW=block_hw, num_warps=NUM_WARPS)
    else:
        block_hw, block_c = tiles_nhwc(HW, C)
        grid = (N * triton.cdiv(HW, block_hw) * triton.cdiv(C, block_c),)
        _forward_nhwc_kernel[grid](x, g, identity, out, HW, C, HAS_GATE=has_gate, ACT=act, COMPUTE_F64=f64,
                                   BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return out


def recalibrate_backward_triton(grad, x, gate, identity, act: int, channels_last: bool):
    N, C = x.shape[0], x.shape[1]
    HW = x.numel() // max(N * C, 1)
    dx = torch.empty_like(x)
    did = torch.empty_like(x)
    if x.numel() == 0:
        return dx, (None if gate is None else torch.zeros_like(gate)), did
    g, has_gate = _prepare_gate(gate, N, C, x)
    f64 = x.dtype == torch.float64
    target = _target_programs(x.device)
    if not channels_last:
        block_p, block_hw = tiles_nchw(N * C, HW)
        p_blocks = triton.cdiv(N * C, block_p)
        splits, chunk = _splits(p_blocks, HW, block_hw, target)
        partial = torch.empty(N * C, splits, device=x.device, dtype=torch.float64)
        _backward_nchw_kernel[(p_blocks, splits)](grad, x, g, identity, dx, did, partial, N * C, HW, splits, chunk,
                                                  HAS_GATE=has_gate, ACT=act, COMPUTE_F64=f64, BLOCK_P=block_p,
                                                  BLOCK_HW=block_hw, num_warps=NUM_WARPS)
    else:
        block_hw, block_c = tiles_nhwc(HW, C)
        programs = N * triton.cdiv(C, block_c)
        splits, chunk = _splits(programs, HW, block_hw, target)
        partial = torch.empty(N, splits, C, device=x.device, dtype=torch.float64)
        _backward_nhwc_kernel[(programs, splits)](grad, x, g, identity, dx, did, partial, HW, C, splits, chunk,
                                                  HAS_GATE=has_gate, ACT=act, COMPUTE_F64=f64, BLOCK_HW=block_hw,
                                                  BLOCK_C=block_c, num_warps=NUM_WARPS)
    dgate = None if gate is None else partial.sum(1).reshape(gate.shape).to(gate.dtype)
    return dx, dgate, did
