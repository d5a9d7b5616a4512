"""fer_kernels.mish: the op's registry entry, its custom op, fake implementation and autograd formula.

The backward saves only the input (as F.mish does) and recomputes what it needs from it.
"""

from __future__ import annotations

import torch

from fer_kernels import reference
from fer_kernels._accuracy import half_to_float, to_float64, within_tolerance
from fer_kernels._dispatch import Inputs, Op, extension, lazy, requested
from fer_kernels.ops._eager import eager, eager_function
from fer_kernels.ops._layout import check_float, dense, like


def _reference_forward(x):
    return torch.empty_like(x).copy_(reference.mish(half_to_float(x)))


def _reference_backward(grad, x):
    return torch.empty_like(x).copy_(reference.mish_backward(half_to_float(grad), half_to_float(x)))


def _verify(stage, args, out):
    """The stage's result against the reference in float64 (and plain PyTorch in the input's dtype)."""
    plain = reference.mish if stage == "forward" else reference.mish_backward
    return within_tolerance([(f"mish {stage}", out, plain(*map(to_float64, args)), plain(*args))])


MISH = Op("mish", verify=_verify)
MISH.implement("cuda", forward=extension("mish_forward_cuda"), backward=extension("mish_backward_cuda"))
MISH.implement("triton", forward=lazy("fer_kernels.triton.mish", "mish_forward_triton"),
               backward=lazy("fer_kernels.triton.mish", "mish_backward_triton"))
MISH.implement("cpu", forward=extension("mish_forward_cpu"), backward=extension("mish_backward_cpu"))
MISH.implement("reference", forward=_reference_forward, backward=_reference_backward)


def _inputs(x: torch.Tensor) -> Inputs:
    return Inputs(x.device, x.dtype, size=(x.numel(),))


def _forward(x: torch.Tensor, backend: str) -> torch.Tensor:
    x = dense(x)
    if x.numel() == 0:
        return torch.empty_like(x)
    return MISH("forward", backend, _inputs(x), x)


_mish = torch.library.custom_op("fer_kernels::mish", _forward, mutates_args=())


@_mish.register_fake
def _(x, backend):
    return torch.empty_like(dense(x))


def _backward_kernel(grad: torch.Tensor, x: torch.Tensor, backend: str) -> torch.Tensor:
    x = dense(x)
    grad = like(grad, x)
    if x.numel() == 0:
        return torch.empty_like(x)
    return MISH("backward", backend, _inputs(x), grad, x)


_mish_backward = torch.library.custom_op("fer_kernels::mish_backward", _backward_kernel, mutates_args=())


@_mish_backward.register_fake
def _(grad, x, backend):
    return torch.empty_like(dense(x))


def _setup_context(ctx, inputs, output):
    x, backend = inputs
    ctx.save_for_backward(x)
    ctx.backend = backend


def _backward_with(kernel):
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return kernel(grad, x, ctx.backend), None
    return backward


_backward = _backward_with(torch.ops.fer_kernels.mish_backward)
_mish.register_autograd(_backward, setup_context=_setup_context)
_Eager = eager_function("Mish", _forward, _setup_context, _backward_with(_backward_kernel), _backward)


def mish(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Mish, ``x * tanh(softplus(x))``, as one fused kernel (forward and backward).

    Same values as ``torch.nn.functional.mish`` (to the rounding of the storage dtype; float16 and
    bfloat16 compute in float32), including inf and NaN. Saves only ``x`` for backward. Any shape and
    strides; the output has x's strides when x is dense, else it is contiguous.

    backend: None/"auto" (see fer_kernels.backends()), or one of "cuda", "triton", "cpu", "reference".
    """
    check_float(x, "fer_kernels.mish", "x")
    args = (x, requested("mish", backend))
    return _Eager.apply(*args) if eager(x) else torch.ops.fer_kernels.mish(*args)
