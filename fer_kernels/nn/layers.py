"""Drop-in layers built on the fused ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fer_kernels.nn.conv import Conv2d
from fer_kernels.ops import mish, recalibrate
from fer_kernels.ops.batch_norm_act import batch_norm_act as fused_batch_norm_act
from fer_kernels.ops.batch_norm_act import fused_batch_norm_act_serves
from fer_kernels.ops.max_pool import fused_max_pool2d_serves, max_pool2d
from fer_kernels.reference import ACTIVATIONS

__all__ = ["Mish", "AccuracyBooster", "MaxPool2d", "Recalibrate", "batch_norm_act"]


class Mish(nn.Module):
    """Drop-in replacement for ``torch.nn.Mish`` running the fused kernel.

    ``inplace`` is accepted for signature compatibility and ignored: the fused op writes a new tensor and
    saves only its input, so an in-place update would save no activation memory.
    """

    def __init__(self, inplace: bool = False, backend: str | None = None):
        super().__init__()
        self.inplace = inplace
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish(x, backend=self.backend)

    def extra_repr(self) -> str:
        return "" if self.backend is None else f"backend={self.backend!r}"


class _SpatialMean(torch.autograd.Function):
    """torch.mean over H and W (keepdim), whose backward returns the broadcast gradient as a stride-0 view.

    In a block the pooled tensor also feeds the tail, so autograd adds the two gradients. torch.mean's
    backward writes the broadcast out in full, in NCHW order; adding that to the tail's channels_last gradient
    ran about 10x slower than adding the view, in place (bfloat16 at 8 x 64 x 56 x 56: 1.8 ms against 0.19).
    The values are the same: each element is grad / (H * W), computed once per (n, c)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.input_shape = x.shape
        return torch.mean(x, dim=(2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        height, width = ctx.input_shape[2], ctx.input_shape[3]
        return (grad / (height * width)).expand(ctx.input_shape)


def _unit_kernel_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A K x C x 1 x 1 weight as the K x C matrix, viewed so that its gradient comes back with the weight's own
    strides (NCHW and channels-last differ only on the unit dimensions there, but DDP compares all of them)."""
    return weight.flatten(1) if weight.stride(2) == 1 else weight.permute(0, 2, 3, 1).flatten(1)


class AccuracyBooster(nn.Module):
    """The Accuracy Booster channel gate: ``sigmoid(BN(conv1x1(avgpool(x))))``, shape N x C x 1 x 1.

    variant="plus" (ABP): a dense C x C 1x1 convolution without bias (C^2 weights), computed as the matrix
    product it is on the pooled 1 x 1 map;
    variant="depthwise" (AB): a depthwise 1x1 convolution (``groups=C``, C weights).
    Returns the gate; apply it as ``x * gate`` or, fused with the residual add and the activation, with
    :class:`Recalibrate` / :func:`fer_kernels.recalibrate`. Keys: ``conv.weight`` and ``bn.*``.

    The BatchNorm normalises N values per channel, so a training batch must hold at least 2 images.
    """

    def __init__(self, channels: int, variant: str = "plus"):
        super().__init__()
        if variant not in ("plus", "depthwise"):
            raise ValueError(f"AccuracyBooster: variant must be 'plus' or 'depthwise', got {variant!r}")
        self.variant = variant
        self.conv = Conv2d(channels, channels, 1, groups=1 if variant == "plus" else channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            raise ValueError("AccuracyBooster: its BatchNorm normalises N values per channel, so a training batch "
                             "of 1 cannot be normalised; use a batch of 2 or more, or call model.eval()")
        pooled = _SpatialMean.apply(x)
        if self.variant == "plus":
            # A 1x1 convolution of a 1 x 1 map is a matrix product; as one it skips the convolution's dispatch
            # (the small-map path's Python and autograd Function, oneDNN's weight reorders): a 48 px training
            # step at batch 32 is 1.5 ms faster (median of 80 alternating pairs of steps in one process).
            y = F.linear(pooled.flatten(1), _unit_kernel_matrix(self.conv.weight)).view(pooled.shape)
        else:
            y = self.conv(pooled)
        return torch.sigmoid(self.bn(y))

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}"


class Recalibrate(nn.Module):
    """The fused block tail ``act(x * gate + identity)`` as a module; ``gate=None`` gives ``act(x + identity)``."""

    def __init__(self, act: str = "mish", backend: str | None = None):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"Recalibrate: act must be one of {ACTIVATIONS}, got {act!r}")
        self.act = act
        self.backend = backend

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None, identity: torch.Tensor) -> torch.Tensor:
        return recalibrate(x, gate, identity, act=self.act, backend=self.backend)

    def extra_repr(self) -> str:
        return f"act={self.act!r}" + ("" if self.backend is None else f", backend={self.backend!r}")


def batch_norm_act(bn: nn.BatchNorm2d, x: torch.Tensor, act: str = "mish", backend: str | None = None) -> torch.Tensor:
    """``act(bn(x))``. A training-mode ``bn`` on a CPU input (see fer_kernels.ops.batch_norm_act) runs as one
    fused op, and its running statistics and ``num_batches_tracked`` are updated as ``torch.nn.BatchNorm2d``
    updates them; everything else (evaluation, GPUs, ``backend`` other than None/"auto"/"cpu") is ``bn`` itself
    and the fused activation. ``bn``'s parameters and buffers are used as they are, so state dicts do not change.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"batch_norm_act: act must be one of {ACTIVATIONS}, got {act!r}")
    fused = (bn.training and type(bn) is nn.BatchNorm2d and backend in (None, "auto", "cpu")
             and fused_batch_norm_act_serves(x))
    if not fused:
        y = bn(x)
        return mish(y, backend=backend) if act == "mish" else torch.relu(y) if act == "relu" else y
    out, mean, var = fused_batch_norm_act(x, bn.weight, bn.bias, bn.eps, act)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            count = x.numel() // x.shape[1]
            bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
            unbiased = var * (count / (count - 1))
            bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)
    return out


class MaxPool2d(nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` whose channels-last CPU inputs go through fer_kernels' max pooling (one-byte
    indices, a gathered gradient: fer_kernels.ops.max_pool); other inputs, dilation, ``ceil_mode``,
    ``return_indices`` and tracing for export are torch's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pair = nn.modules.utils._pair
        kernel, stride, padding = pair(self.kernel_size), pair(self.stride), pair(self.padding)
        if (pair(self.dilation) == (1, 1) and not self.ceil_mode and not self.return_indices
                and not (torch.jit.is_tracing() or torch.jit.is_scripting())
                and fused_max_pool2d_serves(x, kernel, stride, padding)):
            return max_pool2d(x, kernel, stride, padding)
        return super().forward(x)
