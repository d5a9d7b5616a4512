"""The optimizer step: fused Ranger (each backend of the device) against RAdam(foreach) + GC + Lookahead
composed from torch.optim, a per-parameter Python Ranger as the public implementations write it, and
torch.optim.Adam(foreach / fused) as the speed a fused step can reach; on the parameter sets of
ResNet-18 and ResNet-50, with and without Accuracy Booster Plus (fer_kernels.models).

    python benchmarks/bench_optim.py [--device cpu|cuda] [--quick] [--dtypes float32,bfloat16]

A step's time is the mean over a whole Lookahead cycle (k = 6 steps, one of which syncs), median over
cycles; the variants take turns cycle by cycle. Bytes: the floor of a step, per parameter: read p, g, m, v and write p, m, v, plus one more read of
a centralized gradient (for its row mean) and, once per cycle, the slow copy read and written.
"Dispatches" counts the ATen operations one step runs (through a TorchDispatchMode; the fused step's own
kernel is one call outside the dispatcher, plus its table uploads on cuda) and, on cuda, the kernels it
launches (torch.profiler).

Writes benchmarks/results/<device>-optim.json.
"""

import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fer_kernels.models import resnet18, resnet50
from fer_kernels.optim import Ranger

import common
from optim_baselines import PerParameterRanger, composed

K = 6
MODELS = {"resnet18": resnet18, "resnet50": resnet50}
FUSED_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def parameters(model_name, booster, device, dtype, seed=0):
    torch.manual_seed(seed)
    model = MODELS[model_name](num_classes=8, booster=booster).to(device, dtype)
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def byte_floor(params) -> float:
    """Bytes per step averaged over a Lookahead cycle (the byte floor): 28 B per float32 parameter, + 4 B for a
    centralized gradient, + 8 B / k for the slow copy."""
    total = 0.0
    for p in params:
        e, s = p.element_size(), 4 if p.dtype != torch.float64 else 8  # state is float32 (float64 for float64)
        total += p.numel() * (3 * e + 4 * s + (e if p.dim() > 1 else 0) + 2 * s / K)
    return total


def variants(device_type, params_of):
    """name -> step function over its own copy of the parameters."""
    out = {}
    for backend in FUSED_BACKENDS[device_type]:
        opt = Ranger(params_of(), k=K, backend=backend)
        out[f"fused-{backend}"] = opt.step
    out["composed"] = composed(params_of(), k=K)
    out["per-parameter"] = PerParameterRanger(params_of(), k=K).step
    out["adam-foreach"] = torch.optim.Adam(params_of(), foreach=True).step
    try:
        out["adam-fused"] = torch.optim.Adam(params_of(), fused=True).step
    except (RuntimeError, ValueError) as err:  # no fused Adam for this device or dtype in this torch
        print(f"  (no adam-fused: {err})")
    return out


def time_steps(steps: dict, device, cycles) -> dict:
    """Median over `cycles` Lookahead cycles of the mean ms per step, for each step function. The variants
    take turns cycle by cycle, so that a slow spell of a shared machine hits them all alike."""
    for step in steps.values():
        for _ in range(K):
            step()  # warm-up: state, plans, Triton compilation
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in steps}
    for _ in range(cycles):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            for _ in range(K):
                step()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3 / K)
    return {name: statistics.median(t) for name, t in times.items()}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def dispatches(step, device) -> dict:
    counter = _Count()
    with counter:
        step()
    found = {"aten_ops_per_step": counter.ops}
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        found["cuda_kernels_per_step"] = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
    return found


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    device = common.setup(args.device)
    cycles = 2 if args.quick else 10
    sets = [("resnet18", None), ("resnet18", "plus")] + ([] if args.quick else [("resnet50", None), ("resnet50", "plus")])
    results = common.Results("optim", device, args, notes=[
        f"median over {cycles} Lookahead cycles (k = {K}) of the mean time per step, the variants taking turns "
        "cycle by cycle; grads fixed random",
        "bytes_moved: per step, averaged over a cycle: read p, g, m, v, write p, m, v; one more read of each "
        "centralized gradient; the slow copy read and written once per cycle (state float32)",
        "composed: torch.optim.RAdam(foreach=True) + GC in Python + fer_kernels.optim.Lookahead (foreach); "
        "per-parameter: a Python loop as the public Ranger implementations (benchmarks/optim_baselines.py)",
        "adam-*: torch.optim.Adam, the speed of a step with no GC and no Lookahead",
        "aten_ops_per_step: ATen operations dispatched in one step (the fused kernel itself is one call outside "
        "the dispatcher); cuda_kernels_per_step: kernels launched in one step (torch.profiler)"])
    for dtype_name in args.dtypes:
        dtype = common.DTYPES[dtype_name]
        for model_name, booster in sets:
            probe = parameters(model_name, booster, device, dtype)
            count, nbytes = sum(p.numel() for p in probe), byte_floor(probe)
            del probe
            steps = variants(device.type, lambda: parameters(model_name, booster, device, dtype))
            times = time_steps(steps, device, cycles)
            details = {name: dispatches(step, device) for name, step in steps.items()}
            case = {"model": f"{model_name}{'+abp' if booster else ''}", "parameters": count, "dtype": dtype_name,
                    "floor_ms": nbytes / (results.copy_gbps * 1e6)}
            row = results.add(case, times, int(nbytes), details=details)
            cells = " | ".join(f"{n} {t:.2f}ms ({details[n]['aten_ops_per_step']} ops)" for n, t in times.items())
            print(f"{case['model']:<14} {count / 1e6:5.1f}M {dtype_name} floor {case['floor_ms']:.2f}ms | {cells}")
            print("    " + " ".join(f"{k.replace('fused-', '')} x{v:.2f}" for k, v in row["speedup"].items()))
            del steps
    results.finish()


if __name__ == "__main__":
    main()
