"""fer_kernels.mish on every backend against the reference (fer_kernels.reference.mish)."""

import pytest
import torch
import torch.nn.functional as F

import fer_kernels
from fer_kernels import reference
from helpers import BACKEND_DEVICES, FAST_BACKEND_DEVICES, assert_accurate, ids

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (7,), (3, 5, 7), (2, 3, 11, 13), (4099,)]
SPECIAL = [float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e30, -1e30, 3e38, -3e38, 20.0, 20.0001,
           19.999, -20.0, -87.0, -88.0, -100.0, -1.19, 1e-30, -1e-30, 88.0, 89.0]


def _inputs(shape, dtype, device, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x.to(device), dy.to(device)


def _check(x, dy, backend):
    y = fer_kernels.mish(x, backend=backend)
    dx = torch.ops.fer_kernels.mish_backward(dy, x, backend)
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert_accurate(y, reference.mish(x.double()), reference.mish(x), "forward")
    assert_accurate(dx, reference.mish_backward(dy.double(), x.double()), reference.mish_backward(dy, x), "backward")
    return y, dx


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=ids(BACKEND_DEVICES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, device, dtype, shape):
    _check(*_inputs(shape, dtype, device), backend)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=ids(BACKEND_DEVICES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_follow_torch(backend, device, dtype):
    """inf, NaN, huge and threshold values: forward and gradient as torch.nn.functional.mish."""
    x = torch.tensor(SPECIAL, dtype=torch.float64).to(dtype)
    x = x[torch.isfinite(x) | ~torch.isfinite(torch.tensor(SPECIAL, dtype=torch.float64))].to(device)
    xr = x.detach().clone().requires_grad_()
    expected = F.mish(xr.double())
    expected.backward(torch.ones_like(expected))
    y = fer_kernels.mish(x, backend=backend)
    dx = torch.ops.fer_kernels.mish_backward(torch.ones_like(x), x, backend)
    for ours, ref in ((y, expected.detach()), (dx, xr.grad)):
        ours, ref = ours.double(), ref.double()
        assert torch.equal(torch.isnan(ours), torch.isnan(ref)), (x, ours, ref)
        finite = torch.isfinite(ref)
        assert torch.equal(ours[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)])
        tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
        torch.testing.assert_close(ours[finite], ref[finite], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,device", FAST_BACKEND_DEVICES, ids=ids(FAST_BACKEND_DEVICES))
def test_no_nan_from_large_inputs(backend, device):
    x = torch.linspace(-1e4, 1e4, 20001, dtype=torch.float32, device=device)
    y = fer_kernels.mish(x, backend=backend)
    dx = torch.ops.fer_kernels.mish_backward(torch.ones_like(x), x, backend)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    torch.testing.assert_close(y, F.mish(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=ids(BACKEND_DEVICES))
def test_layouts(backend, device):
    """Dense permuted inputs keep their strides; gapped ones give a contiguous result; the gradient may
    come in other strides than x."""
    x, dy = _inputs((4, 6, 5, 3), torch.float32, device)
    cases = {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "transposed": x.transpose(1, 3),
        "sliced": x[:, ::2, 1:],
        "expanded": x[:1].expand(4, -1, -1, -1),
        "zero-dim": x[0, 0, 0, 0],
    }
    for name, xi in cases.items():
        y = fer_kernels.mish(xi, backend=backend)
        torch.testing.assert_close(y, F.mish(xi), rtol=1e-5, atol=1e-6, msg=name)
        if xi.dim() and xi.is_contiguous(memory_format=torch.channels_last) or name == "transposed":
            assert y.stride() == xi.stride(), name
        g = torch.randn(xi.shape, device=device).contiguous()  # contiguous even where x is not
        dx = torch.ops.fer_kernels.mish_backward(g, xi, backend)
        torch.testing.assert_close(dx, reference.mish_backward(g, xi), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=ids(BACKEND_DEVICES))
@pytest.mark.parametrize("shape", [(0,), (2, 0, 3), (0, 4, 5, 5)], ids=str)
def test_empty(backend, device, shape):
    x = torch.empty(shape, device=device, requires_grad=True)
    y = fer_kernels.mish(x, backend=backend)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=ids(BACKEND_DEVICES))
def test_gradcheck(backend, device):
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    with torch.no_grad():
        x[0, 0, :3] = torch.tensor([25.0, -30.0, 0.0])  # both sides of the linear and flushed regions
    assert torch.autograd.gradcheck(lambda t: fer_kernels.mish(t, backend=backend), (x,))


def test_autograd_saves_only_the_input():
    x = torch.randn(10, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fer_kernels.mish(x * 1, backend="cpu")
    assert len(saved) == 1 and saved[0].shape == x.shape


def test_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the custom ops."""
    x = torch.randn(3, 5, 4, 2, requires_grad=True).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fer_kernels.mish.default, (x, "cpu"))
    torch.library.opcheck(torch.ops.fer_kernels.mish_backward.default, (torch.randn(3, 5, 4, 2), x.detach(), "cpu"))
    torch.library.opcheck(torch.ops.fer_kernels.mish.default, (torch.randn(6, 4).t(), "cpu"))


def test_rejects_non_float():
    with pytest.raises(TypeError, match="fer_kernels.mish: x must be a floating-point tensor"):
        fer_kernels.mish(torch.arange(4))


@pytest.mark.slow
def test_more_than_2_31_elements_cpu():
    """int64 offsets: a bfloat16 tensor of 2^31 + 64 elements through the CPU twin, checked at both ends
    and across the 2^31 boundary."""
    n = 2**31 + 64
    x = torch.zeros(n, dtype=torch.bfloat16)
    probe = torch.linspace(-6, 6, 16, dtype=torch.bfloat16)
    x[:16] = probe
    x[-16:] = probe
    y = fer_kernels.mish(x, backend="cpu")
    expected = F.mish(probe.float()).to(torch.bfloat16)
    assert torch.equal(y[-16:], expected) and torch.equal(y[:16], expected)
    assert y[2**31 - 8: 2**31 + 8].abs().max() == 0
    del y
    dx = torch.ops.fer_kernels.mish_backward(x, x, "cpu")  # dy = x
    expected = reference.mish_backward(probe.float(), probe.float()).to(torch.bfloat16)
    torch.testing.assert_close(dx[-16:], expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dx[:16], expected, rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
def test_more_than_2_31_elements_cuda():
    n = 2**31 + 64
    probe = torch.linspace(-6, 6, 16, dtype=torch.bfloat16, device="cuda")
    for backend in ("cuda", "triton"):
        x = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
        x[-16:] = probe
        y = fer_kernels.mish(x, backend=backend)
        torch.testing.assert_close(y[-16:].float(), F.mish(probe.float()), rtol=1e-2, atol=1e-2)
        dx = torch.ops.fer_kernels.mish_backward(x, x, backend)
        torch.testing.assert_close(dx[-16:].float(), reference.mish_backward(probe.float(), probe.float()),
                                   rtol=1e-2, atol=1e-2)
        del x, y, dx
