"""fer_kernels max_pool2d (channels-last CPU max pooling with one-byte indices) against torch's max pooling,
and fer_kernels.nn.MaxPool2d against torch.nn.MaxPool2d."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fer_kernels
from fer_kernels.ops.max_pool import max_pool2d

pytestmark = pytest.mark.skipif(fer_kernels._dispatch._C is None, reason="the C++ extension is not built")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (shape, kernel, stride, padding): the ResNet stem's 3x3/2 pad 1 on odd and even maps, windows that do not
# overlap, a stride larger than the window (inputs in no window get a zero gradient), a 1-pixel output,
# rectangular windows and a 255-position window
CASES = [((2, 5, 9, 8), (3, 3), (2, 2), (1, 1)), ((2, 3, 8, 7), (3, 3), (2, 2), (1, 1)),
         ((3, 4, 6, 6), (2, 2), (2, 2), (0, 0)), ((2, 3, 7, 9), (2, 2), (3, 3), (1, 1)),
         ((1, 70, 3, 3), (3, 3), (1, 1), (0, 0)), ((2, 3, 9, 11), (3, 5), (2, 1), (1, 2)),
         ((1, 2, 17, 17), (15, 17), (1, 1), (7, 8))]


def _leaf(shape, dtype, seed=0, ties=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if ties:  # few distinct values: many windows hold their maximum twice
        x = x.mul(2).round()
    return x.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()


def _both(x, grad, pool):
    out = pool(x)
    (dx,) = torch.autograd.grad(out, x, grad)
    return out, dx


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("shape,kernel,stride,padding", CASES, ids=str)
def test_matches_torch(shape, kernel, stride, padding, dtype, ties):
    """Values and the gradient as torch's: the first maximum of each window takes its gradient; gradients from
    overlapping windows add up (in float, rounded once: within a rounding of torch's, which adds in the
    storage dtype for bfloat16 and float16)."""
    x = _leaf(shape, dtype, ties=ties)
    out_shape = F.max_pool2d(x.detach(), kernel, stride, padding).shape
    grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    grad = grad.contiguous(memory_format=torch.channels_last)
    ours = _both(x, grad, lambda t: max_pool2d(t, kernel, stride, padding))
    theirs = _both(x, grad, lambda t: F.max_pool2d(t, kernel, stride, padding))
    assert torch.equal(ours[0], theirs[0])
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    exact = _both(x.detach().double().requires_grad_(), grad.double(),
                  lambda t: F.max_pool2d(t, kernel, stride, padding))
    if dtype in (torch.float64, torch.float32):
        torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=0)
    else:  # one rounding of the exact sum
        torch.testing.assert_close(ours[1], exact[1].to(dtype), rtol=0, atol=0)
    assert ours[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_values_as_torch(dtype):
    """NaN wins its window (the last NaN in window order takes the gradient); -inf and +inf are ordinary values."""
    x = _leaf((2, 3, 7, 7), dtype).detach()
    x[0, 0, 1, 1], x[0, 0, 1, 2], x[0, 1, 3, 3], x[1, 2] = float("nan"), float("nan"), float("inf"), float("-inf")
    grad = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)).to(dtype)
    grad = grad.contiguous(memory_format=torch.channels_last)
    ours = _both(x.requires_grad_(), grad, lambda t: max_pool2d(t, (3, 3), (2, 2), (1, 1)))
    theirs = _both(x, grad, lambda t: F.max_pool2d(t, 3, 2, 1))
    exact = _both(x.detach().double().requires_grad_(), grad.double(), lambda t: F.max_pool2d(t, 3, 2, 1))
    torch.testing.assert_close(ours[0], theirs[0], equal_nan=True, rtol=0, atol=0)
    expected = theirs[1] if dtype == torch.float32 else exact[1].to(dtype)  # bfloat16: the sums rounded once
    torch.testing.assert_close(ours[1], expected, rtol=0, atol=0)


@pytest.mark.parametrize("x,kernel,stride,padding", [
    (torch.randn(2, 3, 8, 8), (3, 3), (2, 2), (1, 1)),  # NCHW
    (torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last), (3, 3), (2, 2), (2, 2)),
    (torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last), (16, 16), (1, 1), (0, 0)),
    (torch.randn(2, 3, 2, 2).contiguous(memory_format=torch.channels_last), (3, 3), (1, 1), (0, 0)),
    (torch.randn(0, 3, 8, 8).contiguous(memory_format=torch.channels_last), (3, 3), (2, 2), (1, 1)),
], ids=["nchw", "padding over half", "256 positions", "empty output", "empty batch"])
def test_inputs_the_kernel_does_not_take_are_named(x, kernel, stride, padding):
    with pytest.raises(ValueError, match="max_pool2d: the kernel takes"):
        max_pool2d(x, kernel, stride, padding)


def test_layer_is_torch_maxpool2d_for_any_input():
    """fer_kernels.nn.MaxPool2d: the kernel for channels-last CPU inputs, torch's pooling for the rest."""
    torch.manual_seed(0)
    ours, theirs = fer_kernels.nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1)
    for x in (torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last), torch.randn(2, 4, 9, 9),
              torch.randn(0, 4, 9, 9).contiguous(memory_format=torch.channels_last)):
        torch.testing.assert_close(ours(x), theirs(x))
    ceil = fer_kernels.nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    x = torch.randn(1, 2, 8, 8).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ceil(x), F.max_pool2d(x, 3, 2, 1, ceil_mode=True))


def test_opcheck():
    x = _leaf((2, 3, 7, 6), torch.float32)
    torch.library.opcheck(torch.ops.fer_kernels.max_pool2d.default, (x, [3, 3], [2, 2], [1, 1]))
    _, indices = torch.ops.fer_kernels.max_pool2d(x.detach(), [3, 3], [2, 2], [1, 1])
    grad = torch.randn(2, 3, 4, 3).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fer_kernels.max_pool2d_backward.default,
                          (grad, indices, [2, 3, 7, 6], [3, 3], [2, 2], [1, 1]))
