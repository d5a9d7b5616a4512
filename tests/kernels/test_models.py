"""The paper's ResNets: parameter counts (docs/method.md section 2), torchvision compatibility, fused == unfused."""

import pytest
import torch
import torchvision

from fer_kernels.models import load_torchvision_weights, resnet18, resnet50

BUILDERS = {"resnet18": resnet18, "resnet50": resnet50}
# torchvision's ResNets with an 8-class head: 11,689,512 - 507,904 - 992 and 25,557,032 - 2,031,616 - 992
PLAIN = {"resnet18": 11_180_616, "resnet50": 23_524_424}
ABP_WEIGHTS = {"resnet18": 696_320, "resnet50": 20_119_552}  # sum of C^2 over blocks, docs/method.md section 2
GATE_CHANNELS = {"resnet18": 2 * (64 + 128 + 256 + 512), "resnet50": 3 * 256 + 4 * 512 + 6 * 1024 + 3 * 2048}


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", BUILDERS)
def test_parameter_counts(name):
    build = BUILDERS[name]
    assert _count(build(booster=None)) == PLAIN[name]
    assert _count(build(booster="plus")) == PLAIN[name] + ABP_WEIGHTS[name] + 2 * GATE_CHANNELS[name]
    assert _count(build(booster="depthwise")) == PLAIN[name] + 3 * GATE_CHANNELS[name]
    assert _count(build(booster="plus", act="relu", fused=False)) == _count(build(booster="plus"))


@pytest.mark.parametrize("name", BUILDERS)
def test_same_keys_and_outputs_as_torchvision(name):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)().eval()
    ours = BUILDERS[name](num_classes=1000, act="relu", booster=None).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    # float64: with gradients on, Conv2d computes stage 4's 2 x 2 maps at 64 px by tap, which rounds differently
    # from oneDNN; in float64 that is far below the tolerance, and any architectural difference is not
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(ours.double()(x), theirs.double()(x))


@pytest.mark.parametrize("name", BUILDERS)
def test_torchvision_weights_start_a_booster_model(name, tmp_path):
    theirs = getattr(torchvision.models, name)()
    path = tmp_path / "weights.pth"
    torch.save(theirs.state_dict(), path)
    ours = BUILDERS[name](weights=path)  # 8 classes, Mish, ABP
    assert torch.equal(ours.layer1[0].conv1.weight, theirs.layer1[0].conv1.weight)
    missing = load_torchvision_weights(BUILDERS[name](), theirs.state_dict())
    assert all(".booster." in k or k.startswith("fc.") for k in missing)
    assert {"fc.weight", "fc.bias", "layer1.0.booster.conv.weight"} <= set(missing)


def test_wrong_weights_are_an_error():
    with pytest.raises(ValueError, match="the weights have keys this model lacks: layer1.0.conv3.weight"):
        load_torchvision_weights(resnet18(), torchvision.models.resnet50().state_dict())
    with pytest.raises(TypeError, match="weights must be a state dict"):
        load_torchvision_weights(resnet18(), 42)


@pytest.mark.parametrize("bad,message", [({"act": "gelu"}, "act must be"), ({"booster": "se"}, "booster must be"),
                                         ({"num_classes": 0}, "num_classes must be")])
def test_bad_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        resnet18(**bad)


@pytest.mark.parametrize("name", BUILDERS)
@pytest.mark.parametrize("act", ["mish", "relu"])
@pytest.mark.parametrize("booster", [None, "depthwise", "plus"])
def test_fused_equals_unfused(name, act, booster):
    """Same weights, same float64 input: same outputs and gradients, NCHW and channels-last."""
    torch.manual_seed(0)
    fused = BUILDERS[name](act=act, booster=booster, fused=True).double()
    plain = BUILDERS[name](act=act, booster=booster, fused=False).double()
    plain.load_state_dict(fused.state_dict())
    for channels_last in (False, True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        fused.to(memory_format=fmt)
        plain.to(memory_format=fmt)
        x = torch.randn(4, 3, 40, 40, dtype=torch.float64).contiguous(memory_format=fmt)
        fused.zero_grad()
        plain.zero_grad()
        y_fused, y_plain = fused(x), plain(x)
        torch.testing.assert_close(y_fused, y_plain, rtol=1e-9, atol=1e-9)
        y_fused.square().sum().backward()
        y_plain.square().sum().backward()
        for (key, p_fused), p_plain in zip(fused.named_parameters(), plain.parameters()):
            scale = p_plain.grad.abs().max().clamp_min(1.0)
            torch.testing.assert_close(p_fused.grad / scale, p_plain.grad / scale, rtol=1e-8, atol=1e-8, msg=key)


def test_fused_model_uses_the_fused_ops():
    """Training on the CPU: batch norm + Mish of the stem and inside each basic block is one fused op; in
    evaluation, torch's batch norm and the fused Mish."""
    model = resnet18()
    for training, fused_bn, mish in ((True, 1 + 8, 0), (False, 0, 1 + 8)):
        ops = []
        with _RecordOps(ops):
            model.train(training)(torch.randn(2, 3, 32, 32))
        assert ops.count("fer_kernels.batch_norm_act.default") == fused_bn
        assert ops.count("fer_kernels.mish.default") == mish
        assert ops.count("fer_kernels.recalibrate.default") == 8


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self, ops):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
