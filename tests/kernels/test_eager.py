"""The eager autograd Functions that stand in for the custom ops (fer_kernels/ops/_eager.py): the same bits as the
registered ops forward and back, taken only where nothing traces or intercepts the call."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fer_kernels
from fer_kernels.ops import mish, recalibrate
from fer_kernels.ops._eager import eager
from fer_kernels.ops.batch_norm_act import batch_norm_act
from fer_kernels.ops.max_pool import max_pool2d

pytestmark = pytest.mark.skipif(fer_kernels._dispatch._C is None, reason="the C++ extension is not built")


def _x(dtype=torch.float32, shape=(3, 5, 6, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)


# name: (the public call on leaves, the registered op on the same leaves, the eager Function's backward node)
def _cases(dtype):
    gate = torch.rand(3, 5, 1, 1, dtype=torch.float32)
    identity = _x(dtype, seed=1)
    weight, bias = torch.rand(5) + 0.5, torch.randn(5)
    return {
        "mish": ((lambda x: mish(x, backend="cpu")),
                 (lambda x: torch.ops.fer_kernels.mish(x, "cpu")), "MishBackward"),
        "recalibrate": ((lambda x: recalibrate(x, gate, identity, "mish", backend="cpu")),
                        (lambda x: torch.ops.fer_kernels.recalibrate(x, gate, identity, "mish", "cpu")),
                        "RecalibrateBackward"),
        "batch_norm_act": ((lambda x: batch_norm_act(x, weight, bias, 1e-5, "mish")[0]),
                           (lambda x: torch.ops.fer_kernels.batch_norm_act(x, weight, bias, 1e-5, 0)[0]),
                           "BatchNormActBackward"),
        "max_pool2d": ((lambda x: max_pool2d(x, (3, 3), (2, 2), (1, 1))),
                       (lambda x: torch.ops.fer_kernels.max_pool2d(x, [3, 3], [2, 2], [1, 1])[0]),
                       "MaxPool2dBackward"),
    }


def _forward_backward(fn, x, dz_seed=2):
    leaf = x.detach().clone().requires_grad_()
    out = fn(leaf)
    dz = torch.randn(out.shape, generator=torch.Generator().manual_seed(dz_seed)).to(out.dtype)
    out.backward(dz)
    return out, leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("op", ["mish", "recalibrate", "batch_norm_act", "max_pool2d"])
def test_eager_function_gives_the_registered_ops_bits(op, dtype):
    public, registered, node = _cases(dtype)[op]
    x = _x(dtype)
    out, grad = _forward_backward(public, x)
    assert type(out.grad_fn).__name__ == node  # the public call took the eager Function
    ref_out, ref_grad = _forward_backward(registered, x)
    assert type(ref_out.grad_fn).__name__ != node
    assert out.stride() == ref_out.stride() and grad.stride() == ref_grad.stride()
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)


def test_eager_function_keeps_the_parameter_gradients():
    x, weight, bias = _x(), (torch.rand(5) + 0.5).requires_grad_(), torch.randn(5).requires_grad_()
    grads = []
    for call in (lambda: batch_norm_act(x, weight, bias, 1e-5, "relu")[0],
                 lambda: torch.ops.fer_kernels.batch_norm_act(x, weight, bias, 1e-5, 1)[0]):
        weight.grad = bias.grad = None
        call().square().sum().backward()
        grads.append((weight.grad.clone(), bias.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_plain_tensors_outside_any_mode_are_eager():
    x = torch.randn(2, 3)
    assert eager(x, None, torch.nn.Parameter(torch.randn(3)))


def test_modes_subclasses_and_compilation_get_the_registered_op():
    x = _x()
    with _Recorder() as recorder:
        assert not eager(x)
        mish(x, backend="cpu")
    # the registered op reaches the mode (the eager Function would show only the aten ops inside it)
    assert "fer_kernels.mish.default" in recorder.ops
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert not eager(fake)
        out = batch_norm_act(fake, torch.ones(5), torch.zeros(5), 1e-5, "mish")[0]  # the op's fake kernel
        assert out.shape == x.shape
    subclass = x.as_subclass(type("Sub", (torch.Tensor,), {}))
    assert not eager(subclass)
    seen = []
    torch.compile(lambda t: seen.append(eager(t)) or t, backend="eager", fullgraph=True)(x)
    assert seen == [False]


def test_a_second_derivative_raises_as_through_the_registered_op():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    firsts = []
    for fn in (lambda t: mish(t, backend="cpu"), lambda t: torch.ops.fer_kernels.mish(t, "cpu")):
        (grad,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
        firsts.append(grad.detach())
        with pytest.raises(RuntimeError, match="no autograd formula"):
            grad.sum().backward()
    assert torch.equal(*firsts)  # the first derivative itself is the same
