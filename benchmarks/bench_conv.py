"""Convolutions on small maps (fer_kernels.nn.Conv2d) against oneDNN's, per layer and per step.

layers: every distinct 3x3 / 1x1 convolution of ResNet-18 + ABP at 48 px (batch 32) and 224 px (batch 8),
channels_last, in --dtype (float32, or bfloat16 as CPU autocast computes a convolution): oneDNN's forward,
input gradient and weight gradient, the unfolded weight gradient (im2col + one matrix product) and, on output
maps of at most 9 positions, the products by kernel tap (forward; both gradients in one pass), median ms.
`used` is what the model takes there (fer_kernels.nn.conv.by_taps and unfolds_weight_grad, with the limits of
the dtype), so the rows show where the limits sit.
step: one training step (forward, cross-entropy, backward, fused Ranger; bfloat16: under CPU autocast) of the
whole model as it is ("default"), without the products by taps ("unfolded") and with oneDNN everywhere
("onednn"), the three taking turns step by step.

    python benchmarks/bench_conv.py [--quick] [--steps 20] [--dtype float32|bfloat16]

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
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the dtype the convolutions compute in (bfloat16: the step under CPU autocast)")


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


def time_layer(shape: dict, dtype: torch.dtype, device) -> dict:
    fmt = torch.channels_last
    x = torch.randn(shape["in"], device=device, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(shape["out_channels"], x.shape[1], *shape["kernel"], device=device,
                    dtype=dtype).contiguous(memory_format=fmt)
    stride, padding = tuple(shape["stride"]), tuple(shape["padding"])
    grad = F.conv2d(x, w, None, stride, padding).contiguous(memory_format=fmt)

    def onednn(mask):
        return lambda: torch.ops.aten.convolution_backward(grad, x, w, None, stride, padding, (1, 1), False, (0, 0),
                                                           1, mask)

    times = {"forward": [lambda: F.conv2d(x, w, None, stride, padding)],
             "input_grad_onednn": [onednn((True, False, False))],
             "weight_grad_onednn": [onednn((False, True, False))],
             "weight_grad_unfolded": [lambda: conv.conv2d_weight_grad(grad, x, w.shape, stride, padding)]}
    if shape["out_map"][0] * shape["out_map"][1] <= 9:
        times["forward_taps"] = [lambda: conv.conv2d_by_taps(x, w, None, stride, padding)]
        times["both_grads_taps"] = [lambda: conv.conv2d_by_taps_backward(grad, x, w, stride, padding, True, True)]
    return {name: common.time_ms(calls, device, min_reps=10, min_seconds=0.2) for name, calls in times.items()}


def step_times(batch: int, size: int, steps: int, dtype: torch.dtype, device) -> dict:
    torch.manual_seed(0)
    model = resnet18(num_classes=8).to(memory_format=torch.channels_last)
    optimizer = Ranger(model.parameters(), lr=3e-3)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 8, (batch,))

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # name -> (SMALL_MAP, TAP_MAP, BF16_TAP_MAP)
    limits = {"default": (conv.SMALL_MAP, conv.TAP_MAP, conv.BF16_TAP_MAP), "unfolded": (conv.SMALL_MAP, 0, 0),
              "onednn": (0, 0, 0)}
    times = {name: [] for name in limits}
    for _ in range(2):  # warm-up, every way
        for conv.SMALL_MAP, conv.TAP_MAP, conv.BF16_TAP_MAP in limits.values():
            step()
    for _ in range(steps):  # taking turns, so that a slow stretch of the machine hits all
        for name, (conv.SMALL_MAP, conv.TAP_MAP, conv.BF16_TAP_MAP) in limits.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    conv.SMALL_MAP, conv.TAP_MAP, conv.BF16_TAP_MAP = limits["default"]
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main():
    args = common.parse_args(__doc__.splitlines()[0], _arguments, dtypes=False)
    if args.device != "cpu":
        raise SystemExit("bench_conv.py: the unfolded weight gradient is a CPU path; run with --device cpu")
    device = common.setup("cpu")
    steps = 3 if args.quick else args.steps
    rows = ROWS[:1] if args.quick else ROWS
    dtype = getattr(torch, args.dtype)
    bfloat16 = dtype == torch.bfloat16
    limits = (f"at most BF16_SMALL_MAP = {conv.BF16_SMALL_MAP}; of those, everything by taps where the output map "
              f"has at most BF16_TAP_MAP = {conv.BF16_TAP_MAP} positions" if bfloat16 else
              f"at most SMALL_MAP = {conv.SMALL_MAP}; of those, everything by taps where the output map has at most "
              f"TAP_MAP = {conv.TAP_MAP} positions and the kernel is larger than 1 x 1")
    results = common.Results("conv", device, args, measure_copy=False, env={"dtype": args.dtype}, notes=[
        f"layers: channels_last {args.dtype}, median ms of each pass; used = what the model takes: unfolded "
        f"weight gradient where the output map has at most as many positions as output channels, and {limits}; "
        "taps_speedup: forward + input gradient + unfolded weight gradient against forward + both gradients by "
        "taps",
        f"step: ResNet-18 + Mish + ABP, forward{' under bfloat16 autocast' if bfloat16 else ''}, cross-entropy, "
        f"backward, fused Ranger; median of {steps} steps per variant, the variants taking turns"])
    for batch, size in rows:
        for shape in layer_shapes(batch, size):
            times = time_layer(shape, dtype, device)
            positions = shape["out_map"][0] * shape["out_map"][1]
            unfolded = conv.unfolds_weight_grad(positions, shape["out_channels"], bfloat16)
            taps = unfolded and conv.by_taps(positions, shape["kernel"][0] * shape["kernel"][1], bfloat16)
            row = {"part": "layer", "batch": batch, "image_size": size, **shape, "times_ms": times,
                   "used": "taps" if taps else "unfolded" if unfolded else "onednn",
                   "weight_grad_speedup": times["weight_grad_onednn"] / times["weight_grad_unfolded"]}
            if "forward_taps" in times:
                onednn_total = times["forward"] + times["input_grad_onednn"] + times["weight_grad_unfolded"]
                row["taps_speedup"] = onednn_total / (times["forward_taps"] + times["both_grads_taps"])
            results.append(row)
            print(f"{size:>3} px b{batch:<3} {shape['in'][1]:>4} -> {shape['out_channels']:<4} k{shape['kernel'][0]} "
                  f"s{shape['stride'][0]} map {shape['out_map'][0]}x{shape['out_map'][1]} x{shape['count']}: "
                  + " ".join(f"{k} {v:.2f}" for k, v in times.items())
                  + f"  weight grad x{row['weight_grad_speedup']:.2f}"
                  + (f", by taps x{row['taps_speedup']:.2f}" if "taps_speedup" in row else "")
                  + f" ({row['used']})", flush=True)
        times = step_times(batch, size, steps, dtype, device)
        row = {"part": "step", "batch": batch, "image_size": size, "step_ms": times,
               "images_per_s": {k: batch / v * 1e3 for k, v in times.items()},
               "speedup": {"default vs onednn": times["onednn"] / times["default"],
                           "default vs unfolded": times["unfolded"] / times["default"]}}
        results.append(row)
        print(f"{size:>3} px b{batch:<3} step: default {times['default']:.1f} ms, unfolded {times['unfolded']:.1f} ms, "
              f"oneDNN {times['onednn']:.1f} ms", flush=True)
    results.finish()


if __name__ == "__main__":
    main()
