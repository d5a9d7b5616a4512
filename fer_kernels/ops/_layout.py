"""Storage layouts the kernels accept, shared by the real and the fake (meta) implementations so that
torch.compile sees exactly the strides the kernels produce."""

from __future__ import annotations

import torch


def window_output_size(in_size, kernel, stride, padding) -> tuple[int, ...]:
    """The output sides of a convolution or pooling window without dilation (<= 0 where the kernel is larger
    than the padded map)."""
    return tuple((size + 2 * pad - k) // step + 1 for size, k, step, pad in zip(in_size, kernel, stride, padding))


def check_float(t: torch.Tensor, op: str, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def is_dense(x: torch.Tensor) -> bool:
    """True when x's elements fill a block of memory exactly, in any dim order (no gaps, no overlap)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself if it is dense, else a contiguous copy. Elementwise kernels walk a dense buffer linearly
    and give their output the same strides (torch.empty_like keeps the strides of a dense tensor)."""
    return x if is_dense(x) else x.contiguous()


def _same_offsets(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(s == 1 or sa == sb for s, sa, sb in zip(a.shape, a.stride(), b.stride()))


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t with ref's strides (a copy only when they differ): the kernels read t and ref at the same offsets."""
    if _same_offsets(t, ref):
        return t
    return torch.empty_like(ref).copy_(t)


def is_channels_last(x: torch.Tensor) -> bool:
    """True when x (N x C x ...) is stored channels-last and is not also plain contiguous."""
    return x.dim() in (4, 5) and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def tail_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the block-tail kernels use for x: channels-last if x has it, else NCHW (contiguous)."""
    if is_channels_last(x):
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def in_format(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """t stored in `fmt` (a copy only if it is not already)."""
    return t.contiguous(memory_format=fmt)
