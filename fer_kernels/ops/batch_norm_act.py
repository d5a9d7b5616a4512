"""fer_kernels.batch_norm_act: training-mode batch normalisation fused with the activation after it.

ResNet's stem and the first convolution of every block (the first two of a bottleneck) are followed by
BatchNorm and the activation. In PyTorch that is three passes over the activation forward and three back,
and both the input and the normalised tensor are saved. The fused op makes two passes each way and saves its
input only (csrc/cpu/batch_norm_act.cpp has the math). It is a CPU kernel: CPU batch norm is where the
passes cost the most time (they stall on memory); there is no CUDA or Triton version yet, so on a GPU
:func:`fer_kernels.nn.batch_norm_act` uses torch's batch norm and the fused activation.
"""

from __future__ import annotations

import torch

from fer_kernels import reference
from fer_kernels._accuracy import math_dtype
from fer_kernels._dispatch import _C
from fer_kernels.ops._eager import eager, eager_function
from fer_kernels.ops._layout import is_channels_last, like

__all__ = ["batch_norm_act", "fused_batch_norm_act_serves"]


def _forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
             act: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_C.batch_norm_act_forward_cpu(x, weight, bias, eps, act))


_batch_norm_act = torch.library.custom_op("fer_kernels::batch_norm_act", _forward, mutates_args=())


@_batch_norm_act.register_fake
def _(x, weight, bias, eps, act):
    stats = x.new_empty(x.shape[1], dtype=math_dtype(x.dtype))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _backward_kernel(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     mean: torch.Tensor, var: torch.Tensor, eps: float,
                     act: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_C.batch_norm_act_backward_cpu(like(grad, x), x, weight, bias, mean, var, eps, act))


_batch_norm_act_backward = torch.library.custom_op("fer_kernels::batch_norm_act_backward", _backward_kernel,
                                                   mutates_args=())


@_batch_norm_act_backward.register_fake
def _(grad, x, weight, bias, mean, var, eps, act):
    stats = x.new_empty(x.shape[1], dtype=math_dtype(x.dtype))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, act = inputs
    _, mean, var = output
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.eps, ctx.act = eps, act
    ctx.mark_non_differentiable(mean, var)


def _backward_with(kernel):
    def backward(ctx, grad, _grad_mean, _grad_var):
        x, weight, bias, mean, var = ctx.saved_tensors
        dx, dweight, dbias = kernel(grad, x, weight, bias, mean, var, ctx.eps, ctx.act)
        dweight = None if weight is None else dweight.to(weight.dtype)
        dbias = None if bias is None else dbias.to(bias.dtype)
        return dx, dweight, dbias, None, None
    return backward


_backward = _backward_with(torch.ops.fer_kernels.batch_norm_act_backward)
_batch_norm_act.register_autograd(_backward, setup_context=_setup_context)
_Eager = eager_function("BatchNormAct", _forward, _setup_context, _backward_with(_backward_kernel), _backward)


def fused_batch_norm_act_serves(x: torch.Tensor) -> bool:
    """Whether the fused kernel takes x: a CPU tensor of 4 dims (N x C x H x W) with more than one value per
    channel, stored NCHW or channels-last, with the extension built, outside torch.compile (which traces
    torch's own batch norm instead: the fused op was not measured there)."""
    return (_C is not None and x.device.type == "cpu" and x.dim() == 4 and x.is_floating_point()
            and x.shape[0] * x.shape[2] * x.shape[3] > 1 and x.shape[1] > 0
            and (x.is_contiguous() or is_channels_last(x)) and not torch.compiler.is_compiling())


def batch_norm_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
                   act: str = "mish") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``act(batch_norm(x))`` in training mode as one fused CPU op; returns the output and the batch's
    per-channel mean and biased variance (float32, float64 for float64 x), from which a caller updates running
    statistics (fer_kernels.nn.batch_norm_act does, as torch.nn.BatchNorm2d).

    x: N x C x H x W on the CPU, NCHW or channels-last (see fused_batch_norm_act_serves); weight and bias:
    C values each, or None. act: "mish", "relu" or "none". The output has x's layout and dtype; float16 and
    bfloat16 compute in float32. Differentiable in x, weight and bias."""
    if act not in reference.ACTIVATIONS:
        raise ValueError(f"batch_norm_act: act must be one of {reference.ACTIVATIONS}, got {act!r}")
    if not fused_batch_norm_act_serves(x):
        raise ValueError(f"batch_norm_act: the fused op takes a CPU tensor N x C x H x W with more than one value "
                         f"per channel, NCHW or channels-last, with the C++ extension built; got {x.device.type} "
                         f"{tuple(x.shape)} with strides {x.stride()}")
    args = (x, weight, bias, float(eps), reference.ACTIVATIONS.index(act))
    return _Eager.apply(*args) if eager(x, weight, bias) else torch.ops.fer_kernels.batch_norm_act(*args)
