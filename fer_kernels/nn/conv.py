"""Conv2d that, on the CPU, computes small output maps with plain matrix products instead of oneDNN.

oneDNN computes a convolution's weight gradient with blocked kernels tuned for large feature maps; on maps
of a few positions (a 48 px face leaves ResNet's stage 4 at 2 x 2 and stage 3 at 3 x 3) they spend most of
their time reordering the weights. For batch 32, 512 -> 512 channels, a 3x3 kernel on a 2 x 2 map, its
weight gradient takes 50-100 ms on 2 AVX2 cores, while unfolding the input into a (N*P) x (kh*kw*C)
matrix and multiplying it by the output gradient takes 6-9 ms; a whole ResNet-18 training step at 48 px
is 1.5-1.6x faster (benchmarks/bench_conv.py has the figures for every layer shape and the step). That
unfolded weight gradient is used where the output map has no more positions than the layer has output
channels (and at most SMALL_MAP): beyond, copying the unfolded input costs more than the product saves,
and the forward pass and input gradient stay with oneDNN, which is fast there.

Output maps of at most TAP_MAP positions under a kernel larger than 1 x 1 (stage 4 at 48 px) go further:
the forward pass and both gradients are one matrix product per kernel tap over the (output, input)
position pairs it joins (conv2d_by_taps). im2col and oneDNN multiply the zero padding too, which on such
maps is most of the work: a 3x3 kernel over a 2 x 2 map joins 16 pairs where im2col computes 36.

bfloat16 (CPU autocast to bfloat16, or a bfloat16 layer and input) has limits of its own, measured on CPUs
with AVX-512 BF16, where oneDNN's bfloat16 kernels are as wasteful on small maps: by taps on output maps of
at most BF16_TAP_MAP positions, 1 x 1 kernels included, and the unfolded weight gradient up to BF16_SMALL_MAP.
The products take bfloat16 operands like oneDNN's; the sums over taps are kept in float32 and rounded once.

The paths are taken only where they are exact (bfloat16: to its rounding) and measured: on the CPU, float32
or float64 without autocast, or bfloat16 as above, zero padding, no dilation, no groups, and when gradients
are being recorded; everything else is ``torch.nn.Conv2d`` itself, and parameters and state-dict keys are
Conv2d's. Under torch.compile the products by tap and every bfloat16 path are left out (the taps' non-finite
guard is a data-dependent branch; bfloat16 under compile is not measured). FER_KERNELS_SMALL_MAP=0 in the
environment (read at import) turns all of them off; another number caps the largest map they serve.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from fer_kernels.ops._layout import in_format, is_channels_last, tail_format, window_output_size

__all__ = ["BF16_SMALL_MAP", "BF16_TAP_MAP", "Conv2d", "SMALL_MAP", "TAP_MAP", "conv2d_by_taps", "conv2d_weight_grad"]

# Output positions (Ho x Wo) up to which the unfolded weight gradient may be used; it is used where the map
# also has no more positions than the layer has output channels (unfolds_weight_grad). Measured on 2 AVX2
# cores (benchmarks/results/cpu-amd-epyc-conv.json): 1.1-8.6x as fast as oneDNN's on every such layer of
# ResNet-18 at 48 and 224 px (the 512-channel 3x3 on 2 x 2 at 48 px: 7.6 ms against 65 ms, oneDNN's taking
# 98-114 ms in other runs; below 1x on single layers in some runs), and slower where
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
# Output positions up to which a layer on the unfolded path computes everything by taps (by_taps).
TAP_MAP = 4
# The same two limits for bfloat16, measured on 2 cores with AVX-512 BF16 against oneDNN's bfloat16 passes
# (benchmarks/results/cpu-avx512-bf16-conv/): by taps for 1 x 1 kernels too (the 512-channel 3x3 on 2 x 2,
# batch 32: forward + both gradients 3.3-4.5 ms against 9-13.5 ms; the gate's 1x1 on 1 x 1: 0.33 against
# 0.93 ms), and on 3 x 3 maps no faster than unfolded; the unfolded weight gradient up to 7 x 7 (224 px
# stage 4), beyond which oneDNN's bfloat16 passes are as fast or faster.
BF16_TAP_MAP = 4
BF16_SMALL_MAP = 49
# The unfolded input is built for this many bytes at a time (whole samples), so that a large batch does not
# allocate one huge matrix.
_CHUNK_BYTES = 32 << 20


def by_taps(out_positions: int, kernel_taps: int, bfloat16: bool = False) -> bool:
    """Whether a layer on the unfolded path computes its forward pass and both gradients by kernel tap
    (conv2d_by_taps) instead: output maps of at most TAP_MAP positions under a kernel larger than 1 x 1; in
    bfloat16, of at most BF16_TAP_MAP positions under any kernel."""
    if bfloat16:
        return 0 < out_positions <= BF16_TAP_MAP
    return 0 < out_positions <= TAP_MAP and kernel_taps > 1


def unfolds_weight_grad(positions: int, out_channels: int, bfloat16: bool = False) -> bool:
    """Whether a layer with this many output positions and channels takes the unfolded weight gradient."""
    limit = min(SMALL_MAP, BF16_SMALL_MAP) if bfloat16 else SMALL_MAP
    return 0 < positions <= min(limit, out_channels)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of products are kept in: float32 for the 16-bit types, so that they are rounded once."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def conv2d_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight_shape, stride, padding) -> torch.Tensor:
    """The weight gradient of ``F.conv2d(x, w, stride=stride, padding=padding)`` (no dilation, one group)
    for the output gradient ``grad``: sum over samples of grad (K x P) @ unfold(x) (P x kh*kw*C).

    Computed in channels-last order (kernel position outer, input channel inner), which is also the
    order of a channels-last weight; returned with the strides of a channels-last weight."""
    n, k, ho, wo = grad.shape
    c, kh, kw = weight_shape[1], weight_shape[2], weight_shape[3]
    (sh, sw), (ph, pw) = stride, padding
    if n == 0:
        return grad.new_zeros((k, kh, kw, c)).permute(0, 3, 1, 2)
    rows = max(1, _CHUNK_BYTES // max(1, ho * wo * kh * kw * c * x.element_size()))
    # one chunk: its product is the gradient; more: summed in the accumulator dtype, rounded once at the end
    out = None if rows >= n else grad.new_zeros((k, kh * kw * c), dtype=_accumulator(grad.dtype))
    for start in range(0, n, rows):
        xs = x[start:start + rows].permute(0, 2, 3, 1)  # N H W C: a view for channels-last inputs
        if ph or pw:
            xs = F.pad(xs, (0, 0, pw, pw, ph, ph))
        # windows: N x Ho x Wo x C x kh x kw (views), then one copy into rows of (kh, kw, C)
        cols = xs.unfold(1, kh, sh).unfold(2, kw, sw).permute(0, 1, 2, 4, 5, 3).reshape(-1, kh * kw * c)
        g = grad[start:start + rows].permute(0, 2, 3, 1).reshape(-1, k)
        if out is None:
            out = torch.mm(g.t(), cols)
        elif out.dtype == cols.dtype:
            out.addmm_(g.t(), cols)
        else:
            out.add_(torch.mm(g.t(), cols))
    return out.to(grad.dtype).view(k, kh, kw, c).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=64)
def tap_windows(in_size: tuple, kernel: tuple, stride: tuple, padding: tuple) -> tuple:
    """The output map size and, for each kernel tap that touches the input map, (tap index i * kw + j, the
    output window, the input window). The output window is the rectangle of output positions (a, b) whose
    tap lands inside the input map, at (a * stride - padding + i, b * stride - padding + j): the input window,
    a rectangle too, every stride-th row and column. Each window is a (rows, columns) pair of slices, so
    gathering and adding a tap's positions are strided views rather than index lists (index_add_ and
    aten::index: a model step at 48 px, batch 32, 267.2 ms with them against 263.0 ms, taking turns in one
    process). Taps that fall on padding alone are left out, and so is every padding position."""
    (h, w), (kh, kw), (sh, sw), (ph, pw) = in_size, kernel, stride, padding
    ho, wo = window_output_size(in_size, kernel, stride, padding)
    taps = []
    for i in range(kh):
        rows = _tap_span(i, ph, sh, h, ho)
        for j in range(kw):
            columns = _tap_span(j, pw, sw, w, wo)
            if rows is not None and columns is not None:
                taps.append((i * kw + j, (rows[0], columns[0]), (rows[1], columns[1])))
    return (ho, wo), tuple(taps)


def _tap_span(tap: int, pad: int, step: int, size: int, out_size: int):
    """Along one axis: (the output indices a with 0 <= a * step - pad + tap < size, the input indices they
    land on) as two slices, or None where the tap lands on padding only."""
    first = max(0, -((tap - pad) // step))  # the smallest a with a * step >= pad - tap
    last = min(out_size - 1, (size - 1 + pad - tap) // step)
    if last < first:
        return None
    start = first * step - pad + tap
    return slice(first, last + 1), slice(start, start + (last - first) * step + 1, step)


def _by_tap(weight: torch.Tensor) -> torch.Tensor:
    """K x C x kh x kw -> (kh * kw) x K x C: a view for a channels-last weight, else one copy."""
    k, c, kh, kw = weight.shape
    return weight.permute(2, 3, 0, 1).reshape(kh * kw, k, c)


def _by_position(t: torch.Tensor) -> torch.Tensor:
    """N x C x H x W -> H x W x N x C, one small copy: each position's N x C matrix contiguous."""
    return t.permute(2, 3, 0, 1).contiguous()


def conv2d_by_taps(x: torch.Tensor, weight: torch.Tensor, bias, stride, padding) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (no dilation, one group) as one matrix product per
    kernel tap over the window of positions it joins (tap_windows): on a map smaller than the kernel, im2col
    and oneDNN multiply mostly padding, which this skips (2 x 2 under a 3x3 kernel: 16 of 36 products).
    The output has F.conv2d's layout (channels-last when x or the weight is)."""
    n, c, h, w = x.shape
    k, _, kh, kw = weight.shape
    (ho, wo), taps = tap_windows((h, w), (kh, kw), tuple(stride), tuple(padding))
    xs = _by_position(x)
    wt = _by_tap(weight)
    dtype = _accumulator(x.dtype)
    acc = bias.to(dtype).expand(ho, wo, n, k).clone() if bias is not None else x.new_zeros(ho, wo, n, k, dtype=dtype)
    for tap, out_window, in_window in taps:
        target = acc[out_window]
        target.add_(torch.mm(xs[in_window].reshape(-1, c), wt[tap].t()).view(target.shape))
    out = acc.to(x.dtype).permute(2, 3, 0, 1)
    return in_format(out, torch.channels_last if is_channels_last(x) or is_channels_last(weight)
                     else torch.contiguous_format)


def conv2d_by_taps_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding,
                            need_input: bool, need_weight: bool) -> tuple:
    """The input and weight gradients of conv2d_by_taps, from the same per-tap windows: dx over the input
    window collects grad(output window) @ W(tap); dW(tap) is grad(output window)^T @ x(input window). The
    weight gradient has the weight's layout."""
    n, c, h, w = x.shape
    k, _, kh, kw = weight.shape
    _, taps = tap_windows((h, w), (kh, kw), tuple(stride), tuple(padding))
    xs, gs = _by_position(x), _by_position(grad)
    wt = _by_tap(weight)
    dxs = x.new_zeros(h, w, n, c, dtype=_accumulator(x.dtype)) if need_input else None
    dwt = _weight_grad_by_tap(weight, {tap for tap, _, _ in taps}) if need_weight else None
    for tap, out_window, in_window in taps:
        g = gs[out_window].reshape(-1, k)
        if need_input:
            target = dxs[in_window]
            target.add_(torch.mm(g, wt[tap]).view(target.shape))
        if need_weight:
            torch.mm(g.t(), xs[in_window].reshape(-1, c), out=dwt[tap])
    dx = dw = None
    if need_input:
        dx = in_format(dxs.to(x.dtype).permute(2, 3, 0, 1), tail_format(x))
    if need_weight:
        dw = dwt.view(kh, kw, k, c).permute(2, 3, 0, 1)
        dw = _strides_of(in_format(dw, tail_format(weight)), weight)
    return dx, dw


def _strides_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t viewed with like's strides where they differ only on dimensions of size 1, which address the same
    elements: a 1 x 1 kernel's gradient made tap-major has the right layout but other strides there, and DDP
    compares strides to its buckets' (and warns on every step)."""
    if t.stride() != like.stride() and t.shape == like.shape and all(
            a == b for size, a, b in zip(t.shape, t.stride(), like.stride()) if size > 1):
        return t.as_strided(t.shape, like.stride())
    return t


def _weight_grad_by_tap(weight: torch.Tensor, written: set) -> torch.Tensor:
    """The (kh * kw) x K x C buffer that conv2d_by_taps_backward's per-tap products write into, the taps not
    in `written` zeroed. For a channels-last weight it is a view of a K x kh x kw x C block, the weight's own
    order, so the products land in place (each tap's K x C rows are strided, which the product takes) and
    the gradient needs neither a zeroed buffer nor a reordering copy. A training step at 48 px, batch 32,
    taking turns with the zeroed buffer and copy in one process: 303.8 against 308.3 ms (median of 40 each).
    The profiler puts 22 ms on the fill and the copy, but most of that moves into the products, which then
    write to memory not yet in cache."""
    k, c, kh, kw = weight.shape
    if tail_format(weight) == torch.channels_last:
        dwt = weight.new_empty(k, kh * kw, c).transpose(0, 1)
    else:
        dwt = weight.new_empty(kh * kw, k, c)
    for tap in range(kh * kw):
        if tap not in written:
            dwt[tap].zero_()
    return dwt


class _SmallMapConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, taps):
        ctx.save_for_backward(x, weight)
        # Zero padding times a non-finite weight is NaN in F.conv2d; the products by taps skip the padding, so
        # a non-finite weight (its sum is then not finite) goes to F.conv2d to keep torch's NaNs.
        taps = taps and x.shape[0] > 0 and math.isfinite(weight.sum())
        ctx.conv = (stride, padding, bias is not None, taps)
        if taps:
            return conv2d_by_taps(x, weight, bias, stride, padding)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, has_bias, taps = ctx.conv
        dx = dw = dbias = None
        taps = taps and math.isfinite(grad.sum())  # the same for padding times a non-finite gradient
        if taps and any(ctx.needs_input_grad[:2]):
            dx, dw = conv2d_by_taps_backward(grad, x, weight, stride, padding, *ctx.needs_input_grad[:2])
        if has_bias and ctx.needs_input_grad[2]:
            dbias = grad.sum((0, 2, 3))
        if taps:
            return dx, dw, dbias, None, None, None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, (1, 1), False, (0, 0),
                                                     1, (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            dw = conv2d_weight_grad(grad, x, weight.shape, stride, padding)
            # the parameter's own layout, so that gradient accumulation needs no reordering copy
            dw = in_format(dw, tail_format(weight))
        return dx, dw, dbias, None, None, None


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` with matrix-product passes for small output maps on the CPU (module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self._small_map_path(x)
        if not path:
            return super().forward(x)
        taps = path == "taps"
        if torch.is_autocast_enabled("cpu"):  # autocast's casts for a convolution, then our passes in bfloat16
            x, weight, bias = (None if t is None else t.to(torch.bfloat16) for t in (x, self.weight, self.bias))
            with torch.autocast("cpu", enabled=False):
                return _SmallMapConv.apply(x, weight, bias, self.stride, self.padding, taps)
        return _SmallMapConv.apply(x, self.weight, self.bias, self.stride, self.padding, taps)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype the convolution computes in where one of our paths may serve it: float32 or float64 without
        autocast, bfloat16 for a bfloat16 layer and input or under CPU autocast to bfloat16; else None."""
        if torch.is_autocast_enabled("cpu"):
            usable = (torch.get_autocast_dtype("cpu") == torch.bfloat16
                      and x.dtype in (torch.float32, torch.bfloat16)
                      and self.weight.dtype in (torch.float32, torch.bfloat16))
            return torch.bfloat16 if usable else None
        if x.dtype in (torch.float32, torch.float64, torch.bfloat16) and self.weight.dtype == x.dtype:
            return x.dtype
        return None

    def _small_map_path(self, x: torch.Tensor) -> str | None:
        """"taps", "unfolded" or None (torch.nn.Conv2d's own)."""
        if not (torch.is_grad_enabled() and self.weight.requires_grad and x.device.type == "cpu" and x.dim() == 4):
            return None
        if torch.jit.is_tracing() or torch.jit.is_scripting():  # exporters see the plain convolution
            return None
        dtype = self._compute_dtype(x)
        bfloat16 = dtype == torch.bfloat16
        # Under torch.compile the products by taps are left out: their guard against non-finite weights
        # (_SmallMapConv.forward) is a data-dependent branch, which would break the graph. bfloat16 there is
        # left to oneDNN, as it was not measured.
        compiling = torch.compiler.is_compiling()
        if dtype is None or (bfloat16 and compiling):
            return None
        if self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return None
        kh, kw = self.kernel_size
        ho, wo = window_output_size(x.shape[-2:], self.kernel_size, self.stride, self.padding)
        if not (ho > 0 and wo > 0 and unfolds_weight_grad(ho * wo, self.out_channels, bfloat16)):
            return None
        taps = by_taps(ho * wo, kh * kw, bfloat16) and not compiling
        return "taps" if taps else "unfolded"
