"""Which implementation runs each op: one registry keyed by op, after xformers' fmha dispatch.

Every op (fer_kernels/ops/) is an `Op` registered once, in its own module, with one implementation per
backend that can serve it. A backend says why it cannot serve a device type (the extension is not built,
Triton is missing, no GPU), and an implementation may also say why it cannot serve one input (its dtype,
layout, or a gradient it has no backward for). An explicit request for a backend that cannot serve raises
BackendUnavailableError with that reason; "auto" takes the first backend of the device's priority list
that can, and when none can, the error lists every candidate's reason.

Choosing a backend, most specific first:
  1. the ``backend=`` argument of the op (and of the nn modules and optimizers that call it);
  2. FER_KERNELS_BACKEND: one name for every op ("triton"), or per op ("mish=cuda,recalibrate=triton,optim=cpu");
  3. "auto".

Before auto trusts a fast implementation with an input kind (op, stage, device, dtype, layout, size bucket) it
checks it once against the plain-PyTorch reference on its first real input of that kind; one whose result is
outside the test suite's tolerances (fer_kernels/_accuracy.py) is left out for that kind, with one warning naming the op, the backend
and the error (FER_KERNELS_VERIFY: "auto", the default, checks GPU implementations; "1" every device; "0"
none). Then, for the ops that can be run twice (not the optimizer step, which updates its inputs), auto
times the CUDA kernels against Triton and keeps the faster (FER_KERNELS_AUTOTUNE=0: no timing). Neither
happens inside a CUDA-graph capture. backends(verbose=True) shows every choice made so far.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["BACKEND_NAMES", "BackendUnavailableError", "Inputs", "Op", "backends", "extension", "lazy", "requested"]

ENV_BACKEND = "FER_KERNELS_BACKEND"
ENV_AUTOTUNE = "FER_KERNELS_AUTOTUNE"
ENV_VERIFY = "FER_KERNELS_VERIFY"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run the op here; the message says why."""


# ------------------------------------------------------------------------------------------- backends

def _load_extension():
    try:
        return importlib.import_module("fer_kernels._C"), None
    except ImportError as err:
        return None, f"the C++ extension fer_kernels._C is not built ({err})"


_C, _C_ERROR = _load_extension()
if _C is None:
    warnings.warn(f"fer_kernels: {_C_ERROR}; the ops fall back to the plain-PyTorch reference on the CPU (and to "
                  "Triton on CUDA GPUs). Reinstall with a C++ compiler to get the fused kernels: "
                  "pip install --no-build-isolation .", RuntimeWarning, stacklevel=2)


def _extension_unavailable(kind: str, device_type: str) -> str | None:
    if device_type != kind:
        return f"the {kind!r} kernels serve {kind} tensors only"
    if _C is None:
        return _C_ERROR + "; reinstall with a C++ compiler: pip install --no-build-isolation ."
    if kind == "cuda":
        if not _C.with_cuda:
            return ("fer_kernels._C was built without its CUDA kernels (no nvcc or a CPU-only torch at build time, "
                    "or FER_KERNELS_CUDA=0); rebuild with CUDA_HOME set and FER_KERNELS_CUDA=1")
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    return None


def _triton_unavailable(device_type: str) -> str | None:
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


@dataclass(frozen=True)
class _Backend:
    name: str
    about: str
    unavailable: Callable[[str], str | None]  # device type -> why it cannot serve it, or None


_BACKENDS = {b.name: b for b in (
    _Backend("cuda", "CUDA kernels (fer_kernels._C, csrc/cuda/)", lambda d: _extension_unavailable("cuda", d)),
    _Backend("triton", "Triton kernels (fer_kernels/triton/); on CPU tensors only under TRITON_INTERPRET=1",
             _triton_unavailable),
    _Backend("cpu", "C++ CPU twin (fer_kernels._C, csrc/cpu/: vectorised, multithreaded)",
             lambda d: _extension_unavailable("cpu", d)),
    _Backend("reference", "plain PyTorch (fer_kernels.reference), float32 math for half-precision inputs",
             lambda d: None),
)}
BACKEND_NAMES = tuple(_BACKENDS)
# auto's priority per device type; an op is served by the first of these it implements and that can serve.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
_TIMED = ("cuda", "triton")  # auto times these against each other where an op has both


def extension(name: str) -> Callable:
    """A stage function of fer_kernels._C, looked up when called (the module may be missing)."""
    return lambda *args: getattr(_C, name)(*args)


def lazy(module: str, name: str) -> Callable:
    """A stage function imported on first call, so that importing fer_kernels never needs Triton."""
    def call(*args):
        return getattr(importlib.import_module(module), name)(*args)
    return call


# ------------------------------------------------------------------------------------------- ops

@dataclass(frozen=True)
class Inputs:
    """What an implementation is told about a call before it runs: where and what the data is.
    size: the sizes that matter to speed (numel, H x W, ...); calls whose sizes fall in the same
    power-of-two buckets share one checked and timed choice."""

    device: torch.device
    dtype: torch.dtype
    layout: str = "dense"  # "dense", "nchw" or "channels_last"
    requires_grad: bool = False
    size: tuple[int, ...] = ()

    def key(self) -> tuple:
        return (self.device.type, self.device.index, self.dtype, self.layout,
                tuple(max(int(s), 1).bit_length() for s in self.size))


@dataclass
class _Implementation:
    backend: str
    stages: dict[str, Callable]
    supports: Callable[[Inputs], str | None] | None = None  # why it cannot serve this input, or None


@dataclass
class _Decision:
    chosen: str
    excluded: dict[str, str] = field(default_factory=dict)  # backend -> the error that left it out
    timed: bool = False


class Op:
    """One op of the registry: its implementations by backend, and how auto checks them.

    verify(stage, args, out) -> the error of `out` (a stage's result on args) against the reference, or
    None when it is within tolerance. mutates: the stages update their inputs, so they are neither
    timed nor checked by running them twice.
    """

    registry: dict[str, Op] = {}

    def __init__(self, name: str, *, verify: Callable | None = None, mutates: bool = False):
        self.name, self.verify, self.mutates = name, verify, mutates
        self.implementations: dict[str, _Implementation] = {}
        self.decisions: dict[tuple, _Decision] = {}
        self._auto_plans: dict[tuple, tuple[list[str], bool]] = {}
        Op.registry[name] = self

    def implement(self, backend: str, supports: Callable[[Inputs], str | None] | None = None,
                  **stages: Callable) -> None:
        """Registers `backend`'s stage functions. supports(inputs) says why it cannot serve an input, or None;
        it may look at the input's device, dtype, layout and requires_grad (auto remembers its answer per
        combination of these), not at its sizes."""
        if backend not in _BACKENDS:
            raise ValueError(f"{self.name}: unknown backend {backend!r} (backends: {', '.join(BACKEND_NAMES)})")
        self.implementations[backend] = _Implementation(backend, stages, supports)
        self._auto_plans.clear()

    def check_backend(self, backend: str | None) -> None:
        """A ValueError now, rather than at the first call, for a backend name this op has no implementation of."""
        if backend not in (None, "", "auto") and backend not in self.implementations:
            raise ValueError(f"{self.name}: backend must be None, 'auto' or one of {tuple(self.implementations)}, "
                             f"got {backend!r}")

    def reason(self, backend: str, inputs: Inputs) -> str | None:
        """Why `backend` cannot serve this input, or None."""
        implementation = self.implementations.get(backend)
        if implementation is None:
            return f"{self.name} has no {backend!r} implementation"
        why = _BACKENDS[backend].unavailable(inputs.device.type)
        if why is None and implementation.supports is not None:
            why = implementation.supports(inputs)
        return why

    def auto_order(self, device_type: str) -> list[str]:
        return [b for b in _AUTO_ORDER.get(device_type, ("reference",)) if b in self.implementations]

    def __call__(self, stage: str, backend: str | None, inputs: Inputs, *args):
        """Runs `stage` on the backend chosen for this input; args follow the stage's signature."""
        name = requested(self.name, backend)
        if name != "auto":
            why = self.reason(name, inputs)
            if why is not None:
                raise BackendUnavailableError(f"{self.name}: backend {name!r} cannot serve {_describe(inputs)}: {why}")
            return self.implementations[name].stages[stage](*args)
        # What auto may use for this kind of input, and whether it must check or time them, is worked out
        # once per kind (and setting of the environment): a call then costs a dictionary lookup.
        kind = (inputs.device.type, inputs.dtype, inputs.layout, inputs.requires_grad,
                os.environ.get(ENV_VERIFY, ""), os.environ.get(ENV_AUTOTUNE, ""))
        plan = self._auto_plans.get(kind)
        if plan is None:
            plan = self._auto_plans[kind] = self._plan(inputs)
        usable, deciding = plan
        if deciding and not (inputs.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            name = self._choose(stage, inputs, usable, args)
        else:
            name = usable[0]
        return self.implementations[name].stages[stage](*args)

    def _plan(self, inputs: Inputs) -> tuple[list[str], bool]:
        """(auto's usable backends for this kind of input, whether it checks or times them)."""
        reasons = {b: self.reason(b, inputs) for b in self.auto_order(inputs.device.type)}
        usable = [b for b, why in reasons.items() if why is None]
        if not usable:
            listed = "; ".join(f"{b}: {why}" for b, why in reasons.items()) or "no backend serves this device"
            raise BackendUnavailableError(f"{self.name}: no backend can serve {_describe(inputs)} ({listed})")
        checked = _verifies(inputs.device.type) and self.verify is not None and not self.mutates
        timing = (not self.mutates and len([b for b in usable if b in _TIMED]) > 1
                  and os.environ.get(ENV_AUTOTUNE, "1") != "0")
        return usable, checked or timing

    def _choose(self, stage: str, inputs: Inputs, usable: list[str], args) -> str:
        checked = _verifies(inputs.device.type) and self.verify is not None and not self.mutates
        timing = not self.mutates and os.environ.get(ENV_AUTOTUNE, "1") != "0"
        key = (stage, *inputs.key(), tuple(usable))
        decision = self.decisions.get(key)
        if decision is None:
            decision = self.decisions[key] = self._decide(stage, inputs, usable, args, checked, timing)
        return decision.chosen

    def _decide(self, stage, inputs, usable, args, checked, timing) -> _Decision:
        excluded = {}
        if checked:
            for backend in usable:
                if backend == "reference":
                    continue
                error = self.verify(stage, args, self.implementations[backend].stages[stage](*args))
                if error is not None:
                    excluded[backend] = error
                    warnings.warn(f"fer_kernels: {self.name} ({stage}) on backend {backend!r} is outside the test "
                                  f"tolerances for {_describe(inputs)}: {error}. It is not used for such inputs; "
                                  f"check the build (python -m fer_train selfcheck) or choose a backend with "
                                  f"{ENV_BACKEND}.", RuntimeWarning, stacklevel=4)
        survivors = [b for b in usable if b not in excluded]
        timed = [b for b in survivors if b in _TIMED]
        if timing and len(timed) > 1 and inputs.device.type == "cuda":
            call = lambda b: self.implementations[b].stages[stage](*args)  # noqa: E731
            return _Decision(_fastest(timed, call, inputs.device), excluded, timed=True)
        return _Decision(survivors[0], excluded)

    def report(self, device_type: str, verbose: bool):
        name = requested(self.name)
        order = self.auto_order(device_type)
        unavailable = {b: why for b in self.implementations
                       if (why := _BACKENDS[b].unavailable(device_type)) is not None}
        if device_type == "cuda" and not torch.cuda.is_available():
            selected = "none: no CUDA device is available"
        elif name != "auto":
            selected = name if name not in unavailable else f"{name} (unavailable: {unavailable.get(name) or ''})"
            if name not in self.implementations:
                selected = f"{name} (unavailable: {self.name} has no {name!r} implementation)"
        else:
            usable = [b for b in order if b not in unavailable]
            timed = [b for b in usable if b in _TIMED]
            if len(timed) > 1 and not self.mutates and os.environ.get(ENV_AUTOTUNE, "1") != "0":
                selected = f"fastest of {' and '.join(timed)}, timed per dtype and size"
            else:
                selected = usable[0] if usable else "none"
        if not verbose:
            return selected
        decisions = {f"{k[0]} {k[3]} {k[4]} size-bucket {k[5]}": {"chosen": d.chosen, "excluded": d.excluded,
                                                                   "timed": d.timed}
                     for k, d in self.decisions.items() if k[1] == device_type}
        return {"selected": selected, "order": order, "implemented": list(self.implementations),
                "unavailable": unavailable, "decisions": decisions}


def _describe(inputs: Inputs) -> str:
    dtype = str(inputs.dtype).replace("torch.", "")
    return f"{inputs.device.type} {dtype} {inputs.layout} input{' that requires grad' if inputs.requires_grad else ''}"


def _verifies(device_type: str) -> bool:
    mode = os.environ.get(ENV_VERIFY, "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"{ENV_VERIFY}={mode!r}: expected auto (check GPU implementations), 1 (every device) or 0")
    return mode == "1" or (mode == "auto" and device_type == "cuda")


def _fastest(names: list[str], call: Callable[[str], object], device: torch.device) -> str:
    """The candidate with the lowest median of five timed runs on the real input (after a warm-up run,
    which also compiles Triton kernels)."""
    times = {}
    with torch.cuda.device(device):
        for name in names:
            call(name)
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
            for start, end in zip(starts, ends):
                start.record()
                call(name)
                end.record()
            torch.cuda.synchronize()
            times[name] = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[2]
    return min(times, key=times.get)


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
        elif key not in Op.registry:
            raise ValueError(f"{ENV_BACKEND}={env!r}: unknown op {key!r} (ops: {', '.join(Op.registry)})")
        elif key == op:
            name = value
            break
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={env!r}: unknown backend {name!r} (backends: {names})")
    return name


# ------------------------------------------------------------------------------------------- report

_OP_MODULES = ("fer_kernels.ops.mish", "fer_kernels.ops.recalibrate", "fer_kernels.ops.optim",
               "fer_kernels.ops.augment", "fer_kernels.ops.fmix_mix")


def _device_types() -> list[str]:
    types = ["cpu"]
    if torch.backends.cuda.is_built() or torch.cuda.is_available():
        types.append("cuda")
    return types


def backends(verbose: bool = False) -> dict:
    """Which backend serves each op on each device type.

    Returns ``{op: {device_type: description}}``; with ``verbose=True`` each entry is a dict with
    "selected", "order" (auto's priority list), "implemented", "unavailable" ({backend: reason}) and
    "decisions" (auto's choices so far by stage, dtype, layout and size bucket, with the backends its
    check against the reference left out, and why).
    """
    for module in _OP_MODULES:
        importlib.import_module(module)
    return {name: {d: op.report(d, verbose) for d in _device_types()} for name, op in Op.registry.items()}
