"""fer_kernels.optim.BFloat16Weights and the fused step with bfloat16 copies: the same training as CPU bfloat16
autocast over float32 weights, bit for bit, on every backend of the step."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fer_kernels.models import resnet18
from fer_kernels.optim import BFloat16Weights, GCRAdam, Ranger
from helpers import BACKEND_DEVICES, ids

CPU_BACKENDS = [(b, d) for b, d in BACKEND_DEVICES if d == "cpu"]


def _params():
    """float32 parameters of every kind the model has: a channels-last conv kernel, a 1x1 kernel, a linear
    weight and a bias; their gradients and bfloat16 copies."""
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(8, 5, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    return [conv, torch.randn(8, 8, 1, 1, generator=g), torch.randn(7, 40, generator=g), torch.randn(7, generator=g)]


def _steps(backend, with_copies, steps=8, **options):
    """`steps` updates with the same bfloat16 gradients: on the copies' gradients (the kernel reads them) or
    widened to float32 on the parameters themselves; returns the parameters, the copies and the state."""
    params = [p.clone().requires_grad_() for p in _params()]
    optimizer = Ranger(params, lr=1e-2, k=3, backend=backend, **options)
    copies = [p.detach().to(torch.bfloat16).requires_grad_() for p in params]
    if with_copies:
        optimizer.keep_copies(dict(zip(params, copies)))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=g).to(torch.bfloat16) for p in params]
        for p, c, grad in zip(params, copies, grads):
            if with_copies:
                c.grad = torch.empty_like(c).copy_(grad)
            else:
                p.grad = torch.empty_like(p).copy_(grad)
        optimizer.step()
        optimizer.zero_grad()
    return params, copies, optimizer.state_dict()


@pytest.mark.parametrize("backend,device", CPU_BACKENDS, ids=ids(CPU_BACKENDS))
@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True}],
                         ids=["plain", "l2", "decoupled"])
def test_the_step_with_copies_equals_the_step_on_widened_gradients(backend, device, options):
    """Over 8 steps (un-adapted then rectified; Lookahead syncs at 3 and 6; centralized rows): the float32
    parameters and state are those of the step on the gradients widened to float32, bit for bit, and each copy
    is its parameter rounded to bfloat16."""
    ours, copies, state = _steps(backend, True, **options)
    plain, _, plain_state = _steps(backend, False, **options)
    for p, q, c in zip(ours, plain, copies):
        assert torch.equal(p, q)
        assert c.dtype == torch.bfloat16 and c.stride() == p.stride() and torch.equal(c, p.detach().to(torch.bfloat16))
        assert c.grad is None and p.grad is None  # zero_grad cleared the copies' gradients too
    for index, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(plain_state["state"][index][key])), key


def test_keep_copies_names_a_copy_that_does_not_fit():
    weight = nn.Parameter(torch.randn(4, 3))
    optimizer = Ranger([weight])
    with pytest.raises(ValueError, match=r"keep_copies: a copy must be bfloat16 with the shape, strides and device"):
        optimizer.keep_copies({weight: torch.zeros(4, 3)})
    with pytest.raises(ValueError, match=r"keep_copies"):
        optimizer.keep_copies({weight: torch.zeros(3, 4, dtype=torch.bfloat16).t()})


def _train(wrap, steps=7, load_between=None):
    """`steps` training steps of a small ResNet-18 + Mish + ABP (channels-last, 32 x 32, batch 4) under CPU
    bfloat16 autocast, through BFloat16Weights or with autocast rounding the float32 weights."""
    torch.manual_seed(0)
    model = resnet18(num_classes=8, act="mish", booster="plus").to(memory_format=torch.channels_last)
    optimizer = Ranger(model.parameters(), lr=3e-3)
    net = BFloat16Weights(model, optimizer) if wrap else model
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        images = torch.randn(4, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 8, (4,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if load_between is not None and step == 2:
            model.load_state_dict(load_between)
    return model, net


def test_training_through_the_copies_equals_autocast_training_bit_for_bit():
    """The claim the engine relies on (train.bf16_weights): 7 steps (a Lookahead sync at 6) give the same
    weights and batch-norm statistics as autocast over the float32 weights."""
    ours, net = _train(True)
    theirs, _ = _train(False)
    assert len(net.copies()) == 29  # the stem, 16 block convolutions, 3 downsamples, 8 gates, the classifier
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_weight_loaded_between_steps_is_rounded_into_its_copy():
    """load_state_dict writes the float32 weights (their version counters move): the next pass uses them."""
    torch.manual_seed(5)
    other = resnet18(num_classes=8, act="mish", booster="plus").state_dict()
    ours, _ = _train(True, load_between=other)
    theirs, _ = _train(False, load_between=other)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name


def test_bfloat16_weights_refuses_what_it_cannot_serve():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(TypeError, match="the optimizer must be a fer_kernels Ranger or GCRAdam"):
        BFloat16Weights(model, torch.optim.SGD(model.parameters(), lr=0.1))
    net = BFloat16Weights(model, GCRAdam(model.parameters()))
    assert set(net.copies()) == {"0.weight"}
    with pytest.raises(RuntimeError, match=r"inside torch.autocast\('cpu', dtype=torch.bfloat16\)"):
        net(torch.randn(2, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(torch.randn(2, 4)).dtype == torch.bfloat16


def test_the_model_has_its_own_weights_back_after_a_call_even_one_that_fails():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    weights = {name: p for name, p in model.named_parameters()}
    net = BFloat16Weights(model, Ranger(model.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(2, 3, 5, 5)).sum().backward()
        with pytest.raises(RuntimeError):
            net(torch.randn(2, 3, 6, 6))  # the linear layer does not fit: the call fails inside the model
    assert all(p is weights[name] for name, p in model.named_parameters())
    assert all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in model.parameters())
    assert model[0].weight.grad is None and net.copies()["0.weight"].grad is not None  # the copy took it
