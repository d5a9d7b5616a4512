"""Backend dispatch (fer_kernels/_dispatch.py): explicit requests, the environment variable, per-input reasons,
auto's check against the reference, reports, and the missing-extension fallback."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fer_kernels
from fer_kernels._dispatch import Op
from helpers import HAS_CUDA


@pytest.fixture
def spy(monkeypatch):
    """Records which backend ran the forward stage of mish and recalibrate."""
    calls = []
    for op in ("mish", "recalibrate"):
        for name, implementation in Op.registry[op].implementations.items():
            original = implementation.stages["forward"]
            monkeypatch.setitem(implementation.stages, "forward",
                                lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a))
    return calls


def test_explicit_backend_runs(spy):
    x = torch.randn(8)
    fer_kernels.mish(x, backend="reference")
    fer_kernels.recalibrate(x.reshape(2, 4), None, x.reshape(2, 4), backend="cpu")
    assert spy == ["reference", "cpu"]


def test_auto_on_cpu_uses_the_cpu_twin(spy):
    fer_kernels.mish(torch.randn(8))
    assert spy == ["cpu"]


def test_environment_variable(monkeypatch, spy):
    x = torch.randn(2, 4)
    monkeypatch.setenv("FER_KERNELS_BACKEND", "reference")
    fer_kernels.mish(x)
    monkeypatch.setenv("FER_KERNELS_BACKEND", "mish=cpu,recalibrate=reference")
    fer_kernels.mish(x)
    fer_kernels.recalibrate(x, None, x)
    fer_kernels.mish(x, backend="reference")  # the argument wins over the environment
    assert spy == ["reference", "cpu", "reference", "reference"]
    assert fer_kernels.backends()["recalibrate"]["cpu"] == "reference"


@pytest.mark.parametrize("value,message", [("fast", "unknown backend 'fast'"), ("conv=cpu", "unknown op 'conv'")])
def test_environment_variable_errors(monkeypatch, value, message):
    monkeypatch.setenv("FER_KERNELS_BACKEND", value)
    with pytest.raises(ValueError, match=f"FER_KERNELS_BACKEND=.*{message}"):
        fer_kernels.mish(torch.randn(3))


def test_unknown_backend_argument():
    with pytest.raises(ValueError, match=r"backend='fast' is unknown \(backends: auto, cuda, triton, cpu, reference\)"):
        fer_kernels.mish(torch.randn(3), backend="fast")


def test_unavailable_backend_says_why(monkeypatch):
    with pytest.raises(fer_kernels.BackendUnavailableError,
                       match="mish: backend 'cuda' cannot serve cpu float32 .*: the 'cuda' kernels serve cuda tensors only"):
        fer_kernels.mish(torch.randn(3), backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fer_kernels.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        fer_kernels.recalibrate(torch.randn(2, 3), None, torch.randn(2, 3), backend="triton")


def test_report():
    report = fer_kernels.backends()
    assert set(report) == {"mish", "recalibrate", "optim", "augment", "fmix_mix"}
    assert all(report[op]["cpu"] == "cpu" for op in ("mish", "augment", "fmix_mix"))
    detail = fer_kernels.backends(verbose=True)["mish"]["cpu"]
    assert detail["selected"] == "cpu" and detail["order"] == ["cpu", "reference"]
    assert "cuda" in detail["unavailable"]
    if not HAS_CUDA and "cuda" in report["mish"]:
        assert "no CUDA device" in report["mish"]["cuda"]


@pytest.mark.cuda
def test_auto_on_cuda_times_both_kernels():
    x = torch.randn(1 << 20, device="cuda")
    fer_kernels.mish(x)
    decisions = fer_kernels.backends(verbose=True)["mish"]["cuda"]["decisions"]
    assert decisions and {d["chosen"] for d in decisions.values()} <= {"cuda", "triton"}
    assert all(d["timed"] and not d["excluded"] for d in decisions.values())


def test_an_input_a_backend_cannot_serve_says_why():
    """The Triton mix has no backward: asked for explicitly with an x that requires grad it refuses, saying
    why; auto passes it over for the reference."""
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    mask, perm = torch.ones(4, 4), torch.tensor([1, 0])
    with pytest.raises(fer_kernels.BackendUnavailableError, match="fmix_mix: backend 'triton' cannot serve cpu "
                                                                  "float32 nchw input that requires grad: .*no backward"):
        fer_kernels.fmix_mix(x, mask, perm, backend="triton")
    out = fer_kernels.fmix_mix(x, mask, perm)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.fixture
def toy_op():
    """A throwaway op of the registry, removed afterwards."""
    op = Op("toy", verify=lambda stage, args, out: None if torch.equal(out, args[0] * 2) else "not 2 x")
    yield op
    del Op.registry["toy"]


def test_auto_lists_every_candidates_reason_when_none_can_serve(toy_op):
    toy_op.implement("cpu", supports=lambda inputs: "no float64 kernel" if inputs.dtype == torch.float64 else None,
                     run=lambda x: x * 2)
    toy_op.implement("reference", supports=lambda inputs: "the toy reference is float32 only"
                     if inputs.dtype != torch.float32 else None, run=lambda x: x * 2)
    from fer_kernels._dispatch import Inputs
    x = torch.ones(3, dtype=torch.float64)
    with pytest.raises(fer_kernels.BackendUnavailableError,
                       match=r"toy: no backend can serve cpu float64 dense input \(cpu: no float64 kernel; "
                             r"reference: the toy reference is float32 only\)"):
        toy_op("run", None, Inputs(x.device, x.dtype), x)


def test_auto_leaves_out_an_implementation_that_fails_the_check(toy_op, monkeypatch):
    """A wrong kernel (injected here) is caught on its first input of a kind, left out for that kind with one
    warning naming the op, the backend and the error, and shown by the report; FER_KERNELS_VERIFY=0 trusts it."""
    from fer_kernels._dispatch import Inputs
    toy_op.implement("cpu", run=lambda x: x * 3)
    toy_op.implement("reference", run=lambda x: x * 2)
    x = torch.ones(5)
    inputs = Inputs(x.device, x.dtype, size=(x.numel(),))
    monkeypatch.setenv("FER_KERNELS_VERIFY", "1")
    with pytest.warns(RuntimeWarning, match=r"toy \(run\) on backend 'cpu' is outside the test tolerances .*not 2 x"):
        assert torch.equal(toy_op("run", None, inputs, x), x * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per kind of input, not one per call
        assert torch.equal(toy_op("run", None, inputs, x + 1), (x + 1) * 2)
    decision = fer_kernels.backends(verbose=True)["toy"]["cpu"]["decisions"]
    assert list(decision.values()) == [{"chosen": "reference", "excluded": {"cpu": "not 2 x"}, "timed": False}]
    toy_op.decisions.clear()
    monkeypatch.setenv("FER_KERNELS_VERIFY", "0")
    assert torch.equal(toy_op("run", None, inputs, x), x * 3)
    assert toy_op("run", "cpu", inputs, x).eq(3).all()  # an explicit choice is never second-guessed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_the_check_passes_the_real_kernels(monkeypatch, dtype, channels_last):
    """No false alarm: the CPU twin's mish and recalibrate, forward and backward, pass auto's check on
    ordinary, huge and non-finite inputs in every dtype and layout."""
    monkeypatch.setenv("FER_KERNELS_VERIFY", "1")
    for name in ("mish", "recalibrate"):
        monkeypatch.setattr(Op.registry[name], "decisions", {})
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 7, 6, generator=g) * 6).to(dtype)
    x[0, 0, 0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")]).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    identity = torch.randn(x.shape, generator=g).to(dtype).contiguous(memory_format=x.dim() == 4 and (
        torch.channels_last if channels_last else torch.contiguous_format))
    gate = torch.rand(3, 5, 1, 1, generator=g).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in (x, identity, gate):
            t.requires_grad_()
        (fer_kernels.recalibrate(fer_kernels.mish(x), gate, identity) * torch.randn(x.shape, generator=g).to(dtype)
         ).sum().backward()
    for name in ("mish", "recalibrate"):
        decisions = fer_kernels.backends(verbose=True)[name]["cpu"]["decisions"]
        assert len(decisions) == 2 and all(d == {"chosen": "cpu", "excluded": {}, "timed": False}
                                           for d in decisions.values()), decisions


def test_without_the_extension_everything_falls_back_with_one_warning():
    """A machine with no compiler installs no fer_kernels._C: the package still imports, warns once, and
    the reference serves the CPU."""
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["fer_kernels._C"] = None  # makes `import fer_kernels._C` fail like a missing build
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fer_kernels, torch
            import fer_kernels.nn, fer_kernels.models
            y = fer_kernels.mish(torch.tensor([0.0, 1.0]))
            model = fer_kernels.models.resnet18()
            model.eval()(torch.randn(1, 3, 32, 32))
        ours = [w for w in caught if "fer_kernels" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in ours]
        assert "fer_kernels._C is not built" in str(ours[0].message)
        assert fer_kernels.backends()["mish"]["cpu"] == "reference"
        assert abs(y[1].item() - 0.8650984) < 1e-6
        try:
            fer_kernels.mish(torch.zeros(1), backend="cpu")
        except fer_kernels.BackendUnavailableError as err:
            assert "not built" in str(err)
        else:
            raise AssertionError("backend='cpu' should fail without the extension")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
