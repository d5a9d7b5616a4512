"""fer_kernels.recalibrate (the block tail act(x * gate + identity)) on every backend against the reference."""

import pytest
import torch

import fer_kernels
from fer_kernels import reference
from helpers import BACKEND_DEVICES, FAST_BACKEND_DEVICES, assert_accurate, ids

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
ACTS = ["mish", "relu", "none"]
SHAPES = [(2, 3, 5, 7), (3, 17, 4, 4), (2, 6, 1, 1)]


def _inputs(shape, dtype, device, gate=True, seed=0, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    x, identity, dy = (torch.randn(shape, generator=gen, dtype=torch.float64).mul(2).to(dtype) for _ in range(3))
    g = torch.rand(shape[0], shape[1], 1, 1, generator=gen, dtype=torch.float64).to(dtype) if gate else None
    if channels_last:
        x, identity, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, identity, dy))
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(x), move(g), move(identity), move(dy)


def _check(x, g, identity, dy, act, backend):
    out = fer_kernels.recalibrate(x, g, identity, act, backend=backend)
    dx, dg, did = torch.ops.fer_kernels.recalibrate_backward(dy, x, g, identity, act, backend)
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    assert_accurate(out, reference.recalibrate(d64(x), d64(g), d64(identity), act),
                    reference.recalibrate(x, g, identity, act), "forward")
    ref = reference.recalibrate_backward(d64(dy), d64(x), d64(g), d64(identity), act)
    plain = reference.recalibrate_backward(dy, x, g, identity, act)
    assert_accurate(dx, ref[0], plain[0], "dx")
    assert_accurate(did, ref[2], plain[2], "didentity")
    if g is not None:
        assert dg.shape == g.shape and dg.dtype == g.dtype
        assert_accurate(dg, ref[1], plain[1], "dgate", dtype=x.dtype)
    return out, dx, dg, did


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=ids(BACKEND_DEVICES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, device, dtype, act, channels_last, shape):
    x, g, identity, dy = _inputs(shape, dtype, device, channels_last=channels_last)
    out, dx, _, did = _check(x, g, identity, dy, act, backend)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=ids(BACKEND_DEVICES))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_without_gate(backend, device, act, channels_last):
    _check(*_inputs((2, 5, 3, 4), torch.float32, device, gate=False, channels_last=channels_last), act, backend)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=ids(BACKEND_DEVICES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_long_reduction_is_split(backend, device, dtype, channels_last):
    """Few planes of many pixels: every backend cuts the per-(n, c) sum into pieces; the sum must not care."""
    _check(*_inputs((1, 2, 256, 300), dtype, device, channels_last=channels_last), "mish", backend)


@pytest.mark.parametrize("backend,device", FAST_BACKEND_DEVICES, ids=ids(FAST_BACKEND_DEVICES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 300, 3, 5), (3, 24, 23, 19)], ids=str)
def test_rows_wider_and_planes_longer_than_a_loop_block(backend, device, channels_last, shape):
    """The CPU loops walk memory in blocks of a few hundred elements (csrc/cpu/cpu_common.h): channels-last
    rows wider than a block, and planes and images that span many blocks and end in a partial one."""
    _check(*_inputs(shape, torch.bfloat16, device, channels_last=channels_last), "mish", backend)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=ids(BACKEND_DEVICES))
def test_ranks_and_layouts(backend, device):
    """N x C, N x C x L and N x C x D x H x W inputs; mixed, gapped and 5-D channels-last layouts."""
    gen = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    cases = {
        "2d": (rnd(4, 6), rnd(4, 6), rnd(4, 6)),
        "3d": (rnd(3, 5, 9), rnd(3, 5), rnd(3, 5, 9)),
        "5d": (rnd(2, 3, 4, 5, 6), rnd(2, 3, 1, 1, 1), rnd(2, 3, 4, 5, 6)),
        "5d channels_last": (rnd(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d), rnd(2, 3),
                             rnd(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)),
        "x nhwc, identity nchw": (rnd(2, 4, 3, 5).contiguous(memory_format=torch.channels_last), rnd(2, 4),
                                  rnd(2, 4, 3, 5)),
        "gapped": (rnd(2, 8, 6, 5)[:, ::2], rnd(2, 4, 1, 1), rnd(2, 4, 6, 5)),
        "expanded gate": (rnd(2, 4, 3, 3), rnd(1, 4, 1, 1).expand(2, 4, 1, 1), rnd(2, 4, 3, 3)),
    }
    for name, (x, g, identity) in cases.items():
        dy = torch.randn(x.shape, generator=gen).to(device)
        out = fer_kernels.recalibrate(x, g, identity, "mish", backend=backend)
        torch.testing.assert_close(out, reference.recalibrate(x, g, identity, "mish"), rtol=1e-5, atol=1e-5, msg=name)
        got = torch.ops.fer_kernels.recalibrate_backward(dy, x, g, identity, "mish", backend)
        want = reference.recalibrate_backward(dy, x, g, identity, "mish")
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            assert out.is_contiguous(memory_format=torch.channels_last), name


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=ids(BACKEND_DEVICES))
def test_gate_dtype_and_shape_are_kept(backend, device):
    x, _, identity, dy = _inputs((2, 3, 4, 4), torch.bfloat16, device, gate=False)
    for g in (torch.rand(2, 3, device=device), torch.rand(2, 3, 1, 1, device=device, dtype=torch.float64)):
        out, _, dg, _ = _check(x, g, identity, dy, "mish", backend)
        assert out.dtype == torch.bfloat16 and dg.shape == g.shape and dg.dtype == g.dtype


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=ids(BACKEND_DEVICES))
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4)], ids=str)
def test_empty(backend, device, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    g = torch.rand(shape[0], shape[1], 1, 1, device=device, requires_grad=True)
    identity = torch.randn(shape, device=device, requires_grad=True)
    out = fer_kernels.recalibrate(x, g, identity, backend=backend)
    out.sum().backward()
    assert out.shape == x.shape
    assert torch.equal(g.grad, torch.zeros_like(g)) and x.grad.shape == x.shape


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=ids(BACKEND_DEVICES))
@pytest.mark.parametrize("act", ACTS)
def test_special_values(backend, device, act):
    """inf and NaN in x, gate and identity propagate as the plain expression does."""
    x = torch.tensor([[[[1.0, float("inf"), float("nan"), -3e38, 2.0, -1.0]]]], dtype=torch.float64)
    identity = torch.tensor([[[[float("-inf"), 1.0, 0.0, -3e38, float("nan"), 1.0]]]], dtype=torch.float64)
    x, identity = x.expand(2, 2, 1, 6).contiguous(), identity.expand(2, 2, 1, 6).contiguous()
    g = torch.tensor([0.5, float("inf"), 0.25, float("nan")], dtype=torch.float64).reshape(2, 2, 1, 1)
    for dtype in (torch.float64, torch.float32):
        args = [t.to(dtype).to(device) for t in (x, g, identity)]
        out = fer_kernels.recalibrate(*args, act, backend=backend)
        want = reference.recalibrate(*args, act)
        assert torch.equal(out.isnan(), want.isnan())
        torch.testing.assert_close(out[~want.isnan()], want[~want.isnan()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=ids(BACKEND_DEVICES))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradcheck(backend, device, act, channels_last):
    x, g, identity, _ = _inputs((2, 3, 3, 4), torch.float64, device, channels_last=channels_last)
    if act == "relu":  # keep z away from the kink, where finite differences are meaningless
        identity = identity + torch.where(x * g + identity > 0, 0.1, -0.1)
    inputs = tuple(t.detach().requires_grad_() for t in (x, g, identity))
    assert torch.autograd.gradcheck(lambda a, b, c: fer_kernels.recalibrate(a, b, c, act, backend=backend), inputs)


def test_autograd_saves_only_x_gate_identity():
    x, g, identity, _ = _inputs((2, 3, 4, 4), torch.float32, "cpu")
    x, g, identity = (t.requires_grad_() for t in (x, g, identity))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fer_kernels.recalibrate(x, g, identity, backend="cpu")
    assert [t.data_ptr() for t in saved] == [x.data_ptr(), g.data_ptr(), identity.data_ptr()]


def test_opcheck():
    x, g, identity, dy = _inputs((2, 3, 4, 5), torch.float32, "cpu", channels_last=True)
    for gate in (g, None):
        args = [t.requires_grad_() if t is not None else None for t in (x.clone(), gate, identity.clone())]
        torch.library.opcheck(torch.ops.fer_kernels.recalibrate.default, (*args, "mish", "cpu"))
        torch.library.opcheck(torch.ops.fer_kernels.recalibrate_backward.default,
                              (dy, x, None if gate is None else gate.detach(), identity, "relu", "cpu"))


def test_rejects_bad_arguments():
    x = torch.randn(2, 3, 4, 4)
    cases = [
        ((x, torch.rand(2, 3), torch.randn(2, 3, 4, 5)), ValueError, "identity must have the shape of x"),
        ((x, torch.rand(2, 3), x.double()), TypeError, "identity must have the dtype of x"),
        ((x, torch.rand(3, 2), x), ValueError, "gate must have shape N x C"),
        ((x, torch.rand(2, 3, 2, 1), x), ValueError, "gate must have shape N x C"),
        ((x, torch.ones(2, 3, dtype=torch.long), x), TypeError, "gate must be a floating-point tensor"),
        ((torch.randn(5), None, torch.randn(5)), ValueError, "x must have shape N x C"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            fer_kernels.recalibrate(*args)
    with pytest.raises(ValueError, match="act must be one of"):
        fer_kernels.recalibrate(x, None, x, act="gelu")


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_more_than_2_31_elements_cpu(channels_last):
    """int64 offsets in the CPU twin: 2 x 32769 x 32768 > 2^31 bfloat16 elements, checked at the far end."""
    shape = (1, 2, 32769, 32768)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(shape, dtype=torch.bfloat16, memory_format=fmt).zero_()
    identity = torch.empty(shape, dtype=torch.bfloat16, memory_format=fmt).zero_()
    x[0, :, -1, -8:] = torch.linspace(-3, 3, 8, dtype=torch.bfloat16)
    identity[0, :, -1, -8:] = 1
    g = torch.tensor([[0.5, 2.0]])
    out = fer_kernels.recalibrate(x, g, identity, "mish", backend="cpu")
    tail = x[0, :, -1, -8:].float() * g.reshape(2, 1) + 1
    torch.testing.assert_close(out[0, :, -1, -8:].float(), reference.mish(tail), rtol=1e-2, atol=1e-2)
    assert out[0, :, -2].abs().max() == reference.mish(torch.tensor(0.0))


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_more_than_2_31_elements_cuda(channels_last):
    shape = (1, 2, 32769, 32768)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(shape, dtype=torch.bfloat16, device="cuda", memory_format=fmt).zero_()
    x[0, :, -1, -8:] = torch.linspace(-3, 3, 8, dtype=torch.bfloat16, device="cuda")
    g = torch.tensor([[0.5, 2.0]], device="cuda", requires_grad=True)
    identity = torch.ones_like(x)
    tail = x[0, :, -1, -8:].float() * g.detach().reshape(2, 1) + 1
    for backend in ("cuda", "triton"):
        out = fer_kernels.recalibrate(x, g, identity, "mish", backend=backend)
        torch.testing.assert_close(out[0, :, -1, -8:].float(), reference.mish(tail), rtol=1e-2, atol=1e-2)
        dx, dg, did = torch.ops.fer_kernels.recalibrate_backward(out, x, g.detach(), identity, "mish", backend)
        # x is 0 but for the probe, so only the probe adds to dgate
        dz = reference.mish_backward(out[0, :, -1, -8:].float(), tail)
        torch.testing.assert_close(dg.flatten(), (dz * x[0, :, -1, -8:].float()).sum(1), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(did[0, :, -1, -8:].float(), dz, rtol=2e-2, atol=2e-2)
        del out, dx, dg, did


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpu_twin_is_deterministic_across_thread_counts(channels_last):
    """The gate gradient is split by the shape alone, so 1 and 2 threads give the same bits."""
    x, g, identity, dy = _inputs((2, 4, 200, 180), torch.float32, "cpu", channels_last=channels_last)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(torch.ops.fer_kernels.recalibrate_backward(dy, x, g, identity, "mish", "cpu"))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
