"""Training throughput of the paper's models: one optimizer step of the engine's recipe (FMix of the batch,
forward under autocast, the class-weighted FMix loss, backward, the fused Ranger + GC step), on batches
already on the device (the data pipeline has its own benchmark, bench_pipeline.py).

    python benchmarks/bench_train.py [--device cpu|cuda] [--quick] [--models resnet18,resnet50]
                                     [--compile both|yes|no] [--batch N] [--image-size 224]

Models: ResNet-18 / ResNet-50 with Mish + ABP, fused (fer_kernels' kernels) and unfused (the same model in
plain PyTorch ops), each eager and with torch.compile. cuda: batch 256, bf16 autocast, channels_last;
cpu: batch 8, float32, 2 threads. Reports images/s and the time one paper run (60,000 steps of 256)
would take at that rate. Writes benchmarks/results/<device>-train.json.
"""

from __future__ import annotations

import torch

from fer_train.config import ModelConfig, OptimConfig
from fer_train.factories import build_model, build_optimizer
from fer_train.recipe.fmix import FMix, fmix_loss

import common

PAPER_IMAGES = 60_000 * 256


def _arguments(p):
    p.add_argument("--models", type=lambda s: s.split(","), default=["resnet18", "resnet50"])
    p.add_argument("--compile", choices=("both", "yes", "no"), default="both")
    p.add_argument("--batch", type=int, default=None, help="default: 256 on cuda, 8 on cpu")
    p.add_argument("--image-size", type=int, default=224)


def make_step(arch: str, fused: bool, compiled: bool, batch: int, size: int, device: torch.device):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, act="mish", booster="plus", fused=fused), pretrained=False)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, OptimConfig())
    net = torch.compile(model) if compiled else model
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 8, (batch,), device=device)
    weights = torch.rand(8, device=device)
    fmix = FMix()
    generator = torch.Generator(device=device).manual_seed(0)
    amp = torch.bfloat16 if device.type == "cuda" else None

    def step():
        mixed, y, y_perm, lam = fmix(images, labels, generator=generator)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = fmix_loss(net(mixed), y, y_perm, lam, weights)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main():
    args = common.parse_args(__doc__.split("\n")[0], _arguments, dtypes=False)
    device = common.setup(args.device)
    batch = args.batch or (2 if args.quick else 256 if device.type == "cuda" else 8)
    size = 64 if args.quick else args.image_size
    compile_modes = {"both": (False, True), "yes": (True,), "no": (False,)}[args.compile]
    notes = [f"one optimizer step of the engine's recipe on a batch of {batch} at {size} x {size}, channels_last, "
             f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}; median of timed steps after warm-up "
             "steps (which include compilation)", "paper_run_hours = 60,000 x 256 images / images_per_s"]
    results = common.Results("train", device, args, notes, measure_copy=False)
    for arch in args.models:
        for compiled in compile_modes:
            for fused in (True, False):
                step = make_step(arch, fused, compiled, batch, size, device)
                ms = common.time_ms([step], device, min_reps=3 if device.type == "cpu" else 5, min_seconds=0.0
                                    if device.type == "cpu" else 1.0)
                ips = batch / ms * 1e3
                row = {"model": f"{arch}+mish+abp", "fused": fused, "compiled": compiled, "batch": batch,
                       "image_size": size, "step_ms": ms, "images_per_s": ips,
                       "paper_run_hours": PAPER_IMAGES / ips / 3600}
                results.append(row)
                print(common.train_line(row), flush=True)
                del step
    results.finish()


if __name__ == "__main__":
    main()
