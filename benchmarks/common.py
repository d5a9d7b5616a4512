"""What every benchmark script shares: the environment record, the copy bandwidth, the timer, the byte floor
of each op, the timing of forward / backward / both, and the results file.

Every time is reported against the byte floor: the fewest bytes the op must move (each input read once,
each output written once) over the device-to-device copy bandwidth measured in the same run. The same
byte count is used for every variant, so "GB/s" is effective bandwidth and ratios of GB/s are ratios of
time. Only the byte floor is computed: the arithmetic floor of these ops is set by their transcendental
functions (exp, log1p, tanh), not by a matrix-product rate, and is not measured here. It can be the
higher floor with 2 CPU threads, and may come close in bf16 on a GPU (half the bytes, the same math), so
a low fraction of copy bandwidth there is not by itself a memory-access problem.

    python benchmarks/common.py benchmarks/results/*.json              prints the summary of results files
    python benchmarks/common.py --markdown benchmarks/results/*.json   the README's table (fwd+bwd rows)
    python benchmarks/common.py --markdown-optim benchmarks/results/*-optim.json   the optimizer table
    python benchmarks/common.py --markdown-pipeline benchmarks/results/*-pipeline.json   the data-pipeline table
    python benchmarks/common.py --markdown-train benchmarks/results/*-train.json   the training-throughput table
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import itertools
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CPU_THREADS = 2  # every CPU figure is measured, and stated, at this thread count

# ResNet-50 at 224 x 224: (C, H, W) of the tensors each op sees in the fused model.
# Mish runs on the stem and inside each bottleneck (after bn1 and bn2: planes channels); one shape per stage.
MISH_SHAPES = [(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
# The block tail runs on each bottleneck's output (4 x planes channels).
TAIL_SHAPES = [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
BATCH = {"cuda": 256, "cpu": 8}
QUICK_BATCH, QUICK_MISH_SHAPES, QUICK_TAIL_SHAPES = 2, [(64, 28, 28)], [(256, 14, 14)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PASSES = ("fwd", "bwd", "fwd+bwd")

# Fewest accesses per element, in elements of the storage dtype (the byte floor):
#   mish: fwd reads x, writes y; bwd reads dy and x, writes dx.
#   tail act(x * g + id): fwd reads x and id, writes y; bwd reads dy, x and id, writes dx and d_id, and
#   the N x C gate adds per-(n, c) terms (fwd reads g; bwd reads g, writes dg), counted exactly below.
MISH_ACCESSES = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}
TAIL_ACCESSES = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}
TAIL_GATE_ACCESSES = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}


def mish_bytes(shape, dtype: torch.dtype, pass_: str) -> int:
    """Byte floor of Mish: 8 / 12 / 20 bytes per element in float32, half that in bf16/fp16."""
    return MISH_ACCESSES[pass_] * math.prod(shape) * _itemsize(dtype)


def tail_bytes(shape, dtype: torch.dtype, pass_: str) -> int:
    """Byte floor of the block tail: 12 / 20 / 32 bytes per element in float32, plus the N x C gate terms."""
    n, c = shape[:2]
    return (TAIL_ACCESSES[pass_] * math.prod(shape) + TAIL_GATE_ACCESSES[pass_] * n * c) * _itemsize(dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------- device

def parse_args(description: str, add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None,
               dtypes: bool = True):
    """The options every benchmark takes (--device, --quick, --results and, with `dtypes`, --dtypes), plus
    those `add_arguments` adds to the parser."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke configuration (seconds for a kernel benchmark; bench_train's compiled models "
                        "and engine settings take minutes); results get -quick")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON file (default: %(default)s)")
    if dtypes:
        p.add_argument("--dtypes", type=lambda s: s.split(","), default=None,
                       help=f"comma-separated, of {', '.join(DTYPES)} (default: float32,bfloat16 on cuda, float32 on "
                            f"cpu)")
    if add_arguments is not None:
        add_arguments(p)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{p.prog}: --device cuda but torch {torch.__version__} sees no CUDA device; use --device cpu")
    if dtypes:
        args.dtypes = args.dtypes or (["float32", "bfloat16"] if args.device == "cuda" else ["float32"])
        unknown = [d for d in args.dtypes if d not in DTYPES]
        if unknown:
            p.error(f"--dtypes: unknown {unknown}; choose from {', '.join(DTYPES)}")
    return args


def setup(device_type: str) -> torch.device:
    """The device to time on; the CPU runs at CPU_THREADS threads."""
    torch.manual_seed(0)
    if device_type == "cpu":
        torch.set_num_threads(CPU_THREADS)
    return torch.device(device_type)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        found = None
    return f"CPU {found.group(1).strip() if found else platform.processor() or platform.machine()}"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        # results files are rewritten by the runs themselves: they do not make the code dirty
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results").stdout.strip()
        return head.stdout.strip() + ("+uncommitted-changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    import fer_kernels
    env = {
        "device": device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "python": platform.python_version(),
        "fer_kernels_backends": {op: by_device.get(device.type) for op, by_device in fer_kernels.backends().items()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }
    if device.type == "cpu":
        # the vector unit ATen and our kernels' clones run on (AVX512, AVX2, ...): the same CPU model name
        # covers machines with and without AVX-512, and the kernels' speed differs between them
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["capability"] = f"{props.major}.{props.minor}"
        env["l2_cache_bytes"] = cache_bytes(device)
    return env


def cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache that input sets must overflow (GPU L2, CPU L3)."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)  # 50 MB: H100's L2
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"), reverse=True):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20}.get(size[-1], 1)
        return int(size.rstrip("KM")) * unit
    return 32 << 20


# ---------------------------------------------------------------------------------------------- timing

def time_ms(calls: list[Callable[[], object]], device: torch.device, grad_to_none=(), min_reps: int = 5,
            min_seconds: Optional[float] = None) -> float:
    """Median milliseconds of one call, cycling through `calls` (one per input set, see input_sets).

    GPU: triton.testing.do_bench over `min_seconds` (default 0.1 s) of calls (CUDA events; it also flushes
    L2 before each timed call). CPU: time.perf_counter around single calls after one warm-up call per input
    set, at least `min_reps` calls and `min_seconds` (default 0.3 s) of timed calls. `grad_to_none`: tensors
    whose .grad is cleared before every timed call, so that .backward() never adds an accumulation pass.
    """
    cycle = itertools.cycle(calls)

    def step():
        return next(cycle)()

    if device.type == "cuda":
        import triton.testing
        rep_ms = 1e3 * (0.1 if min_seconds is None else min_seconds)
        return triton.testing.do_bench(step, rep=rep_ms, grad_to_none=list(grad_to_none) or None,
                                       return_mode="median")
    min_seconds = 0.3 if min_seconds is None else min_seconds
    for _ in range(max(len(calls), 2)):
        step()
    times = []
    while len(times) < min_reps or (sum(times) < min_seconds and len(times) < 1000):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def input_sets(bytes_per_call: int, device: torch.device, limit: int = 32) -> int:
    """How many input sets to rotate through so the data of one call is out of cache by its next turn:
    enough to fill twice the last-level cache (at most `limit`, which only tiny --quick shapes reach)."""
    return max(1, min(limit, math.ceil(2 * cache_bytes(device) / bytes_per_call)))


def copy_bandwidth(device: torch.device, quick: bool = False) -> float:
    """GB/s (bytes read + written) of torch.Tensor.copy_ between two preallocated buffers far larger than
    the last-level cache: the device-to-device copy that every "fraction of copy bandwidth" is measured against."""
    nbytes = max(8 * cache_bytes(device), (256 << 20) if device.type == "cpu" else (1 << 30))
    if quick:
        nbytes = 4 * cache_bytes(device)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms([lambda: dst.copy_(src)], device)
    return 2 * src.nbytes / ms / 1e6


# ---------------------------------------------------------------------------------------------- passes

@dataclass
class Variant:
    """One implementation: forward(*inputs) -> output; backward(grad, *inputs) -> input grads, called under
    no_grad, or None to time autograd.grad over a graph built once and retained (eager and torch.compile
    have no standalone backward op)."""

    forward: Callable
    backward: Optional[Callable] = None


def time_passes(variant: Variant, sets: list[tuple[tuple, torch.Tensor]], device: torch.device,
                **timer) -> dict[str, float]:
    """Median ms of fwd, bwd and fwd+bwd of `variant`; `sets` holds (inputs, grad) per input set, the inputs
    being leaves that require grad, so fwd is the forward of a training step (it also saves for backward)."""
    leaves = [t for inputs, _ in sets for t in inputs]
    fwd = [lambda i=inputs: variant.forward(*i) for inputs, _ in sets]
    if variant.backward is not None:
        def direct(grad, inputs):
            with torch.no_grad():
                return variant.backward(grad, *inputs)
        bwd = [lambda g=grad, i=inputs: direct(g, i) for inputs, grad in sets]
    else:
        outs = [variant.forward(*inputs) for inputs, _ in sets]
        bwd = [lambda o=out, g=grad, i=inputs: torch.autograd.grad(o, i, g, retain_graph=True)
               for out, (inputs, grad) in zip(outs, sets)]
    both = [lambda g=grad, i=inputs: variant.forward(*i).backward(g) for inputs, grad in sets]
    result = {"fwd": time_ms(fwd, device, **timer)}
    result["bwd"] = time_ms(bwd, device, **timer)
    del bwd  # frees the retained graphs
    result["fwd+bwd"] = time_ms(both, device, grad_to_none=leaves, **timer)
    return result


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn) (default mode, static shapes) with a fresh Dynamo cache, so that the many shapes of
    one run never reach the recompile limit, past which Dynamo silently falls back to eager. Donated buffers
    are turned off: a backward that reuses its saved tensors' memory refuses the retained graph that the
    backward pass is timed over (time_passes), as batch norm's does."""
    torch._dynamo.reset()
    torch._functorch.config.donated_buffer = False
    return torch.compile(fn, dynamic=False)


def eager_and_compiled(eager: Callable) -> dict[str, Variant]:
    """The two baselines of an op benchmark: PyTorch eager (backward through autograd) and torch.compile of it."""
    return {"eager": Variant(eager), "compile": Variant(compiled(eager))}


CHECK_TOL = {torch.float32: 1e-5, torch.float16: 4 * 2 ** -10, torch.bfloat16: 4 * 2 ** -7}


def check_close(name: str, ours: torch.Tensor, ref: torch.Tensor, dtype: Optional[torch.dtype] = None) -> None:
    """dtype: the precision ours was computed from, where it is lower than its storage's (a float32 parameter's
    gradient from bfloat16 activations)."""
    err = (ours.float() - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1.0)
    if not err <= max(CHECK_TOL.get(ours.dtype, 1e-5), CHECK_TOL.get(dtype, 0.0)) * scale:
        raise RuntimeError(f"{name}: max |error| {err:.3g} against fer_kernels.reference (max |ref| {scale:.3g})")


def check_variants(variants: dict[str, Variant], inputs: tuple, grad: torch.Tensor, ref_forward: Callable,
                   ref_backward: Callable) -> None:
    """A coarse guard before timing (the tests check accuracy): every variant's output and gradients, and
    each direct backward op, against fer_kernels.reference in float32. A variant that computes something
    else, or a backend that silently does nothing, must not be timed."""
    inputs32 = [t.detach().float() for t in inputs]
    ref = ref_forward(*inputs32)
    ref_grads = ref_backward(grad.float(), *inputs32)
    ref_grads = ref_grads if isinstance(ref_grads, tuple) else (ref_grads,)
    for name, v in variants.items():
        out = v.forward(*inputs)
        check_close(f"{name} forward", out.detach(), ref)
        backward = [("autograd", torch.autograd.grad(out, inputs, grad))]
        if v.backward is not None:
            with torch.no_grad():
                direct = v.backward(grad, *inputs)
            backward.append(("backward op", direct if isinstance(direct, tuple) else (direct,)))
        for how, grads in backward:
            for i, (g, r) in enumerate(zip(grads, ref_grads)):
                check_close(f"{name} {how} grad {i}", g.reshape(r.shape), r, dtype=inputs[0].dtype)


QUICK_TIMER = dict(min_reps=3, min_seconds=0.02)
TIMING_NOTES = [
    "bytes_moved: the byte floor (each input read once, each output written once), the same for every "
    "variant, so achieved_GBps is effective bandwidth and fraction_of_copy_bandwidth is against the "
    "device-to-device copy measured in this run",
    "fwd: inputs require grad, so it is the forward of a training step (it also saves for backward)",
    "bwd: a fixed grad; variants with a backward op (fused, eager Mish) call it directly under no_grad, the "
    "others run torch.autograd.grad over a graph built once and retained",
    "fwd+bwd: out = f(*inputs); out.backward(grad), .grad cleared before each timed run",
    "compile: torch.compile of the eager baseline, default mode, dynamic=False, Dynamo reset per case",
    "cuda: median of triton.testing.do_bench; cpu: median of time.perf_counter runs after warm-up, "
    f"{CPU_THREADS} threads; input sets rotate so that each run's data is out of the last-level cache",
]


def benchmark_op(what: str, args, shapes: list[tuple], layouts: tuple[str, ...], make_inputs: Callable,
                 make_variants: Callable, ref_forward: Callable, ref_backward: Callable, nbytes: Callable,
                 notes: list[str]) -> Path:
    """Time every variant of one op over dtypes x layouts x shapes (batch prepended) and write the results.

    make_inputs(shape, dtype, layout, device) -> (inputs, grad); make_variants(device_type) -> {name: Variant},
    fused ones named "fused-<backend>"; nbytes(shape, dtype, pass) -> the byte floor."""
    device = setup(args.device)
    batch = QUICK_BATCH if args.quick else BATCH[device.type]
    timer = QUICK_TIMER if args.quick else {}
    results = Results(what, device, args, TIMING_NOTES + notes)
    print(f"{'shape dtype layout pass':<42} | variant median time, fraction of copy bandwidth | speedup of fused")
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for layout in layouts:
            for chw in shapes:
                shape = (batch, *chw)
                n_sets = input_sets(nbytes(shape, dtype, "fwd"), device)
                sets = [make_inputs(shape, dtype, layout, device) for _ in range(n_sets)]
                variants = make_variants(device.type)
                check_variants(variants, *sets[0], ref_forward, ref_backward)
                times = {name: time_passes(v, sets, device, **timer) for name, v in variants.items()}
                for pass_ in PASSES:
                    case = {"shape": "x".join(map(str, shape)), "dtype": dtype_name, "layout": layout, "pass": pass_}
                    row = results.add(case, {name: t[pass_] for name, t in times.items()}, nbytes(shape, dtype, pass_),
                                      input_sets=n_sets)
                    print_row(row, ("shape", "dtype", "layout", "pass"))
                del sets, variants
    return results.finish()


# ---------------------------------------------------------------------------------------------- results

class Results:
    """Rows of one run, rewritten to benchmarks/results/<device>-<what>[-quick].json after every row, so a
    run cut short still leaves what it measured ("complete": false).

    measure_copy: measure the copy bandwidth that byte floors are compared with (False for a benchmark
    without byte floors: "copy_bandwidth_GBps" is then null); path: write there instead; env: more
    entries for the environment record."""

    def __init__(self, what: str, device: torch.device, args, notes: list[str], *, measure_copy: bool = True,
                 path: Optional[Path] = None, env: Optional[dict] = None):
        self.quick = args.quick
        self.env = {**environment(device), **(env or {})}
        self.copy_gbps = copy_bandwidth(device, quick=args.quick) if measure_copy else None
        self.notes = notes
        self.rows: list[dict] = []
        self.path = path or args.results / f"{slug(self.env['device'])}-{what}{'-quick' if args.quick else ''}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.what = what
        threads = f", {self.env['threads']} threads" if device.type == "cpu" else ""
        copy = f"; measured copy bandwidth {self.copy_gbps:.1f} GB/s (read + write)" if measure_copy else ""
        print(f"{what} on {self.env['device']}{threads}: torch {self.env['torch']}, triton {self.env['triton']}, "
              f"CUDA {self.env['cuda']}{copy}")
        print(f"  {'byte accounting and ' if measure_copy else ''}timing method: 'notes' in {self.path.name}")

    def add(self, case: dict, times_ms: dict[str, float], bytes_moved: Optional[int] = None,
            details: Optional[dict[str, dict]] = None, **extra) -> dict:
        """case: shape, dtype, ...; times_ms: {variant: median ms}; bytes_moved: the byte floor of the case;
        details: more figures per variant; extra: more figures for the row."""
        variants = {}
        for name, ms in times_ms.items():
            variants[name] = {"median_ms": ms, **(details or {}).get(name, {})}
            if bytes_moved:
                gbps = bytes_moved / ms / 1e6
                variants[name].update(achieved_GBps=gbps, fraction_of_copy_bandwidth=gbps / self.copy_gbps)
        row = dict(case, bytes_moved=bytes_moved, variants=variants, **extra)
        fused = [n for n in times_ms if n.startswith("fused")]
        row["speedup"] = {f"{f} vs {b}": times_ms[b] / times_ms[f]
                          for f in fused for b in times_ms if not b.startswith("fused")}
        return self.append(row)

    def append(self, row: dict) -> dict:
        """A row as it is (for benchmarks whose figures are not times of variants), written at once."""
        self.rows.append(row)
        self.write(complete=False)
        return row

    def write(self, complete: bool = True) -> Path:
        doc = {"what": self.what, "quick": self.quick, "complete": complete, **self.env,
               "copy_bandwidth_GBps": self.copy_gbps, "notes": self.notes, "rows": self.rows}
        self.path.write_text(json.dumps(doc, indent=1) + "\n")
        return self.path

    def finish(self) -> Path:
        path = self.write(complete=True)
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        return path


def print_row(row: dict, keys: tuple[str, ...]) -> None:
    """One line per row: the case, each variant's time and fraction of copy bandwidth, the speedups."""
    case = " ".join(str(row[k]) for k in keys)
    cells = []
    for name, v in row["variants"].items():
        frac = v.get("fraction_of_copy_bandwidth")
        cells.append(f"{name} {v['median_ms']:.3f}ms" + (f" {frac:4.0%}" if frac is not None else ""))
    ratios = " ".join(f"{k.replace('fused-', '')} x{s:.2f}" for k, s in row["speedup"].items())
    print(f"{case:<42} | {' | '.join(cells)} | {ratios}")


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def memory_line(row: dict) -> str:
    """bench_memory's row: each model's memory and step time, and what fusion saves."""
    parts = []
    for name, v in row["variants"].items():
        peak = v.get("peak_allocated_above_start_bytes")
        parts.append(f"{name}: saved {_mb(v['saved_for_backward_bytes'])}" + (f", peak {_mb(peak)}" if peak else "")
                     + f", step {v['median_ms']:.1f} ms")
    diff = row["unfused_minus_fused"]
    saved = f"fusion saves {_mb(diff['saved_for_backward_bytes'])} of saved tensors"
    if "peak_allocated_above_start_bytes" in diff:
        saved += f", {_mb(diff['peak_allocated_above_start_bytes'])} of peak"
    step = f"step x{row['speedup']['fused vs unfused']:.2f}"
    return f"{row['precision']:<18} batch {row['batch']} {row['image']}px | {' | '.join(parts)} | {saved}; {step}"


def optim_line(row: dict) -> str:
    """bench_optim's row: the floor, each optimizer's step time, the fused step's speedups."""
    times = " | ".join(f"{name} {v['median_ms']:.2f} ms" for name, v in row["variants"].items())
    fused = [n for n in row["variants"] if n.startswith("fused")]
    floor = " ".join(f"{n.replace('fused-', '')} at {row['variants'][n]['median_ms'] / row['floor_ms']:.2f}x floor"
                     for n in fused)
    ratios = " ".join(f"{k.replace('fused-', '')} x{v:.2f}" for k, v in row["speedup"].items())
    return (f"{row['model']:<13} {row['parameters'] / 1e6:.1f}M {row['dtype']} | floor {row['floor_ms']:.2f} ms | "
            f"{times} | {floor} | {ratios}")


def pipeline_line(row: dict) -> str:
    """bench_pipeline's row: a pipeline's images per second on a set (median and range over repeats), and
    its ratio to the torchvision baseline on the same set."""
    case = f"{row['set']:<19} {row['pipeline']:<12}"
    if row.get("skipped"):
        return f"{case} skipped: {row['skipped']}"
    rates = row["repeats_images_per_s"]
    ratio = row.get("vs_torchvision")
    return (f"{case} {row['images_per_s']:8,.0f} images/s ({min(rates):,.0f}-{max(rates):,.0f} over {len(rates)}) "
            f"| {row['source']}, {row['images']} images, batch {row['batch_size']}"
            + (f" | x{ratio:.2f} torchvision" if ratio is not None else ""))


# bench_* documents whose rows are not the per-op passes of benchmark_op, and how summarize prints a row
def train_line(row: dict) -> str:
    return (f"{row['model']:<18} {'fused' if row['fused'] else 'unfused':<8} "
            f"{'compile' if row['compiled'] else 'eager':<8} batch {row['batch']} {row['image_size']}px "
            f"{row['step_ms']:10.1f} ms/step {row['images_per_s']:10.1f} images/s  paper run "
            f"{row['paper_run_hours']:8.1f} h")


ROW_LINES = {"memory": memory_line, "optim": optim_line, "pipeline": pipeline_line, "train": train_line}


def summarize(paths: list[str]) -> None:
    """Per results file and (dtype, layout, pass): the geometric mean (and range) over shapes of each fused
    variant's speedup over each baseline, and the fractions of copy bandwidth the fused variants reached."""
    for path in paths:
        doc = json.loads(Path(path).read_text())
        copy = doc.get("copy_bandwidth_GBps")
        print(f"\n{Path(path).name}: {doc['device']}, torch {doc['torch']}"
              + (f", copy {copy:.0f} GB/s" if copy is not None else "")
              + ("" if doc.get("complete", True) else "  (INCOMPLETE run)"))
        if doc["what"] in ROW_LINES:
            for row in doc["rows"]:
                print(f"  {ROW_LINES[doc['what']](row)}")
            continue
        groups: dict[tuple, list[dict]] = {}
        for row in doc["rows"]:
            groups.setdefault((row["dtype"], row["layout"], row["pass"]), []).append(row)
        for group, rows in groups.items():
            parts = []
            for key in rows[0]["speedup"]:
                values = [r["speedup"][key] for r in rows]
                mean = math.exp(statistics.fmean(map(math.log, values)))
                parts.append(f"{key.replace('fused-', '')} x{mean:.2f} ({min(values):.2f}-{max(values):.2f})")
            for name in rows[0]["variants"]:
                fractions = [r["variants"][name].get("fraction_of_copy_bandwidth", 0) for r in rows]
                if name.startswith("fused"):
                    parts.append(f"{name.replace('fused-', '')} {min(fractions):.0%}-{max(fractions):.0%} of copy")
            print(f"  {' '.join(group):<26} {'; '.join(parts)}  [{len(rows)} shapes]")


def markdown_optim(paths: list[str]) -> None:
    """The README's optimizer table: one row per parameter set, figures as the files hold them."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    docs = [d for d in docs if d["what"] == "optim"]
    if not docs:
        return
    names = list(docs[0]["rows"][0]["variants"])
    print(f"| parameters | device | floor | {' | '.join(names)} | fused at floor x |")
    print("|---" * (len(names) + 4) + "|")
    for doc in docs:
        for row in doc["rows"]:
            fused = next(n for n in names if n.startswith("fused"))
            times = " | ".join(f"{row['variants'][n]['median_ms']:.2f} ms" for n in names)
            print(f"| {row['model']} ({row['parameters'] / 1e6:.1f}M, {row['dtype']}) | {doc['device']}, "
                  f"{doc.get('threads') or 1} threads | {row['floor_ms']:.2f} ms | {times} | "
                  f"{row['variants'][fused]['median_ms'] / row['floor_ms']:.2f} |")


def markdown(paths: list[str], pass_: str = "fwd+bwd") -> None:
    """The README's performance table: one row per case of `pass_`, figures as the files hold them."""
    print(f"| op | device | shape | dtype | layout | {pass_} fused | eager | torch.compile | fused vs eager | "
          "fused vs compile | fused, fraction of copy bandwidth |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        doc = json.loads(Path(path).read_text())
        if doc["what"] in ROW_LINES:
            continue
        for row in (r for r in doc["rows"] if r["pass"] == pass_):
            for name, v in row["variants"].items():
                if not name.startswith("fused"):
                    continue
                base = {b: row["variants"][b]["median_ms"] for b in ("eager", "compile")}
                print(f"| {doc['what']} ({name}) | {doc['device']}, {doc.get('threads') or 1} threads | {row['shape']} | "
                      f"{row['dtype']} | {row['layout']} | {v['median_ms']:.3f} ms | {base['eager']:.3f} ms | "
                      f"{base['compile']:.3f} ms | x{row['speedup'][f'{name} vs eager']:.2f} | "
                      f"x{row['speedup'][f'{name} vs compile']:.2f} | {v['fraction_of_copy_bandwidth']:.0%} |")


def markdown_pipeline(paths: list[str]) -> None:
    """The README's data-pipeline table: one row per (set, pipeline) of each file, figures as it holds them."""
    print("| set | files | device | mode | workers | batch | pipeline | images/s (median) | range | "
          "vs torchvision |")
    print("|---" * 10 + "|")
    for doc in (json.loads(Path(p).read_text()) for p in paths):
        if doc["what"] != "pipeline":
            continue
        device = (f"{doc['device']}, {doc['cpu_cores']} cores" if doc["device"].startswith("CPU")
                  else f"{doc['device']} + {doc['cpu_cores']} CPU cores")
        for row in doc["rows"]:
            cells = [row["set"], row.get("source", ""), device, f"{row['mode']} {row['image_size']}px",
                     str(row["workers"]), str(row["batch_size"]), row["pipeline"]]
            if row.get("skipped"):
                cells += [f"skipped: {row['skipped']}", "", ""]
            else:
                ratio = row.get("vs_torchvision")
                cells += [f"{row['images_per_s']:,.0f}",
                          f"{min(row['repeats_images_per_s']):,.0f}-{max(row['repeats_images_per_s']):,.0f}",
                          f"x{ratio:.2f}" if ratio is not None else ""]
            print(f"| {' | '.join(cells)} |")


def markdown_train(paths: list[str]) -> None:
    """The README's training-throughput table: one row per (model, fused, compiled) of each file."""
    print("| model | device | batch | image | kernels | torch.compile | ms / step | images/s | one paper run |")
    print("|---" * 9 + "|")
    for doc in (json.loads(Path(p).read_text()) for p in paths):
        if doc["what"] != "train":
            continue
        device = doc["device"] + (f", {doc['threads']} threads" if doc["device"].startswith("CPU") else "")
        for row in doc["rows"]:
            hours = row["paper_run_hours"]
            cells = [row["model"], device, str(row["batch"]), f"{row['image_size']}px",
                     "fused" if row["fused"] else "unfused", "yes" if row["compiled"] else "no",
                     f"{row['step_ms']:,.1f}", f"{row['images_per_s']:,.1f}",
                     f"{hours:,.1f} h" if hours < 48 else f"{hours / 24:,.0f} days"]
            print(f"| {' | '.join(cells)} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--markdown"]:
        markdown(sys.argv[2:])
    elif sys.argv[1:2] == ["--markdown-optim"]:
        markdown_optim(sys.argv[2:])
    elif sys.argv[1:2] == ["--markdown-pipeline"]:
        markdown_pipeline(sys.argv[2:])
    elif sys.argv[1:2] == ["--markdown-train"]:
        markdown_train(sys.argv[2:])
    else:
        summarize(sys.argv[1:])
