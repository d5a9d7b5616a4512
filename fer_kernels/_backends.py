"""Which implementation runs each op on each device.

After xformers' dispatch: every backend says why it cannot serve a device (or None when it can); an
explicit request for a backend that cannot serve raises an error with that reason; "auto" takes the
first backend of the device's priority list that can serve it, except on CUDA where the C++/CUDA and
Triton kernels of mish and recalibrate are both timed on the first real input of each kind and the
faster one is kept. The optimizer step ("optim") is not timed, as it updates its inputs in place: auto
takes the CUDA kernel on GPUs.

Choosing a backend, most specific first:
  1. the ``backend=`` argument of fer_kernels.mish / fer_kernels.recalibrate / the nn modules;
  2. the environment variable FER_KERNELS_BACKEND, either one name for every op ("triton") or per op
     ("mish=cuda,recalibrate=triton,optim=cpu");
  3. "auto".
FER_KERNELS_AUTOTUNE=0 turns the timing off (auto then prefers the CUDA kernels).
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable

import torch

from fer_kernels import reference

__all__ = ["BACKEND_NAMES", "BackendUnavailableError", "backends", "run"]

OPS = ("mish", "recalibrate", "optim")
ENV_BACKEND = "FER_KERNELS_BACKEND"
ENV_AUTOTUNE = "FER_KERNELS_AUTOTUNE"
ACT_CODES = {"mish": 0, "relu": 1, "none": 2}  # csrc/recalibrate.h enum Act, fer_kernels/triton/math.py


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run the op here; the message says why."""


def _load_extension():
    try:
        return importlib.import_module("fer_kernels._C"), None
    except ImportError as err:
        return None, f"the C++ extension fer_kernels._C is not built ({err})"


_C, _C_ERROR = _load_extension()
if _C is None:
    warnings.warn(f"fer_kernels: {_C_ERROR}; mish and recalibrate fall back to the plain-PyTorch reference on the "
                  "CPU (and to Triton on CUDA GPUs). Reinstall with a C++ compiler to get the fused kernels: "
                  "pip install --no-build-isolation .", RuntimeWarning, stacklevel=2)


def _upcast(t):
    return t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t


class _Backend:
    name: str = ""
    about: str = ""

    def unavailable(self, device_type: str) -> str | None:
        """Why this backend cannot run on `device_type`, or None if it can."""
        raise NotImplementedError


class _Reference(_Backend):
    name = "reference"
    about = "plain PyTorch (fer_kernels.reference), float32 math for half-precision inputs"

    def unavailable(self, device_type):
        return None

    def mish_forward(self, x):
        return torch.empty_like(x).copy_(reference.mish(_upcast(x)))

    def mish_backward(self, grad, x):
        return torch.empty_like(x).copy_(reference.mish_backward(_upcast(grad), _upcast(x)))

    def recalibrate_forward(self, x, gate, identity, act, channels_last):
        out = reference.recalibrate(_upcast(x), _upcast(gate), _upcast(identity), reference.ACTIVATIONS[act])
        return torch.empty_like(x).copy_(out)

    def recalibrate_backward(self, grad, x, gate, identity, act, channels_last):
        dx, dg, did = reference.recalibrate_backward(_upcast(grad), _upcast(x), _upcast(gate), _upcast(identity),
                                                     reference.ACTIVATIONS[act])
        return (torch.empty_like(x).copy_(dx), None if gate is None else dg.to(gate.dtype),
                torch.empty_like(x).copy_(did))

    def ranger_step(self, bucket):
        """The specification, parameter by parameter, from the hyperparameters (not the step's scalars)."""
        for param, grad, state in zip(bucket.params, bucket.grads, bucket.states):
            reference.ranger_step(param, grad, state, **bucket.hyper)


class _Extension(_Backend):
    """fer_kernels._C: the C++ CPU twin ("cpu") or the CUDA kernels ("cuda")."""

    def __init__(self, device_type: str):
        self.name = device_type
        self.device_type = device_type
        self.about = {"cpu": "C++ CPU twin (fer_kernels._C, vectorised, multithreaded)",
                      "cuda": "CUDA kernels (fer_kernels._C)"}[device_type]

    def unavailable(self, device_type):
        if device_type != self.device_type:
            return f"the {self.name!r} kernels serve {self.device_type} tensors only"
        if _C is None:
            return _C_ERROR + "; reinstall with a C++ compiler: pip install --no-build-isolation ."
        if device_type == "cuda":
            if not _C.with_cuda:
                return ("fer_kernels._C was built without its CUDA kernels (no nvcc or a CPU-only torch at build "
                        "time, or FER_KERNELS_CUDA=0); rebuild with CUDA_HOME set and FER_KERNELS_CUDA=1")
            if not torch.cuda.is_available():
                return "no CUDA device is available"
        return None

    def _fn(self, op):
        return getattr(_C, f"{op}_{self.device_type}")

    def mish_forward(self, x):
        return self._fn("mish_forward")(x)

    def mish_backward(self, grad, x):
        return self._fn("mish_backward")(grad, x)

    def recalibrate_forward(self, x, gate, identity, act, channels_last):
        return self._fn("recalibrate_forward")(x, gate, identity, act)

    def recalibrate_backward(self, grad, x, gate, identity, act, channels_last):
        return self._fn("recalibrate_backward")(grad, x, gate, identity, act)

    def ranger_step(self, bucket):
        self._fn("ranger_step")(*bucket.kernel_args())


class _Triton(_Backend):
    name = "triton"
    about = "Triton kernels (fer_kernels.triton); on CPU tensors only under TRITON_INTERPRET=1"

    def unavailable(self, device_type):
        try:
            importlib.import_module("triton")
        except ImportError as err:
            return f"triton cannot be imported ({err}); pip install triton"
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device is available"
        if device_type == "cpu":
            if os.environ.get("TRITON_INTERPRET") == "1":
                return None
            return "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing"
        return f"Triton does not run on {device_type} tensors"

    def mish_forward(self, x):
        from fer_kernels.triton.mish import mish_forward_triton
        return mish_forward_triton(x)

    def mish_backward(self, grad, x):
        from fer_kernels.triton.mish import mish_backward_triton
        return mish_backward_triton(grad, x)

    def recalibrate_forward(self, x, gate, identity, act, channels_last):
        from fer_kernels.triton.recalibrate import recalibrate_forward_triton
        return recalibrate_forward_triton(x, gate, identity, act, channels_last)

    def recalibrate_backward(self, grad, x, gate, identity, act, channels_last):
        from fer_kernels.triton.recalibrate import recalibrate_backward_triton
        return recalibrate_backward_triton(grad, x, gate, identity, act, channels_last)

    def ranger_step(self, bucket):
        from fer_kernels.triton.optim import ranger_step_triton
        ranger_step_triton(*bucket.kernel_args())


_BACKENDS = {b.name: b for b in (_Extension("cuda"), _Triton(), _Extension("cpu"), _Reference())}
BACKEND_NAMES = tuple(_BACKENDS)
# "auto": first that can serve; on CUDA the first two are timed against each other.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
_TIMED = {"cuda": ("cuda", "triton")}
_UNTIMED_OPS = ("optim",)  # ops that update their inputs in place cannot run twice to be timed
_measured: dict[tuple, str] = {}


def requested(op: str, backend: str | None = None) -> str:
    """The backend asked for `op`: the argument, else FER_KERNELS_BACKEND, else "auto"."""
    names = f"auto, {', '.join(BACKEND_NAMES)}"
    if backend not in (None, "", "auto"):
        if backend not in _BACKENDS:
            raise ValueError(f"backend={backend!r} is unknown (backends: {names})")
        return backend
    env = os.environ.get(ENV_BACKEND, "").strip()
    name = "auto"
    for part in filter(None, (p.strip() for p in env.split(","))):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep:
            name = key  # one backend for every op not named on its own
        elif key not in OPS:
            raise ValueError(f"{ENV_BACKEND}={env!r}: unknown op {key!r} (ops: {', '.join(OPS)})")
        elif key == op:
            name = value
            break
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={env!r}: unknown backend {name!r} (backends: {names})")
    return name


def _explain(op: str, name: str, device_type: str) -> str | None:
    backend = _BACKENDS[name]
    reason = backend.unavailable(device_type)
    return None if reason is None else f"{op}: backend {name!r} cannot run on {device_type}: {reason}"


def _auto_candidates(op: str, device_type: str) -> tuple[list[str], list[str]]:
    """auto's usable backends for an op on a device type, in priority order, and those of them it times."""
    usable = [n for n in _AUTO_ORDER.get(device_type, ("reference",)) if _BACKENDS[n].unavailable(device_type) is None]
    timed = [n for n in _TIMED.get(device_type, ()) if n in usable]
    if len(timed) < 2 or op in _UNTIMED_OPS or os.environ.get(ENV_AUTOTUNE, "1") == "0":
        timed = []
    return usable, timed


def _bucket(n: int) -> int:
    return max(int(n), 1).bit_length()


def _time_candidates(names, call: Callable[[_Backend], object], device: torch.device) -> str:
    """Median time of a few runs of each candidate on the real input; returns the fastest."""
    times = {}
    with torch.cuda.device(device):
        for name in names:
            call(_BACKENDS[name])  # warm-up: compiles Triton kernels, fills caches
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
            for start, end in zip(starts, ends):
                start.record()
                call(_BACKENDS[name])
                end.record()
            torch.cuda.synchronize()
            times[name] = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[2]
    return min(times, key=times.get)


def run(op: str, stage: str, backend: str | None, x: torch.Tensor, shape_key: tuple, *args):
    """Run `stage` ("mish_forward", ...) of `op` on the backend chosen for x's device; args follow the
    backend method's signature."""
    device_type = x.device.type
    name = requested(op, backend)
    call = lambda b: getattr(b, stage)(*args)  # noqa: E731
    if name != "auto":
        reason = _explain(op, name, device_type)
        if reason is not None:
            raise BackendUnavailableError(reason)
        return call(_BACKENDS[name])
    usable, timed = _auto_candidates(op, device_type)
    if timed and not torch.cuda.is_current_stream_capturing():  # no timing inside a CUDA-graph capture
        key = (stage, x.device.index, x.dtype) + shape_key
        if key not in _measured:
            _measured[key] = _time_candidates(timed, call, x.device)
        return call(_BACKENDS[_measured[key]])
    return call(_BACKENDS[usable[0]])


def shape_key(numel: int, *extra: int) -> tuple:
    """Inputs whose sizes fall in the same power-of-two buckets share one timed choice."""
    return (_bucket(numel),) + tuple(_bucket(e) for e in extra)


def _device_types():
    types = ["cpu"]
    if torch.backends.cuda.is_built() or torch.cuda.is_available():
        types.append("cuda")
    return types


def backends(verbose: bool = False) -> dict:
    """Which backend serves each op on each device type.

    Returns ``{op: {device_type: description}}``; with ``verbose=True`` each entry is a dict with
    "selected", "order" (auto's priority list), "unavailable" ({backend: reason}) and "measured" (the
    timed choices made so far, by stage, dtype and size bucket).
    """
    report = {}
    for op in OPS:
        report[op] = {}
        for device_type in _device_types():
            name = requested(op)
            unavailable = {n: b.unavailable(device_type) for n, b in _BACKENDS.items()}
            unavailable = {n: r for n, r in unavailable.items() if r is not None}
            order = list(_AUTO_ORDER.get(device_type, ("reference",)))
            if device_type == "cuda" and not torch.cuda.is_available():
                selected = "none: no CUDA device is available"
            elif name != "auto":
                selected = name if name not in unavailable else f"{name} (unavailable: {unavailable[name]})"
            else:
                usable, timed = _auto_candidates(op, device_type)
                selected = f"fastest of {' and '.join(timed)}, timed per dtype and size" if timed else usable[0]
            if verbose:
                measured = {f"{k[0]} {k[2]} size-bucket {k[3:]}": v for k, v in _measured.items()
                            if k[0].startswith(op)}
                report[op][device_type] = {"selected": selected, "order": order, "unavailable": unavailable,
                                           "measured": measured}
            else:
                report[op][device_type] = selected
    return report
