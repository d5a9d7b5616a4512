"""Memory of one ResNet-50 + Mish + ABP training step (forward, cross-entropy, backward), fused against
unfused: fer_kernels.models.resnet50(fused=True | False), the same model with the same weights.

    python benchmarks/bench_memory.py [--device cpu|cuda] [--quick] [--dtypes float32,bfloat16]

For each model: the bytes of the tensors saved for backward (saved_tensors_hooks; each storage counted once,
however many views of it are saved; parameter storages left out, they exist anyway), the median time of a
step, and the peak memory of the step above what was allocated before it (parameters, buffers, the
batch), i.e. activations, gradients and workspaces: on cuda from torch.cuda.max_memory_allocated, on a
Linux CPU from the rise of the resident set (VmHWM after resetting it, minus VmRSS before) in a fresh
process whose glibc returns every allocation over 128 KiB to the system when it is freed, so that the
resident set follows what is allocated.
cuda: batch 64, float32 and bfloat16 autocast; cpu: batch 8, float32, 2 threads; 224 x 224 images.

Writes benchmarks/results/<device>-memory.json.
"""

import contextlib
import gc
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fer_kernels.models import resnet50

import common

BATCH = {"cuda": 64, "cpu": 8}
IMAGE = 224
QUICK_BATCH, QUICK_IMAGE = 2, 64  # batch 2: the gate's BatchNorm needs two images per channel


def train_step(model, images, labels, autocast_dtype):
    precision = torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with precision:
        loss = F.cross_entropy(model(images), labels)
    loss.backward()


def saved_bytes(step, model) -> int:
    """Bytes of the distinct storages that autograd saves for backward during step()."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        # Saved tensors stay alive until backward, so no address is reused while the forward runs.
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def _status_bytes(field: str) -> int:
    kib = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(kib.group(1)) << 10


def cpu_peak_above_start(step) -> int:
    """Rise of the resident set during step(): the high-water mark is reset first (clear_refs 5, Linux)."""
    gc.collect()
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step()
    return _status_bytes("VmHWM") - before


def setup_step(fused, device, batch, image):
    torch.manual_seed(0)  # the same weights for both models: the same modules draw the same numbers
    model = resnet50(num_classes=8, act="mish", booster="plus", fused=fused).to(device).train()
    images = torch.randn(batch, 3, image, image, device=device)
    labels = torch.randint(0, 8, (batch,), device=device)
    return model, images, labels


def cpu_peak(fused, batch, image, dtype_name) -> int:
    """CPU peak of one step, measured in a fresh process: glibc keeps freed memory for reuse (which hides
    a peak from the resident set) unless its mmap threshold is fixed before the process starts, and the
    timings of this process should see the allocator as training does."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 << 10))
    child = subprocess.run([sys.executable, __file__, CHILD, "fused" if fused else "unfused", str(batch), str(image),
                            dtype_name], env=env, capture_output=True, text=True, check=True)
    return int(child.stdout.split()[-1])


CHILD = "--cpu-peak-child"


def _cpu_peak_child(fused, batch, image, dtype_name):
    common.setup("cpu")
    autocast_dtype = None if dtype_name == "float32" else common.DTYPES[dtype_name]
    model, images, labels = setup_step(fused == "fused", torch.device("cpu"), batch, image)
    train_step(model, images, labels, autocast_dtype)  # warm-up: lazy imports and first calls are not counted
    model.zero_grad(set_to_none=True)
    print(cpu_peak_above_start(lambda: train_step(model, images, labels, autocast_dtype)))


def measure(fused, device, batch, image, autocast_dtype, timer) -> dict:
    model, images, labels = setup_step(fused, device, batch, image)
    params = list(model.parameters())

    def step():
        model.zero_grad(set_to_none=True)
        train_step(model, images, labels, autocast_dtype)

    step()  # warm-up: on cuda the fused ops time their backends on the first input of each size
    result = {"saved_for_backward_bytes": saved_bytes(step, model)}
    if device.type == "cuda":
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        train_step(model, images, labels, autocast_dtype)
        torch.cuda.synchronize()
        result["peak_allocated_above_start_bytes"] = torch.cuda.max_memory_allocated(device) - before
    result["median_ms"] = common.time_ms([lambda: train_step(model, images, labels, autocast_dtype)], device,
                                         grad_to_none=params, **timer)
    del model, images, labels, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    device = common.setup(args.device)
    batch, image = (QUICK_BATCH, QUICK_IMAGE) if args.quick else (BATCH[device.type], IMAGE)
    timer = common.QUICK_TIMER if args.quick else dict(min_reps=3, min_seconds=1.0)
    results = common.Results("memory", device, args, notes=[
        "saved_for_backward_bytes: distinct storages packed by torch.autograd.graph.saved_tensors_hooks during one "
        "step, parameters left out",
        "peak_allocated_above_start_bytes: cuda: torch.cuda.max_memory_allocated during one step (grads set to "
        "None first) minus torch.cuda.memory_allocated before it; cpu: in a fresh process after a warm-up step, "
        "VmHWM during the step (reset before it through /proc/self/clear_refs) minus VmRSS before it, with "
        "MALLOC_MMAP_THRESHOLD_=131072 so that freed allocations leave the resident set",
        "median_ms: one step (forward, cross-entropy, backward), grads set to None before each; cuda: "
        "triton.testing.do_bench, cpu: time.perf_counter, 2 threads"])
    for dtype_name in args.dtypes:
        autocast_dtype = None if dtype_name == "float32" else common.DTYPES[dtype_name]
        precision = dtype_name if autocast_dtype is None else f"{dtype_name} autocast"
        runs = {name: measure(name == "fused", device, batch, image, autocast_dtype, timer)
                for name in ("fused", "unfused")}
        if device.type == "cpu" and Path("/proc/self/clear_refs").exists():  # Linux
            for name, run in runs.items():
                run["peak_allocated_above_start_bytes"] = cpu_peak(name == "fused", batch, image, dtype_name)
        case = {"precision": precision, "batch": batch, "image": image}
        times = {name: r.pop("median_ms") for name, r in runs.items()}
        difference = {key: runs["unfused"][key] - runs["fused"][key] for key in runs["fused"]}
        row = results.add(case, times, details=runs, unfused_minus_fused=difference)
        print(common.memory_line(row))
    results.finish()


if __name__ == "__main__":
    if sys.argv[1:2] == [CHILD]:
        _cpu_peak_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
