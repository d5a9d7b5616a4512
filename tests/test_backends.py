"""Backend choice: explicit requests, the environment variable, reports, and the missing-extension fallback."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fer_kernels
from fer_kernels import _backends
from conftest import HAS_CUDA


@pytest.fixture
def spy(monkeypatch):
    """Records which backend ran each stage."""
    calls = []
    for name, backend in _backends._BACKENDS.items():
        for stage in ("mish_forward", "recalibrate_forward"):
            original = getattr(backend, stage)
            monkeypatch.setattr(backend, stage, lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a))
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
                       match="backend 'cuda' cannot run on cpu: .*cuda tensors only"):
        fer_kernels.mish(torch.randn(3), backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fer_kernels.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        fer_kernels.recalibrate(torch.randn(2, 3), None, torch.randn(2, 3), backend="triton")


def test_report():
    report = fer_kernels.backends()
    assert set(report) == {"mish", "recalibrate", "optim"}
    assert report["mish"]["cpu"] == "cpu"
    detail = fer_kernels.backends(verbose=True)["mish"]["cpu"]
    assert detail["selected"] == "cpu" and detail["order"] == ["cpu", "reference"]
    assert "cuda" in detail["unavailable"]
    if not HAS_CUDA and "cuda" in report["mish"]:
        assert "no CUDA device" in report["mish"]["cuda"]


@pytest.mark.cuda
def test_auto_on_cuda_times_both_kernels():
    x = torch.randn(1 << 20, device="cuda")
    fer_kernels.mish(x)
    measured = fer_kernels.backends(verbose=True)["mish"]["cuda"]["measured"]
    assert measured and set(measured.values()) <= {"cuda", "triton"}


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


@pytest.mark.slow
def test_setup_without_a_compiler_installs_the_pure_python_package(tmp_path):
    """setup.py's default (FER_KERNELS_EXTENSION=auto): a failing C++ build installs the package without
    fer_kernels._C instead of failing the install."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "csrc", "fer_kernels", "fer_train"):
        copy = shutil.copytree if (root / name).is_dir() else shutil.copy
        copy(root / name, source / name, **({"ignore": shutil.ignore_patterns("*.so", "__pycache__")}
                                             if (root / name).is_dir() else {}))
    env = dict(os.environ, CC="/nonexistent/cc", CXX="/nonexistent/c++", FER_KERNELS_CUDA="0")
    env.pop("FER_KERNELS_EXTENSION", None)
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-q",
                              "--target", str(tmp_path / "site"), str(source)],
                             capture_output=True, text=True, env=env, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    assert not list((tmp_path / "site" / "fer_kernels").glob("_C*"))
    # Drop the editable install of this checkout from the import machinery, or its _C would be found.
    code = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', '')]\n"
            "import fer_kernels, torch\n"
            "print(fer_kernels.backends()['mish']['cpu'], fer_kernels.mish(torch.zeros(2)).tolist())")
    check = subprocess.run([sys.executable, "-W", "always", "-c", code],
                           capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")), cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert check.stdout.split() == ["reference", "[0.0,", "0.0]"]
    assert check.stderr.count("fer_kernels._C is not built") == 1
