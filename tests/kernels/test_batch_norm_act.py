"""fer_kernels batch_norm_act (training-mode BatchNorm fused with the activation, a CPU kernel) against the
float64 reference and torch's BatchNorm2d; fer_kernels.nn.batch_norm_act against BatchNorm2d + activation."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fer_kernels
from fer_kernels import reference
from fer_kernels.ops.batch_norm_act import batch_norm_act
from helpers import assert_accurate

pytestmark = pytest.mark.skipif(fer_kernels._dispatch._C is None, reason="the C++ extension is not built")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
ACTS = ["mish", "relu", "none"]
# small maps, a channels-last row wider than a loop block (300 channels), planes and images of many blocks
SHAPES = [(2, 3, 5, 7), (3, 17, 4, 4), (2, 6, 1, 1), (1, 300, 3, 5), (2, 5, 23, 19)]


def _inputs(shape, dtype, channels_last, affine=True, offset=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + offset).to(dtype)
    dz = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if channels_last:
        x, dz = x.contiguous(memory_format=torch.channels_last), dz.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    # parameters in float32, as a model's under autocast; float64 with float64 activations
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(pdtype) if affine else None
    bias = torch.randn(c, generator=gen, dtype=torch.float64).to(pdtype) if affine else None
    return x, weight, bias, dz


def _grads(fn, x, weight, bias, dz):
    """fn(x, weight, bias) -> output; its output and the gradients of <output, dz>."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    out = fn(*leaves)
    out.backward(dz)
    return [out.detach()] + [t.grad if t is not None else None for t in leaves]


def _plain(act):
    """torch's own layers in the input's dtype: what the fused op replaces."""
    def run(x, weight, bias):
        y = F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)
        return F.mish(y) if act == "mish" else torch.relu(y) if act == "relu" else y
    return run


def _check(x, weight, bias, dz, act):
    ours = _grads(lambda *a: batch_norm_act(*a, 1e-5, act)[0], x, weight, bias, dz)
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref = _grads(lambda *a: reference.batch_norm_act(*a, 1e-5, act)[0], *map(d64, (x, weight, bias, dz)))
    plain = _grads(_plain(act), x, weight, bias, dz)
    for name, a, r, p in zip(("forward", "dx", "dweight", "dbias"), ours, ref, plain):
        if r is not None:
            assert a.dtype == p.dtype, f"{name}: dtype {a.dtype}, torch's {p.dtype}"
            assert_accurate(a, r, p, name, dtype=x.dtype)
    return ours


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(dtype, act, channels_last, shape):
    x, weight, bias, dz = _inputs(shape, dtype, channels_last)
    out, dx, _, _ = _check(x, weight, bias, dz, act)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_statistics_match_the_reference(channels_last):
    """The batch mean and biased variance the op returns, for a running-statistics update; a channel whose
    mean is 1,000 times its spread keeps an accurate variance (the sums are taken against a shift)."""
    x, weight, bias, _ = _inputs((4, 8, 9, 7), torch.float32, channels_last, offset=2000.0)
    _, mean, var = batch_norm_act(x, weight, bias, 1e-5, "mish")
    _, mean64, var64 = reference.batch_norm_act(x.double(), None, None, 1e-5, "none")
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=0)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("act", ACTS)
def test_without_weight_and_bias(act, channels_last):
    _check(*_inputs((2, 5, 3, 4), torch.float32, channels_last, affine=False), act)


@pytest.mark.parametrize("act", ["mish", "none"])
def test_gradcheck(act):
    x, weight, bias, _ = _inputs((3, 4, 3, 2), torch.float64, channels_last=False)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(lambda *a: batch_norm_act(*a, 1e-5, act)[0], leaves)


def test_same_bits_with_one_thread_or_two():
    x, weight, bias, dz = _inputs((4, 64, 40, 40), torch.bfloat16, channels_last=True)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(_grads(lambda *a: batch_norm_act(*a, 1e-5, "mish")[0], x, weight, bias, dz))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_a_non_finite_value_spoils_its_channel_only(channels_last):
    """As in torch's batch norm: an inf makes its channel's statistics, so its whole output, NaN."""
    x, weight, bias, _ = _inputs((2, 4, 5, 5), torch.float32, channels_last)
    x[1, 2, 3, 1] = float("inf")
    ours = batch_norm_act(x, weight, bias, 1e-5, "mish")[0]
    theirs = F.mish(F.batch_norm(x, None, None, weight, bias, training=True))
    assert torch.equal(ours.isnan(), theirs.isnan()) and ours[:, 2].isnan().all()
    finite = ~theirs.isnan()
    torch.testing.assert_close(ours[finite], theirs[finite])


@pytest.mark.parametrize("x", [torch.randn(1, 3, 1, 1), torch.randn(2, 3, 4), torch.empty(0, 3, 2, 2),
                               torch.randn(2, 3, 4, 4)[:, :, ::2]], ids=["one value", "3-d", "empty", "strided"])
def test_inputs_the_fused_op_does_not_take_are_named(x):
    with pytest.raises(ValueError, match="batch_norm_act: the fused op takes a CPU tensor"):
        batch_norm_act(x, None, None, 1e-5, "mish")


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="act must be one of"):
        batch_norm_act(torch.randn(2, 3, 2, 2), None, None, 1e-5, "gelu")


def test_opcheck():
    x, weight, bias, dz = _inputs((2, 3, 4, 5), torch.float32, channels_last=True)
    torch.library.opcheck(torch.ops.fer_kernels.batch_norm_act.default, (x.requires_grad_(), weight, bias, 1e-5, 0))
    _, mean, var = batch_norm_act(x, weight, bias, 1e-5, "mish")
    torch.library.opcheck(torch.ops.fer_kernels.batch_norm_act_backward.default,
                          (dz, x.detach(), weight, bias, mean, var, 1e-5, 0))


# ------------------------------------------------------------------------------- the layer helper


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum 0.1", "cumulative"])
@pytest.mark.parametrize("act", ["mish", "relu"])
def test_layer_updates_running_statistics_as_batchnorm2d(act, momentum):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6, momentum=momentum)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.normal_(bn.bias)
    plain = copy.deepcopy(bn)
    activation = nn.Mish() if act == "mish" else nn.ReLU()
    for step in range(3):
        x = (torch.randn(4, 6, 5, 3) * (step + 1) + step).contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(fer_kernels.nn.batch_norm_act(bn, x, act), activation(plain(x)))
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(bn.state_dict()[name], value, msg=name)


def test_layer_in_evaluation_and_without_running_statistics_is_batchnorm2d():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 3)
    for bn in (nn.BatchNorm2d(6).eval(), nn.BatchNorm2d(6, track_running_stats=False)):
        bn.running_mean.fill_(0.5) if bn.running_mean is not None else None
        torch.testing.assert_close(fer_kernels.nn.batch_norm_act(bn, x, "mish"), F.mish(bn(x)))


def test_layer_gradients_reach_the_batchnorm_parameters():
    torch.manual_seed(0)
    bn, plain = nn.BatchNorm2d(5), nn.BatchNorm2d(5)
    x = torch.randn(3, 5, 4, 4).contiguous(memory_format=torch.channels_last)
    fer_kernels.nn.batch_norm_act(bn, x, "mish").square().sum().backward()
    F.mish(plain(x)).square().sum().backward()
    torch.testing.assert_close(bn.weight.grad, plain.weight.grad)
    torch.testing.assert_close(bn.bias.grad, plain.bias.grad)
