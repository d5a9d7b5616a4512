"""fer_kernels max_pool2d: 2-D max pooling of channels-last CPU tensors with one-byte indices, a CPU kernel.

PyTorch's CPU max pooling keeps an int64 index per output and, backward, zero-fills the input gradient before
scattering into it; ResNet's stem pools 8 x 64 x 112 x 112 values at 224 px. This op keeps the maximum's
position in its window as one byte and gathers the input gradient, writing it once (csrc/cpu/max_pool.cpp).
There is no CUDA or Triton version: :class:`fer_kernels.nn.MaxPool2d` is torch's pooling elsewhere.
"""

from __future__ import annotations

import torch

from fer_kernels._dispatch import _C
from fer_kernels.ops._eager import eager, eager_function
from fer_kernels.ops._layout import is_channels_last, window_output_size

__all__ = ["max_pool2d", "fused_max_pool2d_serves"]


def _forward(x: torch.Tensor, kernel_size: list[int], stride: list[int],
             padding: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_C.max_pool2d_forward_cpu(x, kernel_size, stride, padding))


_max_pool2d = torch.library.custom_op("fer_kernels::max_pool2d", _forward, mutates_args=())


@_max_pool2d.register_fake
def _(x, kernel_size, stride, padding):
    n, c, h, w = x.shape
    shape = (n, c, *window_output_size((h, w), kernel_size, stride, padding))
    out = x.new_empty(shape).contiguous(memory_format=torch.channels_last)
    return out, torch.empty_like(out, dtype=torch.uint8)


def _backward_kernel(grad: torch.Tensor, indices: torch.Tensor, input_size: list[int], kernel_size: list[int],
                     stride: list[int], padding: list[int]) -> torch.Tensor:
    grad = grad.contiguous(memory_format=torch.channels_last)
    return _C.max_pool2d_backward_cpu(grad, indices, input_size, kernel_size, stride, padding)


_max_pool2d_backward = torch.library.custom_op("fer_kernels::max_pool2d_backward", _backward_kernel,
                                               mutates_args=())


@_max_pool2d_backward.register_fake
def _(grad, indices, input_size, kernel_size, stride, padding):
    return grad.new_empty(input_size).contiguous(memory_format=torch.channels_last)


def _setup_context(ctx, inputs, output):
    x, kernel_size, stride, padding = inputs
    _, indices = output
    ctx.save_for_backward(indices)
    ctx.mark_non_differentiable(indices)
    ctx.pool = (list(x.shape), kernel_size, stride, padding)


def _backward_with(kernel):
    def backward(ctx, grad, _grad_indices):
        (indices,) = ctx.saved_tensors
        return kernel(grad, indices, *ctx.pool), None, None, None
    return backward


_backward = _backward_with(torch.ops.fer_kernels.max_pool2d_backward)
_max_pool2d.register_autograd(_backward, setup_context=_setup_context)
_Eager = eager_function("MaxPool2d", _forward, _setup_context, _backward_with(_backward_kernel), _backward)


def fused_max_pool2d_serves(x: torch.Tensor, kernel_size, stride, padding) -> bool:
    """Whether the kernel takes this pooling: a floating CPU tensor N x C x H x W stored channels-last, windows
    of at most 255 positions, padding at most half the window, a non-empty output, the extension built and not
    under torch.compile (which traces torch's pooling: the op was not measured there)."""
    if _C is None or x.device.type != "cpu" or x.dim() != 4 or not x.is_floating_point() or x.numel() == 0:
        return False
    if not is_channels_last(x) or torch.compiler.is_compiling():
        return False
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    return (0 < kh * kw <= 255 and sh > 0 and sw > 0 and 0 <= 2 * ph <= kh and 0 <= 2 * pw <= kw
            and min(window_output_size(x.shape[2:], kernel_size, stride, padding)) > 0)


def max_pool2d(x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` (no dilation, floor mode) for a channels-last CPU
    tensor, as one kernel each way (see fused_max_pool2d_serves for what it takes). The same values as
    PyTorch, NaN included; the gradient goes to the first maximum of each window, or its last NaN."""
    kernel_size, stride, padding = (list(map(int, v)) for v in (kernel_size, stride, padding))
    if not fused_max_pool2d_serves(x, kernel_size, stride, padding):
        raise ValueError(f"max_pool2d: the kernel takes a channels-last CPU tensor N x C x H x W with the C++ "
                         f"extension built, windows of at most 255 positions and padding at most half the window; "
                         f"got {x.device.type} {tuple(x.shape)} with strides {x.stride()}, kernel {kernel_size}, "
                         f"stride {stride}, padding {padding}")
    args = (x, kernel_size, stride, padding)
    return (_Eager.apply(*args) if eager(x) else torch.ops.fer_kernels.max_pool2d(*args))[0]
