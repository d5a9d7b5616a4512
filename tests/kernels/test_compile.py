"""torch.compile(fullgraph=True) traces through the custom ops and gives eager's results."""

import pytest
import torch
from torch import nn

import fer_kernels
from fer_kernels.nn import AccuracyBooster, Mish, Recalibrate


class _TinyBoosterNet(nn.Module):
    """One ABP block's worth of every op: Mish, the gate, the fused tail, with and without a gate."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = Mish()
        self.booster = AccuracyBooster(8)
        self.tail = Recalibrate("mish")
        self.tail_relu = Recalibrate("relu")
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = self.tail(self.act(y), self.booster(y), y)
        y = self.tail_relu(y, None, y * 0.5)
        return self.fc(y.mean((2, 3)))


def _run(model, x):
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fullgraph_aot_eager(channels_last):
    torch.manual_seed(0)
    model = _TinyBoosterNet()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 3, 9, 11).contiguous(memory_format=fmt)
    eager = _run(model, x)
    compiled = _run(torch.compile(model, fullgraph=True, backend="aot_eager"), x)
    torch.testing.assert_close(compiled[0], eager[0])
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_fullgraph_inductor_resnet18():
    """The real compiler on the paper's model: generated code around our ops, same loss and gradients."""
    torch.manual_seed(0)
    model = fer_kernels.models.resnet18()
    x = torch.randn(8, 3, 64, 64)  # enough values per BatchNorm channel that BN is well conditioned
    eager = _run(model, x)
    torch._dynamo.reset()
    compiled = _run(torch.compile(model, fullgraph=True), x)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
