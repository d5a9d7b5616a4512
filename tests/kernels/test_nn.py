"""fer_kernels.nn: the drop-in Mish, the Accuracy Booster gate, the block-tail module, model conversion."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fer_kernels
from fer_kernels.nn import AccuracyBooster, Mish, Recalibrate, replace_activations


def test_mish_is_a_drop_in_for_torch_mish():
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    ours, theirs = Mish(), nn.Mish()
    y = ours(x)
    y.sum().backward()
    g = x.grad.clone()
    x.grad = None
    theirs(x).sum().backward()
    torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, x.grad, rtol=1e-5, atol=1e-6)
    assert Mish(inplace=True)(x.detach()).data_ptr() != x.data_ptr()  # accepted, computed out of place


@pytest.mark.parametrize("variant,weights", [("plus", 64 * 64), ("depthwise", 64)])
def test_accuracy_booster(variant, weights):
    booster = AccuracyBooster(64, variant)
    assert booster.conv.weight.numel() == weights and booster.conv.bias is None
    assert sum(p.numel() for p in booster.bn.parameters()) == 2 * 64
    x = torch.randn(3, 64, 7, 7)
    gate = booster(x)
    pooled = x.mean((2, 3), keepdim=True)
    expected = torch.sigmoid(booster.bn(booster.conv(pooled)))
    assert gate.shape == (3, 64, 1, 1)
    torch.testing.assert_close(gate, expected)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_accuracy_booster_plus_product_is_the_convolution(autocast, channels_last):
    """ABP's dense 1x1 convolution of the pooled map runs as a matrix product: the gate and the gradients of x,
    the convolution's weight and the BatchNorm are the convolution's (to bfloat16's rounding under autocast)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    booster = AccuracyBooster(32, "plus").to(memory_format=fmt)
    x = torch.randn(4, 32, 5, 5).contiguous(memory_format=fmt).requires_grad_()

    def run(forward):
        booster.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            gate = forward()
        gate.float().square().sum().backward()
        return gate, x.grad, booster.conv.weight.grad, booster.bn.weight.grad, booster.bn.bias.grad

    ours = run(lambda: booster(x))
    conv = run(lambda: torch.sigmoid(booster.bn(F.conv2d(x.mean((2, 3), keepdim=True), booster.conv.weight))))
    assert ours[0].shape == (4, 32, 1, 1) and ours[0].dtype == conv[0].dtype
    assert ours[2].stride() == booster.conv.weight.stride()
    for a, b in zip(ours, conv):  # bfloat16: within 2 % of each tensor's scale (its roundings come in other orders)
        torch.testing.assert_close(a, b, **(dict(rtol=2e-2, atol=2e-2 * b.abs().max().item()) if autocast else {}))
    booster64 = AccuracyBooster(6, "plus").double()
    x64 = torch.randn(3, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = booster64.conv.weight
    assert torch.autograd.gradcheck(lambda x, w: torch.func.functional_call(booster64, {"conv.weight": w}, (x,)),
                                    (x64, weight.detach().clone().requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_accuracy_booster_pooling_gradient_equals_torch_mean(dtype, channels_last):
    """The gate's pooling hands autograd its gradient as a broadcast view (so that adding it to the tail's
    gradient is cheap); its values are torch.mean's, to the bit, and stay so once autograd adds them."""
    from fer_kernels.nn.layers import _SpatialMean

    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, 7, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    grad_out, grad_other = torch.randn(3, 5, 1, 1, dtype=dtype), torch.randn(3, 5, 6, 7, dtype=dtype)
    ours = _SpatialMean.apply(x)
    assert torch.equal(ours, x.mean((2, 3), keepdim=True))
    (g,) = torch.autograd.grad(ours, x, grad_out)
    assert g.stride()[2:] == (0, 0)
    (expected,) = torch.autograd.grad(x.mean((2, 3), keepdim=True), x, grad_out)
    assert torch.equal(g, expected)
    # used twice, as in a block: autograd's sum of the two gradients is the same as with torch.mean
    (summed,) = torch.autograd.grad((_SpatialMean.apply(x) * grad_out).sum() + (x * grad_other).sum(), x)
    (summed_torch,) = torch.autograd.grad((x.mean((2, 3), keepdim=True) * grad_out).sum() + (x * grad_other).sum(), x)
    assert torch.equal(summed, summed_torch)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(_SpatialMean.apply, (x.detach().clone().requires_grad_(True),))
        assert torch.autograd.gradgradcheck(_SpatialMean.apply, (x.detach().clone().requires_grad_(True),))


def test_accuracy_booster_rejects_a_training_batch_of_one():
    booster = AccuracyBooster(8)
    with pytest.raises(ValueError, match="a training batch of 1 cannot be normalised"):
        booster(torch.randn(1, 8, 4, 4))
    booster.eval()
    assert booster(torch.randn(1, 8, 4, 4)).shape == (1, 8, 1, 1)
    with pytest.raises(ValueError, match="variant must be"):
        AccuracyBooster(8, "dense")


def test_recalibrate_module():
    x, identity = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    gate = torch.rand(2, 4, 1, 1)
    for act in ("mish", "relu", "none"):
        torch.testing.assert_close(Recalibrate(act)(x, gate, identity),
                                   fer_kernels.reference.recalibrate(x, gate, identity, act), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="act must be one of"):
        Recalibrate("gelu")


def test_replace_activations_on_torchvision_resnet18(caplog):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=8)
    expected = torchvision.models.resnet18(num_classes=8)
    expected.load_state_dict(model.state_dict())
    for module in expected.modules():  # the same conversion by hand, with PyTorch's own Mish
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.Mish())

    with caplog.at_level("INFO", logger="fer_kernels.nn.convert"):
        assert replace_activations(model) is model
    assert caplog.messages == ["replace_activations: ReLU 9 places replaced by the fused Mish"]
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert sum(isinstance(m, Mish) for m in model.modules()) == 9  # the stem's and one per block, shared

    x = torch.randn(4, 3, 64, 64)
    y, y_expected = model(x), expected(x)
    torch.testing.assert_close(y, y_expected, rtol=1e-4, atol=1e-5)
    y.sum().backward()
    y_expected.sum().backward()
    torch.testing.assert_close(model.conv1.weight.grad, expected.conv1.weight.grad, rtol=1e-3, atol=1e-4)


def test_replace_activations_options(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.ReLU(), nn.Sequential(nn.GELU(), nn.SiLU()))
    with caplog.at_level("INFO", logger="fer_kernels.nn.convert"):
        replace_activations(model, activations=(nn.GELU, nn.SiLU), backend="reference")
    assert caplog.messages == ["replace_activations: GELU 2 places, SiLU 1 place replaced by the fused Mish"]
    assert isinstance(model[1], Mish) and model[1].backend == "reference" and isinstance(model[2], nn.ReLU)
    with pytest.warns(UserWarning, match="no SiLU module to replace; it is unchanged"):
        replace_activations(nn.Sequential(nn.Linear(2, 2)), activations=(nn.SiLU,))
