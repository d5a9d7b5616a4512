"""Compiles every Triton kernel launch that the tests make, for NVIDIA GPUs, on a machine without one.

Triton's CPU interpreter (how the tests run the Triton kernels without a GPU) executes a kernel's Python and
never compiles it, so a kernel can pass every test here and still fail to compile on a GPU: a type the
compiler rejects, a constexpr it cannot fold, a loop it cannot lower. Triton's compiler needs no GPU when
it is told the target, so this script finds those failures before a GPU does:

1. runs the given tests (default: the Triton tests of tests/kernels) under the interpreter with each
   launch's kernel, argument types and compile-time constants recorded;
2. in a fresh process without the interpreter, compiles each distinct launch down to machine code (cubin)
   for each target (default sm_90, the H100 and H200, and sm_80, the A100), as the launch on a GPU would.

    python tests/compile_triton.py [--targets 90,80] [pytest arguments ...]

Prints one line per launch that fails and a count; exits 1 if any failed. It takes a few minutes, so the
test suite does not run it; run it after changing a Triton kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TESTS = ["tests/kernels", "-k", "triton", "-p", "no:cacheprovider", "-q"]
_TORCH_TO_TRITON = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64",
                    "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


# ------------------------------------------------------------------------------------ recording (pytest plugin)

def _describe(value, constexpr: bool):
    """A launch argument as (kind, what the compiler needs to know of it): its type for a runtime argument,
    its value for a compile-time constant."""
    import torch
    import triton.language as tl

    if constexpr:
        if isinstance(value, tl.dtype):
            return "dtype", str(value)
        if isinstance(value, (bool, int, float, str)) or value is None:
            return "value", value
        raise TypeError(f"constexpr of type {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        return "type", "*" + _TORCH_TO_TRITON[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "type", "i1"
    if isinstance(value, int):
        # as the launcher specializes: 1 becomes a constant, other integers i32 or i64 by their size
        return ("value", 1) if value == 1 else ("type", "i32" if -2 ** 31 <= value < 2 ** 31 else "i64")
    if isinstance(value, float):
        return "type", "fp32"
    if value is None:
        return "value", None
    raise TypeError(f"argument of type {type(value).__name__}")


class Recorder:
    """Pytest plugin: records each interpreted launch as {kernel, args, options} in a JSON-lines file."""

    def __init__(self, path: str):
        self.path, self.seen = path, set()

    def pytest_configure(self, config):
        import inspect

        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        recorder, original = self, InterpretedFunction.run

        def run(function, *args, grid, warmup, **kwargs):
            parameters = inspect.signature(function.fn).parameters
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            bound = dict(zip(function.arg_names, args), **kwargs)
            described = {name: _describe(value, parameters[name].annotation in (tl.constexpr, "tl.constexpr"))
                         for name, value in bound.items()}
            record = {"module": function.fn.__module__, "kernel": function.fn.__name__, "args": described,
                      "options": options}
            key = json.dumps(record, sort_keys=True)
            if key not in recorder.seen:
                recorder.seen.add(key)
                with open(recorder.path, "a") as f:
                    f.write(key + "\n")
            return original(function, *args, grid=grid, warmup=warmup, **kwargs, **options)

        InterpretedFunction.run = run


# ------------------------------------------------------------------------------------------------ compiling

def _compile(records: list[dict], targets: list[int]) -> int:
    """Compiles every record for every target; prints each failure and their count; returns the count."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failed = 0
    for number, record in enumerate(records, 1):
        kernel = getattr(importlib.import_module(record["module"]), record["kernel"])
        signature, constants = {}, {}
        for name, (kind, value) in record["args"].items():
            if kind == "type":
                signature[name] = value
            else:
                signature[name] = "constexpr"
                constants[name] = tl.dtype(value) if kind == "dtype" else value
        for capability in targets:
            what = f"{record['kernel']} sm_{capability} {signature} {constants}"
            try:
                triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                               target=GPUTarget("cuda", capability, 32), options=record["options"])
            except Exception as err:  # noqa: BLE001 - every failure is reported, not only the first
                failed += 1
                print(f"FAILED {what}\n    {type(err).__name__}: {str(err).strip()[:2000]}", flush=True)
        if number % 50 == 0:
            print(f"{number}/{len(records)} launches compiled", flush=True)
    print(f"{len(records)} launches x {len(targets)} targets: {failed} compilations failed")
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="90,80", help="compute capabilities (default 90,80)")
    parser.add_argument("--records", help=argparse.SUPPRESS)  # phase 2, in its own process
    args, pytest_args = parser.parse_known_args()
    targets = [int(t) for t in args.targets.split(",")]
    if args.records:
        records = [json.loads(line) for line in Path(args.records).read_text().splitlines()]
        return 1 if _compile(records, targets) else 0

    start = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "launches.jsonl")
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
        # compile_triton is importable from tests/ on PYTHONPATH
        plugin = ("import sys, pytest; from compile_triton import Recorder; "
                  "sys.exit(pytest.main({args!r}, plugins=[Recorder({path!r})]))")
        code = plugin.format(args=pytest_args or DEFAULT_TESTS, path=path)
        tested = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env)
        if not os.path.exists(path):
            print(f"compile_triton.py: the tests launched no Triton kernel (pytest exit {tested.returncode})")
            return 1
        records = [json.loads(line) for line in Path(path).read_text().splitlines()]
        count = len(records)
        kernels = sorted({r["kernel"] for r in records})
        print(f"{count} distinct launches of {len(kernels)} kernels recorded ({', '.join(kernels)}; pytest exit "
              f"{tested.returncode}); compiling for {', '.join(f'sm_{t}' for t in targets)}", flush=True)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        compiled = subprocess.run([sys.executable, __file__, "--records", path, "--targets", args.targets],
                                  cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)})
    print(f"{time.monotonic() - start:.0f} s in all")
    return 1 if compiled.returncode or tested.returncode not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
