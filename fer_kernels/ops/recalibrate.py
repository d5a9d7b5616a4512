"""fer_kernels.recalibrate: the fused Accuracy-Booster block tail ``act(x * gate + identity)``.

Custom op, fake implementation and autograd formula. The backward saves only x, gate and identity and
recomputes z = x * gate + identity, instead of keeping z or x * gate: in a ResNet block x is the last
BatchNorm's output and identity the block's input, which its first convolution saves anyway (only in
the four downsampling blocks is identity a tensor of its own). It returns dx, dgate (the per-(n, c) sum
over H x W) and didentity in one pass.
"""

from __future__ import annotations

from typing import Optional

import torch

from fer_kernels import reference
from fer_kernels._accuracy import half_to_float, to_float64, within_tolerance
from fer_kernels._dispatch import Inputs, Op, extension, lazy, requested
from fer_kernels.ops._eager import eager, eager_function
from fer_kernels.ops._layout import check_float, in_format, tail_format
from fer_kernels.reference import ACTIVATIONS

# Stage arguments: forward(x, gate, identity, act, channels_last) and backward(grad, x, gate, identity, act,
# channels_last), act an index into ACTIVATIONS (the kernels' activation codes), x and identity (and grad) in
# one layout, NCHW or channels-last as channels_last says.


def _extension(name):
    kernel = extension(name)
    return lambda *args: kernel(*args[:-1])  # the C++ kernels read the layout from the strides


def _reference_forward(x, gate, identity, act, channels_last):
    out = reference.recalibrate(half_to_float(x), half_to_float(gate), half_to_float(identity), ACTIVATIONS[act])
    return torch.empty_like(x).copy_(out)


def _reference_backward(grad, x, gate, identity, act, channels_last):
    dx, dgate, did = reference.recalibrate_backward(*map(half_to_float, (grad, x, gate, identity)), ACTIVATIONS[act])
    return (torch.empty_like(x).copy_(dx), None if gate is None else dgate.to(gate.dtype),
            torch.empty_like(x).copy_(did))


def _verify(stage, args, out):
    """The stage's results against the reference in float64 (and plain PyTorch in the inputs' dtype)."""
    *tensors, act, _ = args
    plain = reference.recalibrate if stage == "forward" else reference.recalibrate_backward
    ref64 = plain(*map(to_float64, tensors), ACTIVATIONS[act])
    ref = plain(*tensors, ACTIVATIONS[act])
    if stage == "forward":
        return within_tolerance([("recalibrate forward", out, ref64, ref)])
    names = ("dx", "dgate", "didentity")
    return within_tolerance([(f"recalibrate backward {n}", o, r64, r)
                             for n, o, r64, r in zip(names, out, ref64, ref) if r64 is not None])


RECALIBRATE = Op("recalibrate", verify=_verify)
RECALIBRATE.implement("cuda", forward=_extension("recalibrate_forward_cuda"),
                      backward=_extension("recalibrate_backward_cuda"))
RECALIBRATE.implement("triton", forward=lazy("fer_kernels.triton.recalibrate", "recalibrate_forward_triton"),
                      backward=lazy("fer_kernels.triton.recalibrate", "recalibrate_backward_triton"))
RECALIBRATE.implement("cpu", forward=_extension("recalibrate_forward_cpu"),
                      backward=_extension("recalibrate_backward_cpu"))
RECALIBRATE.implement("reference", forward=_reference_forward, backward=_reference_backward)


def _tail_inputs(x, identity, *others):
    """x, identity (and grad) in one layout: x's own if it is NCHW- or channels-last-contiguous."""
    fmt = tail_format(x)
    return fmt, [in_format(t, fmt) for t in (x, identity) + others]


def _inputs(x, fmt) -> Inputs:
    spatial = x.numel() // max(x.shape[0] * x.shape[1], 1)
    layout = "nchw" if fmt == torch.contiguous_format else "channels_last"
    return Inputs(x.device, x.dtype, layout, size=(x.numel(), spatial))


def _forward(x: torch.Tensor, gate: Optional[torch.Tensor], identity: torch.Tensor, act: str,
             backend: str) -> torch.Tensor:
    fmt, (x, identity) = _tail_inputs(x, identity)
    if x.numel() == 0:
        return torch.empty_like(x)
    return RECALIBRATE("forward", backend, _inputs(x, fmt), x, gate, identity, ACTIVATIONS.index(act),
                       fmt != torch.contiguous_format)


_recalibrate = torch.library.custom_op("fer_kernels::recalibrate", _forward, mutates_args=())


@_recalibrate.register_fake
def _(x, gate, identity, act, backend):
    _, (x, _) = _tail_inputs(x, identity)
    return torch.empty_like(x)


def _backward_kernel(grad: torch.Tensor, x: torch.Tensor, gate: Optional[torch.Tensor], identity: torch.Tensor,
                     act: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dgate, didentity); dgate is an empty tensor when there is no gate (ops cannot return None)."""
    fmt, (x, identity, grad) = _tail_inputs(x, identity, grad)
    if x.numel() == 0:
        dgate = torch.zeros_like(gate, memory_format=torch.contiguous_format) if gate is not None else x.new_empty(0)
        return torch.empty_like(x), dgate, torch.empty_like(x)
    dx, dgate, did = RECALIBRATE("backward", backend, _inputs(x, fmt), grad, x, gate, identity,
                                 ACTIVATIONS.index(act), fmt != torch.contiguous_format)
    return dx, (dgate if gate is not None else x.new_empty(0)), did


_recalibrate_backward = torch.library.custom_op("fer_kernels::recalibrate_backward", _backward_kernel,
                                                mutates_args=())


@_recalibrate_backward.register_fake
def _(grad, x, gate, identity, act, backend):
    _, (x, _) = _tail_inputs(x, identity)
    dgate = gate.new_empty(gate.shape) if gate is not None else x.new_empty(0)
    return torch.empty_like(x), dgate, torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, gate, identity, act, backend = inputs
    ctx.save_for_backward(x, gate, identity)
    ctx.act, ctx.backend = act, backend


def _backward_with(kernel):
    def backward(ctx, grad):
        x, gate, identity = ctx.saved_tensors
        dx, dgate, did = kernel(grad, x, gate, identity, ctx.act, ctx.backend)
        return dx, (dgate if gate is not None else None), did, None, None
    return backward


_backward = _backward_with(torch.ops.fer_kernels.recalibrate_backward)
_recalibrate.register_autograd(_backward, setup_context=_setup_context)
_Eager = eager_function("Recalibrate", _forward, _setup_context, _backward_with(_backward_kernel), _backward)


def recalibrate(x: torch.Tensor, gate: torch.Tensor | None, identity: torch.Tensor, act: str = "mish",
                backend: str | None = None) -> torch.Tensor:
    """The block tail of an Accuracy-Booster ResNet block, ``act(x * gate + identity)``, fused.

    x, identity: N x C x ... (same shape and dtype; NCHW or channels-last, which the output keeps).
    gate: N x C or N x C x 1 x 1 (any float dtype; its gradient comes back in that dtype), or None for
    a gate of 1 (the plain residual tail ``act(x + identity)``).
    act: "mish", "relu" or "none". Math in float32 for float16/bfloat16 storage.
    backend: None/"auto" (see fer_kernels.backends()), or one of "cuda", "triton", "cpu", "reference".
    """
    op = "fer_kernels.recalibrate"
    check_float(x, op, "x")
    check_float(identity, op, "identity")
    if x.dim() < 2:
        raise ValueError(f"{op}: x must have shape N x C x ..., got {tuple(x.shape)}")
    if identity.shape != x.shape:
        raise ValueError(f"{op}: identity must have the shape of x {tuple(x.shape)}, got {tuple(identity.shape)}")
    if identity.dtype != x.dtype:
        raise TypeError(f"{op}: identity must have the dtype of x ({x.dtype}), got {identity.dtype}")
    if identity.device != x.device:
        raise ValueError(f"{op}: identity must be on {x.device}, got {identity.device}")
    if gate is not None:
        check_float(gate, op, "gate")
        n, c = x.shape[0], x.shape[1]
        if gate.dim() < 2 or gate.shape[0] != n or gate.shape[1] != c or gate.numel() != n * c:
            raise ValueError(f"{op}: gate must have shape N x C or N x C x 1 x 1 = ({n}, {c}, ...), "
                             f"got {tuple(gate.shape)}")
        if gate.device != x.device:
            raise ValueError(f"{op}: gate must be on {x.device}, got {gate.device}")
    if act not in ACTIVATIONS:
        raise ValueError(f"{op}: act must be one of {ACTIVATIONS}, got {act!r}")
    args = (x, gate, identity, act, requested("recalibrate", backend))
    return _Eager.apply(*args) if eager(x, gate, identity) else torch.ops.fer_kernels.recalibrate(*args)
