"""fer_kernels.mish: the custom op, its fake implementation and its autograd formula.

The backward saves only the input (as F.mish does) and recomputes what it needs from it.
"""

from __future__ import annotations

import torch

from fer_kernels import _backends
from fer_kernels.ops._layout import check_float, dense, like


@torch.library.custom_op("fer_kernels::mish", mutates_args=())
def _mish(x: torch.Tensor, backend: str) -> torch.Tensor:
    x = dense(x)
    if x.numel() == 0:
        return torch.empty_like(x)
    return _backends.run("mish", "mish_forward", backend, x, _backends.shape_key(x.numel()), x)


@_mish.register_fake
def _(x, backend):
    return torch.empty_like(dense(x))


@torch.library.custom_op("fer_kernels::mish_backward", mutates_args=())
def _mish_backward(grad: torch.Tensor, x: torch.Tensor, backend: str) -> torch.Tensor:
    x = dense(x)
    grad = like(grad, x)
    if x.numel() == 0:
        return torch.empty_like(x)
    return _backends.run("mish", "mish_backward", backend, x, _backends.shape_key(x.numel()), grad, x)


@_mish_backward.register_fake
def _(grad, x, backend):
    return torch.empty_like(dense(x))


def _setup_context(ctx, inputs, output):
    x, backend = inputs
    ctx.save_for_backward(x)
    ctx.backend = backend


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.fer_kernels.mish_backward(grad, x, ctx.backend), None


_mish.register_autograd(_backward, setup_context=_setup_context)


def mish(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Mish, ``x * tanh(softplus(x))``, as one fused kernel (forward and backward).

    Same values as ``torch.nn.functional.mish`` (to the rounding of the storage dtype; float16 and
    bfloat16 compute in float32), including inf and NaN. Saves only ``x`` for backward. Any shape and
    strides; the output has x's strides when x is dense, else it is contiguous.

    backend: None/"auto" (see fer_kernels.backends()), or one of "cuda", "triton", "cpu", "reference".
    """
    check_float(x, "fer_kernels.mish", "x")
    return torch.ops.fer_kernels.mish(x, _backends.requested("mish", backend))
