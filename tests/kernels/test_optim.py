"""fer_kernels.optim: the fused Ranger / GCRAdam step on every backend against the float64 reference
(fer_kernels.reference.ranger_step, run parameter by parameter by the "reference" backend)."""

import copy
import io

import pytest
import torch
from torch import nn

from fer_kernels import reference
from fer_kernels.models import resnet18
from fer_kernels.optim import GCRAdam, Lookahead, Ranger
from helpers import FAST_BACKEND_DEVICES, ids

STEPS = 20  # un-adapted steps 1-5, rectified from 6, Lookahead syncs at 6, 12, 18 (and every 4 in group 2)


class _Net(nn.Module):
    """Every kind of parameter: conv kernels, a 1x1 conv, a linear weight, biases and BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.gate = nn.Conv2d(6, 6, 1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 5 * 5, 7)


def _groups(model):
    """Three param groups with their own settings: L2 decay, decoupled decay, conv-only GC, other k."""
    return [
        {"params": [model.conv.weight, model.gate.weight]},
        {"params": [model.fc.weight], "lr": 5e-4, "betas": (0.8, 0.99), "weight_decay": 0.01, "gc_conv_only": True},
        {"params": [model.conv.bias, model.bn.weight, model.bn.bias, model.fc.bias], "weight_decay": 0.1,
         "decoupled_weight_decay": True, "k": 4, "alpha": 0.7, "eps": 1e-6},
    ]


def _tolerance(dtype):
    """(rtol, atol) of one teacher-forced step: the rounding of the parameter dtype, float32 for the state."""
    return {torch.float64: (1e-12, 1e-14), torch.float32: (2e-6, 1e-7),
            torch.bfloat16: (2 ** -7, 1e-5), torch.float16: (2 ** -10, 1e-5)}[dtype]


def _grads(model, step, skip):
    """Deterministic gradients for `step`; parameters in `skip` get none."""
    gen = torch.Generator().manual_seed(1000 + step)
    for name, p in model.named_parameters():
        p.grad = None if name in skip else torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p)


def _assert_state_close(ours, theirs, dtype, where):
    rtol, atol = _tolerance(dtype)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{where}, {name}: {m}")


def _teacher_force(fast_model, fast_opt, ref_model, ref_opt):
    """Restart the fused optimizer from the reference's parameters and state, so each step is compared on
    its own, without rounding differences of earlier steps adding up."""
    with torch.no_grad():
        for p, q in zip(fast_model.parameters(), ref_model.parameters()):
            p.copy_(q)
            for key, value in ref_opt.state[q].items():
                fast_opt.state[p][key] = value.clone() if torch.is_tensor(value) else value


@pytest.mark.parametrize("backend,device", FAST_BACKEND_DEVICES, ids=ids(FAST_BACKEND_DEVICES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_each_step_matches_reference(backend, device, dtype):
    """20 steps of three param groups with skipped parameters: after every step, parameters and state
    match the float64 specification to the rounding of their dtype."""
    torch.manual_seed(0)
    ref_model = _Net().to(device, dtype)
    fast_model = copy.deepcopy(ref_model)
    ref_opt = Ranger(_groups(ref_model), backend="reference")
    fast_opt = Ranger(_groups(fast_model), backend=backend)
    for step in range(STEPS):
        skip = {"gate.weight"} if step % 3 == 2 else set()  # skipped: its own step count and Lookahead phase
        for model in (ref_model, fast_model):
            _grads(model, step, skip)
        ref_opt.step()
        fast_opt.step()
        _assert_state_close(fast_model, ref_model, dtype, f"step {step + 1}")
        for p, q in zip(fast_model.parameters(), ref_model.parameters()):
            ours, theirs = fast_opt.state[p], ref_opt.state[q]
            assert ours["step"] == theirs["step"] and ours["exp_avg"].dtype == (
                torch.float64 if dtype == torch.float64 else torch.float32)
            rtol, atol = _tolerance(ours["exp_avg"].dtype)
            for key in ("exp_avg", "exp_avg_sq", "slow_buffer"):
                if key in theirs:
                    torch.testing.assert_close(ours[key], theirs[key].to(ours[key].dtype), rtol=rtol, atol=atol,
                                               msg=lambda m, key=key: f"step {step + 1}, {key}: {m}")
        _teacher_force(fast_model, fast_opt, ref_model, ref_opt)
    assert ref_opt.state[ref_model.gate.weight]["step"] == STEPS - STEPS // 3


@pytest.mark.parametrize("backend,device", FAST_BACKEND_DEVICES, ids=ids(FAST_BACKEND_DEVICES))
def test_free_running_float64_trajectory(backend, device):
    """Without teacher forcing, float64 parameters follow the specification to ~1e-12 over all steps."""
    torch.manual_seed(0)
    ref_model = _Net().to(device, torch.float64)
    fast_model = copy.deepcopy(ref_model)
    ref_opt, fast_opt = Ranger(_groups(ref_model), backend="reference"), Ranger(_groups(fast_model), backend=backend)
    for step in range(STEPS):
        for model in (ref_model, fast_model):
            _grads(model, step, set())
        ref_opt.step()
        fast_opt.step()
    _assert_state_close(fast_model, ref_model, torch.float64, "after 20 steps")


@pytest.mark.parametrize("gc,gc_conv_only", [(False, False), (True, True)])
def test_centralization_switches(gc, gc_conv_only):
    torch.manual_seed(0)
    ref_model = _Net().double()
    fast_model = copy.deepcopy(ref_model)
    ref_opt = GCRAdam(ref_model.parameters(), gc=gc, gc_conv_only=gc_conv_only, backend="reference")
    fast_opt = GCRAdam(fast_model.parameters(), gc=gc, gc_conv_only=gc_conv_only, backend="cpu")
    for step in range(8):
        for model in (ref_model, fast_model):
            _grads(model, step, set())
        ref_opt.step()
        fast_opt.step()
    _assert_state_close(fast_model, ref_model, torch.float64, "GCRAdam")
    assert "slow_buffer" not in fast_opt.state[fast_model.conv.weight]


def test_public_ranger_keywords_and_rectifier_threshold():
    """use_gc and N_sma_threshhold, as the public Ranger spells them, mean gc and rectifier_threshold; a
    higher threshold keeps the un-adapted steps longer, on every backend as in the reference."""
    torch.manual_seed(0)
    models = [_Net().double() for _ in range(3)]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    ours = Ranger(models[0].parameters(), gc=False, rectifier_threshold=6.0, backend="cpu")
    migrated = Ranger(models[1].parameters(), use_gc=False, N_sma_threshhold=6.0, backend="cpu")
    ref = Ranger(models[2].parameters(), gc=False, rectifier_threshold=6.0, backend="reference")
    assert migrated.param_groups[0]["gc"] is False and migrated.param_groups[0]["rectifier_threshold"] == 6.0
    for step in range(9):
        for model in models:
            _grads(model, step, set())
        for opt in (ours, migrated, ref):
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))
    _assert_state_close(models[0], models[2], torch.float64, "threshold 6")
    assert [reference.radam_rectifier(t, 0.999, 6.0) is None for t in range(1, 9)] == [True] * 6 + [False] * 2
    with pytest.raises(TypeError, match="Ranger\\(\\) got an unexpected keyword argument 'gc_loc'"):
        Ranger(models[0].parameters(), gc_loc=True)
    with pytest.raises(ValueError, match="rectifier_threshold must be >= 4"):
        GCRAdam(models[0].parameters(), N_sma_threshhold=3)


def test_reference_centralizes_rows():
    g = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    centered = reference.centralize_gradient(g)
    torch.testing.assert_close(centered.mean(dim=(1, 2, 3)), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(reference.centralize_gradient(g, conv_only=True), centered)
    linear, bias = torch.randn(3, 5), torch.randn(5)
    assert reference.centralize_gradient(linear, conv_only=True) is linear
    assert reference.centralize_gradient(bias) is bias
    assert [reference.radam_rectifier(t, 0.999) is None for t in range(1, 7)] == [True] * 5 + [False]


def test_lookahead_wrapper_equals_ranger():
    """Lookahead(GCRAdam) and the fused Ranger take the same steps."""
    torch.manual_seed(0)
    a = _Net()
    b = copy.deepcopy(a)
    fused = Ranger(a.parameters(), k=4, alpha=0.6, backend="cpu")
    wrapped = Lookahead(GCRAdam(b.parameters(), backend="cpu"), k=4, alpha=0.6)
    for step in range(13):
        skip = {"fc.weight"} if step == 5 else set()
        for model in (a, b):
            _grads(model, step, skip)
        fused.step()
        wrapped.step()
    _assert_state_close(a, b, torch.float32, "Lookahead(GCRAdam) vs Ranger")


def test_lookahead_wrapper_around_sgd():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Lookahead(torch.optim.SGD([p], lr=0.1), k=2, alpha=0.5)
    for _ in range(2):
        p.grad = torch.tensor([1.0, 1.0])
        opt.step()
    # fast: 1 -> 0.9 -> 0.8; slow: 1 + 0.5 * (0.8 - 1) = 0.9, and the parameter is reset to it
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -2.1]))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # sees the inner groups
    p.grad = torch.tensor([1.0, 1.0])
    opt.step()
    scheduler.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    q = nn.Parameter(p.detach().clone())
    other = Lookahead(torch.optim.SGD([q], lr=0.1), k=5, alpha=0.1)
    saved.seek(0)
    other.load_state_dict(torch.load(saved))
    assert (other.k, other.alpha) == (2, 0.5) and other.state[q]["step"] == 3
    assert other.param_groups is other.optimizer.param_groups


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_state_dict_resume_is_exact(backend):
    """10 steps, save, load into a fresh optimizer, 10 more steps == 20 steps without stopping; bfloat16
    parameters keep float32 state through the round trip."""
    def run(model, opt, steps):
        for step in steps:
            _grads(model, step, {"gate.weight"} if step == 7 else set())
            opt.step()

    torch.manual_seed(0)
    straight = _Net().to(torch.bfloat16)
    resumed = copy.deepcopy(straight)
    opt = Ranger(_groups(straight), backend=backend)
    run(straight, opt, range(STEPS))

    first = Ranger(_groups(resumed), backend=backend)
    run(resumed, first, range(10))
    saved = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optim": first.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved)
    fresh = _Net().to(torch.bfloat16)
    fresh.load_state_dict(checkpoint["model"])
    second = Ranger(_groups(fresh), backend=backend)
    second.load_state_dict(checkpoint["optim"])
    assert second.state[fresh.conv.weight]["exp_avg"].dtype == torch.float32
    run(fresh, second, range(10, STEPS))
    for p, q in zip(fresh.parameters(), straight.parameters()):
        assert torch.equal(p, q)


def test_gradscaler_skips_non_finite_steps():
    """torch.amp.GradScaler unscales the gradients, and skips the step (parameters, state and step counts
    untouched) when a gradient is inf; the next finite step proceeds as if the bad one never came."""
    torch.manual_seed(0)
    model = _Net()
    twin = copy.deepcopy(model)
    opt = Ranger(model.parameters(), backend="cpu")
    twin_opt = Ranger(twin.parameters(), backend="reference")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(4, 3, 7, 7)
    for step in range(8):
        opt.zero_grad()
        loss = model.fc(model.bn(model.gate(model.conv(x))).flatten(1)).square().mean()
        scaler.scale(loss).backward()
        grads = [p.grad / scaler.get_scale() for p in model.parameters()]
        if step == 3:
            model.fc.weight.grad[0, 0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if step == 3:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            assert scaler.get_scale() == 512.0
            continue
        for p, g in zip(twin.parameters(), grads):
            p.grad = g
        twin_opt.step()
        _assert_state_close(model, twin, torch.float32, f"step {step}")
    assert opt.state[model.conv.weight]["step"] == 7


def test_lr_scheduler_is_followed():
    torch.manual_seed(0)
    model = _Net().double()
    twin = copy.deepcopy(model)
    opts = [Ranger(model.parameters(), backend="cpu"), Ranger(twin.parameters(), backend="reference")]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)) for o in opts]
    for step in range(8):
        for m, o, s in zip((model, twin), opts, schedulers):
            _grads(m, step, set())
            o.step()
            s.step()
    assert opts[0].param_groups[0]["lr"] == pytest.approx(1e-3 / 9)
    _assert_state_close(model, twin, torch.float64, "with LambdaLR")


def test_errors_name_the_problem():
    model = _Net()
    with pytest.raises(ValueError, match="Ranger: param group 0: betas\\[1\\] must be in \\[0, 1\\)"):
        Ranger(model.parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="param group 1: lr must be >= 0"):
        Ranger([{"params": [model.conv.weight]}, {"params": [model.fc.weight], "lr": -1.0}])
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        Ranger(model.parameters(), k=0)
    with pytest.raises(ValueError, match="backend='gpu' is unknown"):
        Ranger(model.parameters(), backend="gpu")
    emb = nn.Embedding(10, 4, sparse=True)
    opt = Ranger(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()
    z = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    z.grad = torch.ones_like(z)
    with pytest.raises(RuntimeError, match="is complex"):
        Ranger([z]).step()
    t = nn.Parameter(torch.randn(4, 6).t())
    t.grad = torch.ones_like(t)
    with pytest.raises(RuntimeError, match="dim 0 outermost"):
        Ranger([t]).step()


def test_channels_last_weights_and_empty_parameters():
    """Channels-last conv weights are dense with dim 0 outermost: each output channel is one row."""
    torch.manual_seed(0)
    model = _Net().to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    empty = nn.Parameter(torch.zeros(0, 3))
    opts = [Ranger(list(model.parameters()) + [empty], backend="cpu"), Ranger(twin.parameters(), backend="reference")]
    for step in range(7):
        for m in (model, twin):
            _grads(m, step, set())
        empty.grad = torch.zeros(0, 3)
        for o in opts:
            o.step()
    _assert_state_close(model, twin, torch.float32, "channels-last")


def test_trains_a_small_resnet_like_the_reference():
    """ResNet-18 + Mish + ABP, a few steps with the fused optimizer and with the reference: the same loss
    curve."""
    losses = {}
    for backend in ("cpu", "reference"):
        torch.manual_seed(0)
        model = resnet18(num_classes=8)
        opt = Ranger(model.parameters(), backend=backend)
        gen = torch.Generator().manual_seed(0)
        images, labels = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 8, (8,), generator=gen)
        losses[backend] = []
        for _ in range(8):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            opt.step()
            losses[backend].append(loss.item())
    assert losses["cpu"][-1] < 0.5 * losses["cpu"][0]
    torch.testing.assert_close(torch.tensor(losses["cpu"]), torch.tensor(losses["reference"]), rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
def test_state_moves_across_devices():
    """A CPU checkpoint resumes on the GPU (and back) with the same trajectory."""
    torch.manual_seed(0)
    cpu_model = _Net()
    opt = Ranger(_groups(cpu_model), backend="cpu")
    for step in range(7):
        _grads(cpu_model, step, set())
        opt.step()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    gpu_opt = Ranger(_groups(gpu_model))
    gpu_opt.load_state_dict(opt.state_dict())
    assert gpu_opt.state[gpu_model.conv.weight]["exp_avg"].is_cuda
    for step in range(7, 13):
        for model, o in ((cpu_model, opt), (gpu_model, gpu_opt)):
            _grads(model, step, set())
            if model is gpu_model:
                for p in model.parameters():
                    p.grad = p.grad.cuda()
            o.step()
    for p, q in zip(gpu_model.parameters(), cpu_model.parameters()):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-5, atol=1e-6)


def test_cpu_step_is_deterministic_across_thread_counts():
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            model = resnet18(num_classes=8)
            opt = Ranger(model.parameters(), backend="cpu")
            for step in range(7):
                _grads(model, step, set())
                opt.step()
            results.append([p.detach().clone() for p in model.parameters()])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))
