"""fer_kernels.nn.Conv2d: the unfolded weight gradient for small maps, and the products by kernel tap for maps
smaller than the kernel, against torch.nn.Conv2d's autograd."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fer_kernels.nn.conv as conv
from fer_kernels.models import resnet18
from fer_kernels.nn import Conv2d
from fer_kernels.ops._layout import window_output_size

# (in channels, out channels, kernel, stride, padding, input H x W): stage 3-4 shapes of a ResNet at 48 px,
# odd and non-square kernels, maps, strides and paddings, and the ABP gate's 1x1 on a 1 x 1 map
SHAPES = [  # out channels >= output positions, so that every shape takes the unfolded path
    (8, 8, 3, 1, 1, (2, 2)),  # output maps of at most TAP_MAP = 4 positions (here the first six) go by taps
    (6, 8, 3, 1, 1, (1, 1)),
    (5, 9, (3, 5), 1, (1, 2), (2, 2)),
    (4, 8, 3, 2, 1, (2, 1)),
    (3, 6, 5, 1, 2, (1, 3)),
    (6, 10, 3, 2, 1, (3, 3)),
    (5, 7, 1, 1, 0, (1, 1)),
    (4, 6, 1, 2, 0, (5, 3)),
    (3, 12, (3, 5), (2, 1), (1, 2), (4, 3)),
    (3, 12, 7, 2, 3, (7, 5)),
    (2, 4, 3, 1, 0, (3, 4)),
    (4, 9, 2, 2, 0, (6, 6)),
]


def _pair(layer_args, dtype, bias):
    cin, cout, kernel, stride, padding, _ = layer_args
    ours = Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=bias).to(dtype)
    plain = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=bias).to(dtype)
    plain.load_state_dict(ours.state_dict())
    return ours, plain


def _grads(layer, x, grad):
    x = x.detach().requires_grad_()
    out = layer(x)
    out.backward(grad)
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    return out, grads


def _count_calls(monkeypatch):
    """Records which of our backward paths ran: "unfolded" (oneDNN input gradient, unfolded weight gradient)
    or "taps" (both gradients by kernel tap)."""
    calls = []
    for name, function in (("unfolded", "conv2d_weight_grad"), ("taps", "conv2d_by_taps_backward")):
        real = getattr(conv, function)
        monkeypatch.setattr(conv, function, lambda *a, name=name, real=real: calls.append(name) or real(*a))
    return calls


def _takes_taps(layer, x) -> bool:
    return layer._small_map_path(x) == "taps"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}-k{s[2]}-s{s[3]}-p{s[4]}-{s[5]}")
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("bias", [False, True])
def test_gradients_equal_torch_conv2d_in_float64(shape, layout, bias, monkeypatch):
    calls = _count_calls(monkeypatch)
    torch.manual_seed(0)
    ours, plain = _pair(shape, torch.float64, bias)
    x = torch.randn(3, shape[0], *shape[5], dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        ours, plain = ours.to(memory_format=torch.channels_last), plain.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(3, shape[0] * 2, *shape[5], dtype=torch.float64)[:, ::2]
    grad = torch.randn_like(plain(x))
    out, got = _grads(ours, x, grad)
    ref_out, want = _grads(plain, x, grad)
    assert calls == ["taps" if _takes_taps(ours, x) else "unfolded"], calls
    if calls == ["unfolded"]:  # oneDNN's forward itself
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last) == ref_out.is_contiguous(
        memory_format=torch.channels_last), "the output must have F.conv2d's layout"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    if layout == "channels_last" and ours.weight.shape[-1] > 1:
        assert ours.weight.grad.stride() == ours.weight.stride(), "the gradient must have the weight's layout"


@pytest.mark.parametrize("size", [2, 3], ids=["taps", "unfolded"])
def test_float32_within_float32_tolerance(size, monkeypatch):
    calls = _count_calls(monkeypatch)
    torch.manual_seed(1)
    ours, plain = _pair((64, 64, 3, 1, 1, (size, size)), torch.float32, True)
    ours, plain = ours.to(memory_format=torch.channels_last), plain.to(memory_format=torch.channels_last)
    x = torch.randn(16, 64, size, size).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(16, 64, size, size)
    out, got = _grads(ours, x, grad)
    ref_out, want = _grads(plain.double(), x.double(), grad.double())
    assert calls == ["taps" if size == 2 else "unfolded"]
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


# (in channels, out channels, kernel, stride, padding, input H x W, the bfloat16 path): stage 4 at 48 px, a
# 5x3 kernel on 1 x 3, the gate's 1x1 on 1 x 1 and a strided 1x1 (by taps in bfloat16 only), 3 x 3, 6 x 6 and
# 7 x 7 maps
BF16_SHAPES = [
    (32, 32, 3, 1, 1, (2, 2), "taps"),
    (16, 24, (5, 3), 1, (2, 1), (1, 3), "taps"),
    (48, 48, 1, 1, 0, (1, 1), "taps"),
    (16, 32, 1, 2, 0, (3, 3), "taps"),
    (16, 24, 3, 1, 1, (3, 3), "unfolded"),
    (8, 40, 3, 2, 1, (12, 12), "unfolded"),
    (8, 64, 3, 1, 1, (7, 7), "unfolded"),
]


def _bfloat16_reference(plain, x, grad):
    """Output and gradients in float64 from the bfloat16-rounded input, weight, bias and output gradient: what
    a bfloat16 convolution computes before its own rounding."""
    plain = copy.deepcopy(plain).double()
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(p.bfloat16().double())
            p.grad = None
    return _grads(plain, x.bfloat16().double(), grad.bfloat16().double())


@pytest.mark.parametrize("shape", BF16_SHAPES, ids=lambda s: f"{s[0]}-{s[1]}-k{s[2]}-s{s[3]}-{s[5][0]}x{s[5][1]}")
@pytest.mark.parametrize("how", ["autocast", "bfloat16 layer"])
def test_bfloat16_within_its_rounding_and_as_close_as_onednn(shape, how, monkeypatch):
    """Under CPU autocast to bfloat16 (float32 weights and input) or for a bfloat16 layer and input, the
    bfloat16 paths give the float64 result of the rounded operands to bfloat16's rounding, no further from
    it than oneDNN's bfloat16 convolution is (2x, as the sums by tap differ in order)."""
    calls = _count_calls(monkeypatch)
    torch.manual_seed(5)
    ours, plain = _pair(shape[:6], torch.float32, True)
    ours, plain = ours.to(memory_format=torch.channels_last), plain.to(memory_format=torch.channels_last)
    x = torch.randn(8, shape[0], *shape[5]).contiguous(memory_format=torch.channels_last)
    out_map = window_output_size(shape[5], ours.kernel_size, ours.stride, ours.padding)
    grad = torch.randn(8, shape[1], *out_map).bfloat16()
    if how == "bfloat16 layer":
        ours, plain, x = ours.bfloat16(), plain.bfloat16(), x.bfloat16()
    with torch.autocast("cpu", torch.bfloat16, enabled=how == "autocast"):
        out, got = _grads(ours, x, grad)
        onednn_out, onednn = _grads(plain, x, grad)
    ref_out, want = _bfloat16_reference(plain, x, grad)
    assert calls == [shape[6]]
    assert out.dtype == torch.bfloat16 and [g.dtype for g in got] == [x.dtype] + [p.dtype for p in ours.parameters()]
    for name, g, o, w in zip(["output", "input", "weight", "bias"], [out, *got], [onednn_out, *onednn],
                             [ref_out, *want]):
        scale = w.abs().max().item()
        error, onednn_error = (g.double() - w).abs().max().item(), (o.double() - w).abs().max().item()
        assert error <= 2 ** -7 * scale, (name, error, scale)
        assert error <= 2 * onednn_error + 2 ** -10 * scale, (name, error, onednn_error, scale)


def test_bfloat16_weight_gradient_over_chunks_is_summed_in_float32(monkeypatch):
    """Summed in bfloat16, 64 chunks of positive products would lose about 1 % (each addition rounds to 8 bits
    against a growing sum); kept in float32, the gradient is the float64 sum to bfloat16's last bits."""
    monkeypatch.setattr(conv, "_CHUNK_BYTES", 1)  # one sample at a time
    torch.manual_seed(6)
    x = torch.rand(64, 6, 2, 3).bfloat16()
    grad = torch.rand(64, 4, 2, 3).bfloat16()
    got = conv.conv2d_weight_grad(grad, x, (4, 6, 3, 3), (1, 1), (1, 1))
    w = torch.zeros(4, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    want, = torch.autograd.grad(F.conv2d(x.double(), w, padding=1), w, grad.double())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("size", [(3, 2), (2, 2)], ids=["unfolded", "taps"])
def test_gradcheck(size):
    torch.manual_seed(2)
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    taps = size == (2, 2)
    assert torch.autograd.gradcheck(lambda x, w, b: conv._SmallMapConv.apply(x, w, b, (2, 1), (1, 1), taps), (x, w, b))


def test_tap_windows_join_exactly_the_pairs_of_the_definition():
    # every (output, input) position pair a tap joins, by the definition p = q * stride - padding + tap,
    # against the pairs the windows' slices give; maps, kernels, strides and paddings around the edge cases
    for h, w, kh, kw, sh, sw, ph, pw in [(2, 2, 3, 3, 1, 1, 1, 1), (1, 3, 5, 5, 1, 1, 2, 2), (4, 3, 3, 5, 2, 1, 1, 2),
                                         (2, 1, 3, 3, 2, 2, 1, 1), (7, 5, 7, 7, 2, 2, 3, 3), (3, 4, 3, 3, 1, 1, 0, 0),
                                         (6, 6, 2, 2, 2, 2, 0, 0), (1, 1, 3, 3, 3, 3, 2, 2), (5, 2, 1, 1, 2, 3, 0, 0)]:
        (ho, wo), taps = conv.tap_windows((h, w), (kh, kw), (sh, sw), (ph, pw))
        assert (ho, wo) == window_output_size((h, w), (kh, kw), (sh, sw), (ph, pw))
        out_ids, in_ids = torch.arange(ho * wo).view(ho, wo), torch.arange(h * w).view(h, w)
        got = {tap: set(zip(out_ids[q].flatten().tolist(), in_ids[p].flatten().tolist())) for tap, q, p in taps}
        want = {}
        for i in range(kh):
            for j in range(kw):
                pairs = {(a * wo + b, (a * sh - ph + i) * w + b * sw - pw + j) for a in range(ho) for b in range(wo)
                         if 0 <= a * sh - ph + i < h and 0 <= b * sw - pw + j < w}
                if pairs:
                    want[i * kw + j] = pairs
        assert got == want, (h, w, kh, kw, sh, sw, ph, pw)
        # each window pair has one shape, so a tap's product fits its output window
        assert all(out_ids[q].shape == in_ids[p].shape for _, q, p in taps)


def test_large_batches_are_unfolded_in_chunks(monkeypatch):
    monkeypatch.setattr(conv, "_CHUNK_BYTES", 1)  # one sample at a time
    torch.manual_seed(3)
    x = torch.randn(5, 6, 2, 3, dtype=torch.float64)
    grad = torch.randn(5, 4, 2, 3, dtype=torch.float64)
    w = torch.randn(4, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    want, = torch.autograd.grad(F.conv2d(x, w, padding=1), w, grad)
    torch.testing.assert_close(conv.conv2d_weight_grad(grad, x, w.shape, (1, 1), (1, 1)), want)


def test_empty_batch_gives_zero_weight_gradient(monkeypatch):
    calls = _count_calls(monkeypatch)
    layer = Conv2d(3, 4, 3, padding=1, bias=True).double()
    x = torch.zeros(0, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert calls
    assert x.grad.shape == x.shape
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
    assert torch.equal(layer.bias.grad, torch.zeros_like(layer.bias))


@pytest.mark.parametrize("size", [2, 3], ids=["taps", "unfolded"])
@pytest.mark.parametrize("where", ["input", "weight", "grad"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_non_finite_values_propagate_like_torch(size, where, dtype, monkeypatch):
    """Also where F.conv2d's zero padding meets an inf or NaN (0 * inf = NaN), which the products by taps skip.
    In bfloat16 torch's own convolution (oneDNN's) departs from the math too, and not alike on every CPU: it
    skips the padding, turns a sample with an infinite input wholly into NaN where the sums are +-inf, and on
    CPUs with AMX also skips the padding in the weight gradient. There each result must be non-finite exactly
    where torch's bfloat16 one is, or exactly where the float64 one of the same rounded operands is, and the
    entries finite in both agree with torch's."""
    calls = _count_calls(monkeypatch)
    ours, plain = _pair((3, 12, 3, 1, 1, (size, size)), dtype, False)
    x = torch.randn(2, 3, size, size, dtype=dtype)
    grad = torch.randn(2, 12, size, size, dtype=dtype)
    if where == "input":
        x[0, 1, 0, 0], x[1, 2, 1, 1] = float("nan"), float("inf")
    elif where == "weight":
        with torch.no_grad():
            for layer in (ours, plain):
                layer.weight[0, 1, 0, 0], layer.weight[2, 0, 2, 1] = float("inf"), float("nan")
    else:
        grad[0, 3, 1, 0], grad[1, 0, 0, 1] = float("inf"), float("nan")
    exact = copy.deepcopy(plain).double()  # the same rounded weights, before any gradient is accumulated
    out, got = _grads(ours, x, grad)
    ref_out, want = _grads(plain, x, grad)
    exact_out, exact_grads = _grads(exact, x.double(), grad.double())
    assert calls
    for g, w, e in zip([out, *got], [ref_out, *want], [exact_out, *exact_grads]):
        if dtype == torch.float64:
            torch.testing.assert_close(g, w, equal_nan=True)
        else:
            assert torch.equal(g.isfinite(), w.isfinite()) or torch.equal(g.isfinite(), e.isfinite())
            both = g.isfinite() & w.isfinite()
            torch.testing.assert_close(g[both], w[both], rtol=2 ** -7, atol=2 ** -6)


@pytest.mark.parametrize("case", ["large map", "map larger than the channels", "groups", "dilation", "same padding",
                                  "reflect padding", "float16", "autocast to float16", "bfloat16 map over its limit",
                                  "no grad", "frozen weight"])
def test_other_convolutions_are_torch_conv2d(case, monkeypatch):
    calls = _count_calls(monkeypatch)
    options = {"groups": {"groups": 2}, "dilation": {"dilation": 2}, "same padding": {"padding": "same"},
               "reflect padding": {"padding_mode": "reflect"}}.get(case, {})
    options.setdefault("padding", 1)
    channels = 4 if case == "map larger than the channels" else 16
    layer = Conv2d(4, channels, 3, **options)
    # 16 x 16 = 256 output positions, over SMALL_MAP; 8 x 8 = 64 over BF16_SMALL_MAP; 3 x 3 = 9 against 4 channels
    size = {"large map": 16, "bfloat16 map over its limit": 8}.get(case, 3)
    x = torch.randn(2, 4, size, size, requires_grad=True)
    if case in ("float16", "bfloat16 map over its limit"):
        dtype = torch.float16 if case == "float16" else torch.bfloat16
        layer, x = layer.to(dtype), x.detach().to(dtype).requires_grad_()
    if case == "frozen weight":
        layer.requires_grad_(False)
    plain = nn.Conv2d(4, channels, 3, **options).to(layer.weight.dtype).requires_grad_(layer.weight.requires_grad)
    plain.load_state_dict(layer.state_dict())
    with torch.set_grad_enabled(case != "no grad"), torch.autocast("cpu", torch.float16,
                                                                   enabled=case == "autocast to float16"):
        out, ref = layer(x), plain(x)
        if out.requires_grad:
            out.sum().backward()
    assert not calls
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_resnet_at_48px_uses_it_and_matches_plain_convolutions(monkeypatch):
    """The model built with Conv2d trains to the same gradients as with torch.nn.Conv2d's own passes."""
    calls = _count_calls(monkeypatch)
    torch.manual_seed(4)
    model = resnet18(num_classes=8, fused=False).double()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    model(x).logsumexp(1).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    used = len(calls)
    model.zero_grad()
    monkeypatch.setattr(conv, "SMALL_MAP", 0)
    model(x).logsumexp(1).sum().backward()
    assert used >= 8, f"stages 3 and 4 should use it at 48 px, used {used} times"
    assert calls[:used].count("taps") == 4, "stage 4's four 3x3 convolutions (2 x 2 output maps) go by taps"
    for name, p in model.named_parameters():
        # the forward by taps rounds differently from oneDNN's; batch norm over 2 samples amplifies that to
        # ~2e-12 of a gradient's largest entry, while a wrong tap or position would be off by O(1)
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(got[name], p.grad, rtol=0, atol=1e-10 * max(scale, 1e-3), msg=name)


def test_resnet_at_48px_under_bfloat16_autocast_uses_the_bfloat16_limits(monkeypatch):
    """Stage 4 (2 x 2 maps) by taps, stages 3 and 2 (3 x 3, 6 x 6) unfolded, stage 1 (12 x 12) and the stem
    oneDNN's (the eight gates' 1x1 convolutions of 1 x 1 maps are matrix products, not convolutions); the
    gradients are as close to float64's as with oneDNN's bfloat16 convolutions."""
    calls = _count_calls(monkeypatch)
    torch.manual_seed(7)
    model = resnet18(num_classes=8).to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    grads = {}
    for name, small_map, autocast in (("ours", conv.SMALL_MAP, True), ("onednn", 0, True), ("float64", 0, False)):
        monkeypatch.setattr(conv, "SMALL_MAP", small_map)
        run = model.double() if name == "float64" else model
        run.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = run(x.to(next(run.parameters()).dtype)).float().logsumexp(1).sum()
        loss.backward()
        grads[name] = {n: p.grad.double() for n, p in run.named_parameters()}
    assert sorted(calls) == ["taps"] * 5 + ["unfolded"] * (5 + 5)
    for name, want in grads["float64"].items():
        error = (grads["ours"][name] - want).norm() / want.norm()
        onednn_error = (grads["onednn"][name] - want).norm() / want.norm()
        # a wrong tap or position would be off by O(1)
        assert error <= 1.5 * onednn_error + 0.01, (name, error, onednn_error)


@pytest.mark.parametrize("value, expected", [("0", "0"), ("64", "64"), ("", str(conv.SMALL_MAP)),
                                             ("many", "FER_KERNELS_SMALL_MAP='many': expected a number")])
def test_the_environment_sets_or_turns_off_the_limit(value, expected):
    env = {**os.environ, "FER_KERNELS_SMALL_MAP": value}
    run = subprocess.run([sys.executable, "-c", "import fer_kernels.nn.conv as c; print(c.SMALL_MAP)"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert expected in (run.stdout if run.returncode == 0 else run.stderr)
    assert (run.returncode == 0) == expected.isdigit()


def test_a_1x1_weight_gradient_has_the_weights_strides():
    """By taps, a 1 x 1 kernel's gradient is made tap-major: the same layout as the channels_last weight, with
    other strides on its size-1 dimensions. It is handed over with the weight's strides, which DDP compares
    with its buckets' (it warned at every step of a 48 px run)."""
    layer = Conv2d(16, 8, 1, stride=2, bias=False).to(memory_format=torch.channels_last)  # a downsample's
    x = torch.randn(2, 16, 2, 2).contiguous(memory_format=torch.channels_last)  # stage 4 at 32 px: 1 x 1 out
    with torch.autocast("cpu", dtype=torch.bfloat16):  # by taps for 1 x 1 kernels in bfloat16
        assert layer._small_map_path(x) == "taps"
        layer(x).float().sum().backward()
    assert layer.weight.grad.stride() == layer.weight.stride()
    expected = x.bfloat16()[:, :, 0, 0].float().sum(0)[None, :, None, None].expand(8, -1, -1, -1)
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-2, atol=1e-2)
