"""The 2-D tiles in which the block-tail and FMix kernels walk an N x C x H x W tensor in memory order:
NCHW as [planes, H*W] (plane = n * C + c), channels-last as [H*W rows, C] of one image. The host picks
the tile shape, the kernels find their tile from the program id."""

import triton
import triton.language as tl

# Elements per tile: 2048 with 4 warps (16 per thread). Not tuned yet;
# benchmarks/bench_recalibrate.py measures it.
TILE = 2048
NUM_WARPS = 4


def tiles_nchw(planes: int, HW: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_HW): whole rows of up to 1024 elements, as many planes as fill a TILE."""
    block_hw = min(triton.next_power_of_2(max(HW, 1)), 1024)
    block_p = max(1, min(triton.next_power_of_2(planes), TILE // block_hw))
    return block_p, block_hw


def tiles_nhwc(HW: int, C: int) -> tuple[int, int]:
    """(BLOCK_HW, BLOCK_C): up to 256 channels, as many rows as fill a TILE."""
    block_c = min(triton.next_power_of_2(max(C, 1)), 256)
    block_hw = max(1, min(triton.next_power_of_2(max(HW, 1)), TILE // block_c))
    return block_hw, block_c


@triton.jit
def nchw_tile(HW, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr):
    """(planes p, positions hw) of this program's tile; the grid is cdiv(planes, BLOCK_P) * cdiv(HW, BLOCK_HW)."""
    pid = tl.program_id(0).to(tl.int64)
    hw_blocks = tl.cdiv(HW, BLOCK_HW)
    p = (pid // hw_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    hw = (pid % hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    return p, hw


@triton.jit
def nhwc_tile(HW, C, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """(image n, positions hw, channels c) of this program's tile; the grid is
    N * cdiv(HW, BLOCK_HW) * cdiv(C, BLOCK_C)."""
    pid = tl.program_id(0).to(tl.int64)
    c_blocks = tl.cdiv(C, BLOCK_C)
    hw_blocks = tl.cdiv(HW, BLOCK_HW)
    n = pid // (hw_blocks * c_blocks)
    hw = ((pid // c_blocks) % hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return n, hw, c
