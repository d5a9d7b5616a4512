"""The convolution weight gradient on small maps (fer_kernels.nn.Conv2d) against oneDNN's, per layer and per step.

layers: every distinct 3x3 / 1x1 convolution of ResNet-18 + ABP at 48 px (batch 32) and 224 px (batch 8),
channels_last float32: the forward, oneDNN's input gradient, oneDNN's weight gradient and the unfolded
weight gradient (im2col + one matrix product), median ms. Which of the two weight gradients the model
uses is decided by fer_kernels.nn.conv.SMALL_MAP (output positions); the rows show where that limit
sits. step: one training step (forward, cross-entropy, backward, fused Ranger) of the whole model with
the unfolded weight gradient on small maps and with oneDNN's everywhere, the two taking turns step by step.

    python benchmarks/bench_conv.py [--quick] [--steps 20]

Writes benchmarks/results/<device>-conv.json. CPU only: on a GPU, cuDNN serves every convolution.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import fer_kernels.nn.conv as conv
from fer_kernels.models import resnet18
from fer_kernels.optim import Ranger

import common

ROWS = [(32, 48), (8, 224)]  # (batch, image size)


def _arguments(p):
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant in the step part")


def layer_shapes(batch: int, size: int) -> list[dict]:
    """The distinct convolutions the model runs at this input size, found by running it once."""
    model = resnet18(num_classes=8)
    seen = {}

    def record(module, inputs, output):
        x = inputs[0]
        key = (tuple(x.shape[1:]), module.out_channels, module.kernel_size, module.stride, module.padding)
        seen.setdefault(key, {"in": [batch, *x.shape[1:]], "out_channels": module.out_channels,
                              "kernel": list(module.kernel_size), "stride": list(module.stride),
                              "padding": list(module.padding), "out_map": list(output.shape[-2:]), "count": 0})
        seen[key]["count"] += 1

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return list(seen.values())


def time_layer(shape: dict, device) -> dict:
    fmt = torch.channels_last
    x = torch.randn(shape["in"], device=device).contiguous(memory_format=fmt)
    w = torch.randn(shape["out_channels"], x.shape[1], *shape["kernel"], device=device).contiguous(memory_format=fmt)
    stride, padding = tuple(shape["stride"]), tuple(shape["padding"])
    grad = F.conv2d(x, w, None, stride, padding).contiguous(memory_format=fmt)

    def onednn(mask):
        return lambda: torch.ops.aten.convolution_backward(grad, x, w, None, stride, padding, (1, 1), False, (0, 0),
                                                           1, mask)

    times = {"forward": [lambda: F.conv2d(x, w, None, stride, padding)],
             "input_grad_onednn": [onednn((True, False, False))],
             "weight_grad_onednn": [onednn((False, True, False))],
             "weight_grad_unfolded": [lambda: conv.conv2d_weight_grad(grad, x, w.shape, stride, padding)]}
    return {name: common.time_ms(calls, device, min_reps=10, min_seconds=0.2) for name, calls in times.items()}


def step_times(batch: int, size: int, steps: int, device) -> dict:
    torch.manual_seed(0)
    model = resnet18(num_classes=8).to(memory_format=torch.channels_last)
    optimizer = Ranger(model.parameters(), lr=3e-3)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 8, (batch,))

    def step():
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    limits = {"unfolded": conv.SMALL_MAP, "onednn": 0}
    times = {name: [] for name in limits}
    for _ in range(2):  # warm-up, both ways
        for limit in limits.values():
            conv.SMALL_MAP = limit
            step()
    for _ in range(steps):  # taking turns, so that a slow stretch of the machine hits both
        for name, limit in limits.items():
            conv.SMALL_MAP = limit
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    conv.SMALL_MAP = limits["unfolded"]
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main():
    args = common.parse_args(__doc__.splitlines()[0], _arguments, dtypes=False)
    if args.device != "cpu":
        raise SystemExit("bench_conv.py: the unfolded weight gradient is a CPU path; run with --device cpu")
    device = common.setup("cpu")
    steps = 3 if args.quick else args.steps
    rows = ROWS[:1] if args.quick else ROWS
    results = common.Results("conv", device, args, measure_copy=False, notes=[
        "layers: channels_last float32, median ms of each pass; used = which weight gradient the model takes "
        f"(unfolded where the output map has at most as many positions as output channels, and at most "
        f"SMALL_MAP = {conv.SMALL_MAP})",
        f"step: ResNet-18 + Mish + ABP, forward, cross-entropy, backward, fused Ranger; median of {steps} steps "
        "per variant, the variants taking turns"])
    for batch, size in rows:
        for shape in layer_shapes(batch, size):
            times = time_layer(shape, device)
            positions = shape["out_map"][0] * shape["out_map"][1]
            row = {"part": "layer", "batch": batch, "image_size": size, **shape, "times_ms": times,
                   "used": "unfolded" if conv.unfolds_weight_grad(positions, shape["out_channels"]) else "onednn",
                   "weight_grad_speedup": times["weight_grad_onednn"] / times["weight_grad_unfolded"]}
            results.append(row)
            print(f"{size:>3} px b{batch:<3} {shape['in'][1]:>4} -> {shape['out_channels']:<4} k{shape['kernel'][0]} "
                  f"s{shape['stride'][0]} map {shape['out_map'][0]}x{shape['out_map'][1]} x{shape['count']}: "
                  + " ".join(f"{k} {v:.2f}" for k, v in times.items())
                  + f"  speedup x{row['weight_grad_speedup']:.2f} ({row['used']})", flush=True)
        times = step_times(batch, size, steps, device)
        row = {"part": "step", "batch": batch, "image_size": size, "step_ms": times,
               "images_per_s": {k: batch / v * 1e3 for k, v in times.items()},
               "speedup": times["onednn"] / times["unfolded"]}
        results.append(row)
        print(f"{size:>3} px b{batch:<3} step: unfolded {times['unfolded']:.1f} ms, oneDNN {times['onednn']:.1f} ms "
              f"(x{row['speedup']:.2f})", flush=True)
    results.finish()


if __name__ == "__main__":
    main()
