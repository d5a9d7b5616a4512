"""Conv2d whose weight gradient on the CPU, for small output maps, is one im2col matrix product.

oneDNN computes a convolution's weight gradient with blocked kernels tuned for large feature maps; on maps
of a few positions (a 48 px face leaves ResNet's stage 4 at 2 x 2 and stage 3 at 3 x 3) they spend most of
their time reordering the weights. For batch 32, 512 -> 512 channels, a 3x3 kernel on a 2 x 2 map, its
weight gradient takes 50-100 ms on 2 AVX2 cores, while unfolding the input into a (N*P) x (kh*kw*C)
matrix and multiplying it by the output gradient takes 6-9 ms; a whole ResNet-18 training step at 48 px
is 1.5-1.6x faster (benchmarks/bench_conv.py has the figures for every layer shape and the step). The forward
pass and the input gradient stay with oneDNN, which is fast on these shapes; so does every layer whose
output map has more positions than the layer has output channels (or than SMALL_MAP), where copying the
unfolded input costs more than the product saves.

The path is taken only where it is exact and measured: on the CPU, float32 or float64 without autocast,
zero padding, no dilation, no groups, and when gradients are being recorded; everything else is
``torch.nn.Conv2d`` itself, and parameters and state-dict keys are Conv2d's. FER_KERNELS_SMALL_MAP=0 in
the environment (read at import) turns it off; another number sets the largest map it serves.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv2d", "SMALL_MAP", "conv2d_weight_grad"]

# Output positions (Ho x Wo) up to which the unfolded weight gradient may be used; it is used where the map
# also has no more positions than the layer has output channels (unfolds_weight_grad). Measured on 2 AVX2
# cores (benchmarks/results/cpu-amd-epyc-conv.json): 1.0-12x as fast as oneDNN's on every such layer of
# ResNet-18 at 48 and 224 px (the 512-channel 3x3 on 2 x 2 at 48 px: 8 ms against 98 ms), and slower where
# the map outgrows the channels (0.69x on the 64-channel 12 x 12 at 48 px; on the 28 x 28 maps at 224 px
# the two traded places between runs): copying the unfolded input then costs more than the product saves.
SMALL_MAP = 196
ENV_SMALL_MAP = "FER_KERNELS_SMALL_MAP"
if os.environ.get(ENV_SMALL_MAP, "").strip():
    try:
        SMALL_MAP = int(os.environ[ENV_SMALL_MAP])
    except ValueError:
        raise ValueError(f"{ENV_SMALL_MAP}={os.environ[ENV_SMALL_MAP]!r}: expected a number of output positions "
                         f"(0 turns the unfolded weight gradient off; the default is {SMALL_MAP})") from None
# The unfolded input is built for this many bytes at a time (whole samples), so that a large batch does not
# allocate one huge matrix.
_CHUNK_BYTES = 32 << 20


def unfolds_weight_grad(positions: int, out_channels: int) -> bool:
    """Whether a layer with this many output positions and channels takes the unfolded weight gradient."""
    return 0 < positions <= min(SMALL_MAP, out_channels)


def conv2d_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight_shape, stride, padding) -> torch.Tensor:
    """The weight gradient of ``F.conv2d(x, w, stride=stride, padding=padding)`` (no dilation, one group)
    for the output gradient ``grad``: sum over samples of grad (K x P) @ unfold(x) (P x kh*kw*C).

    Computed in channels-last order (kernel position outer, input channel inner), which is also the
    order of a channels-last weight; returned with the strides of a channels-last weight."""
    n, k, ho, wo = grad.shape
    c, kh, kw = weight_shape[1], weight_shape[2], weight_shape[3]
    (sh, sw), (ph, pw) = stride, padding
    out = grad.new_zeros((k, kh * kw * c))
    if n == 0:
        return out.view(k, kh, kw, c).permute(0, 3, 1, 2)
    rows = max(1, _CHUNK_BYTES // max(1, ho * wo * kh * kw * c * x.element_size()))
    for start in range(0, n, rows):
        xs = x[start:start + rows].permute(0, 2, 3, 1)  # N H W C: a view for channels-last inputs
        if ph or pw:
            xs = F.pad(xs, (0, 0, pw, pw, ph, ph))
        # windows: N x Ho x Wo x C x kh x kw (views), then one copy into rows of (kh, kw, C)
        cols = xs.unfold(1, kh, sh).unfold(2, kw, sw).permute(0, 1, 2, 4, 5, 3).reshape(-1, kh * kw * c)
        g = grad[start:start + rows].permute(0, 2, 3, 1).reshape(-1, k)
        out.addmm_(g.t(), cols)
    return out.view(k, kh, kw, c).permute(0, 3, 1, 2)


class _SmallMapConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, has_bias = ctx.conv
        dx = dw = dbias = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, (1, 1), False, (0, 0),
                                                     1, (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            dw = conv2d_weight_grad(grad, x, weight.shape, stride, padding)
            # the parameter's own layout, so that gradient accumulation needs no reordering copy
            channels_last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
            dw = dw.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if has_bias and ctx.needs_input_grad[2]:
            dbias = grad.sum((0, 2, 3))
        return dx, dw, dbias, None, None


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` with the unfolded weight gradient for small output maps on the CPU (module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._small_map_path(x):
            return _SmallMapConv.apply(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)

    def _small_map_path(self, x: torch.Tensor) -> bool:
        if not (torch.is_grad_enabled() and self.weight.requires_grad and x.device.type == "cpu" and x.dim() == 4):
            return False
        if torch.jit.is_tracing() or torch.jit.is_scripting():  # exporters see the plain convolution
            return False
        if (x.dtype not in (torch.float32, torch.float64) or self.weight.dtype != x.dtype
                or torch.is_autocast_enabled("cpu")):
            return False
        if self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return False
        (h, w), (kh, kw) = x.shape[-2:], self.kernel_size
        ho = (h + 2 * self.padding[0] - kh) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - kw) // self.stride[1] + 1
        return unfolds_weight_grad(ho * wo, self.out_channels)
