"""Training throughput, in two parts.

step: one optimizer step of the engine's recipe (FMix of the batch, forward under autocast, the
class-weighted FMix loss, backward, the fused Ranger + GC step) on batches already on the device. Models:
ResNet-18 / ResNet-50 with Mish + ABP, fused (fer_kernels' kernels) and unfused (the same model in plain
PyTorch ops), each eager and with torch.compile. cuda: batch 256, bf16 autocast, channels_last; cpu: batch
8, float32, 2 threads. Reports images/s and the time one paper run (60,000 steps of 256) would take.
Writes benchmarks/results/<device>-train.json.

engine: the whole engine (`python -m fer_train train`: data pipeline, FMix, forward, loss, backward, fused
Ranger, bookkeeping), one setting of SETTINGS at a time, side by side in one run, each in a fresh process
(the allocator and thread settings are per process), ResNet-18 + Mish + ABP at batch 32 / 48 px (the size
CPU users train at) and batch 8 / 224 px. The rate is the median of the engine's own per-window images/s
in metrics.jsonl after the first window (warm-up). "before" is what the engine did before these settings
existed (float32, freed memory returned to the kernel). The data: FERPlus's training set by path (--ferplus;
its other splits are left out, so no run evaluates), else a FERPlus-layout folder of drawn faces written to a
temporary folder. Writes <device>-engine.json.

load (not in the default parts): the default engine (a fixed thread count) and train.threads=adaptive while
another process keeps part of one core busy (none, half of the time, all of it), taking turns for --rounds
rounds; writes <device>-engine-load.json.

against (not in the default parts): the default engine of this tree and of a checkout of another commit
(--against, its extension built in place), taking turns for --rounds rounds; writes
<device>-engine-against.json with the ratio of the two.

    python benchmarks/bench_train.py [--device cpu|cuda] [--quick] [--parts step,engine]
        step:   [--models resnet18,resnet50] [--compile both|yes|no] [--batch N] [--image-size 224]
        engine: [--ferplus DIR] [--steps 120] [--settings NAME,...] [--sizes 48,224]
        load:   [--rounds 3] [--ferplus DIR] [--steps 120] [--sizes 48,224]
        against: --against CHECKOUT [--rounds 3] [--ferplus DIR] [--steps 120] [--sizes 48,224]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fer_train.config import ModelConfig, OptimConfig
from fer_train.factories import build_model, build_optimizer
from fer_train.recipe.fmix import FMix, fmix_loss

import common

PAPER_IMAGES = 60_000 * 256
ROOT = Path(__file__).resolve().parents[1]
# name -> (what it changes, settings on top of the row's)
SETTINGS = {
    "before": ("float32, freed memory returned (the engine's old default)",
               ["train.amp=none", "train.keep_freed_memory=false"]),
    "freed-memory-kept": ("float32, glibc keeps freed memory", ["train.amp=none", "train.keep_freed_memory=true"]),
    "bf16": ("bf16 autocast, freed memory kept", ["train.amp=bf16", "train.keep_freed_memory=true"]),
    "default": ("the engine's default (train.amp=auto: bf16 where the CPU has it natively)", []),
    "nchw": ("the default with NCHW instead of channels_last", ["train.channels_last=false"]),
    "compile": ("the default with torch.compile of the model", ["train.compile=true"]),
    "no-fmix": ("the default without FMix (as the ferplus-cpu-1h preset trains)", ["data.fmix=false"]),
    "autocast-weights": ("the default with autocast rounding the float32 weights at every step instead of "
                         "bfloat16 weight copies written by the optimizer (train.bf16_weights=false)",
                         ["train.bf16_weights=false"]),
    # the data pipeline: by default the PyTorch one in the main process on a CPU, DALI's with 2 workers on a GPU
    "torch-pipeline": ("the PyTorch pipeline in the main process (the CPU default)",
                       ["data.backend=torch", "data.workers=0"]),
    "dali": ("DALI's pipeline with 2 workers (on a CPU its CPU graph; the GPU default)",
             ["data.backend=dali", "data.workers=2"]),
    "1-worker": ("the default with 1 data worker", ["data.workers=1"]),
    "2-workers": ("the default with 2 data workers", ["data.workers=2"]),
    "1-thread": ("the default with 1 intra-op thread (OMP_NUM_THREADS=1)", []),
    "adaptive-threads": ("the default with the intra-op thread count chosen by timed steps (train.threads=adaptive)",
                         ["train.threads=adaptive"]),
    "onednn-weight-grad": ("the default with oneDNN's weight gradient on small maps too (FER_KERNELS_SMALL_MAP=0)",
                           []),
    "cifar-stem": ("the default with the CIFAR stem (3x3/1, no pool: 16x the stages' work)", ["model.stem=cifar"]),
}
# settings made by the environment rather than the config
SETTING_ENV = {"1-thread": {"OMP_NUM_THREADS": "1"}, "onednn-weight-grad": {"FER_KERNELS_SMALL_MAP": "0"}}
ENGINE_ROWS = [(32, 48), (8, 224)]  # (batch, image size)
# the load part: the share of one core that another process keeps busy (in periods of 10 ms)
LOADS = {"quiet": 0.0, "half-a-core": 0.5, "one-core": 1.0}


def _arguments(p):
    p.add_argument("--parts", type=lambda s: s.split(","), default=["step", "engine"])
    p.add_argument("--models", type=lambda s: s.split(","), default=["resnet18", "resnet50"])
    p.add_argument("--compile", choices=("both", "yes", "no"), default="both")
    p.add_argument("--batch", type=int, default=None, help="default: 256 on cuda, 8 on cpu")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--ferplus", type=Path, help="engine part: a FERPlus folder (FER2013Train/ at least)")
    p.add_argument("--steps", type=int, default=120, help="engine part: steps per setting (the first window warms up)")
    p.add_argument("--settings", type=lambda s: s.split(","), default=list(SETTINGS))
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[size for _, size in ENGINE_ROWS])
    p.add_argument("--against", type=Path, metavar="CHECKOUT",
                   help="against part: a checkout of another commit, its extension built in place")
    p.add_argument("--rounds", type=int, default=3, help="against part: runs of each side, taking turns")


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


def drawn_ferplus(folder: Path, images: int = 2048) -> Path:
    """A FERPlus-layout training folder of drawn 48 x 48 grey faces with one-sided votes."""
    from torchvision.io import encode_png

    from fer_train.data.readers.synthetic import draw_face, sample_seed

    train = folder / "FER2013Train"
    train.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(images):
        face = draw_face(i % 8, torch.Generator().manual_seed(sample_seed(0, "bench", i)), 48)
        grey = (0.299 * face[0] + 0.587 * face[1] + 0.114 * face[2]).round().to(torch.uint8)[None]
        (train / f"{i:05d}.png").write_bytes(encode_png(grey).numpy().tobytes())
        votes = [0] * 10
        votes[i % 8] = 10
        lines.append(f'{i:05d}.png,"(0, 0, 48, 48)",' + ",".join(map(str, votes)))
    (train / "label.csv").write_text("\n".join(lines) + "\n")
    return folder


def run_setting(name: str, batch: int, size: int, steps: int, data: Path, out: Path, device: str,
                checkout: Path = ROOT) -> dict:
    """One `python -m fer_train train` of `steps` steps with setting `name`, run from `checkout` (another
    commit's tree for the against part: only settings every version knows are passed there)."""
    extra = SETTINGS[name][1] if checkout == ROOT else []
    log_every = max(steps // 6, 5)
    command = [sys.executable, "-m", "fer_train", "train", "--ferplus", str(data), "--steps", str(steps),
               "--batch-size", str(batch), "--image-size", str(size), "--device", device, "--out", str(out),
               "--overwrite", "--set", f"train.log_every={log_every}", "--set", f"train.eval_every={10 * steps}",
               "--set", f"train.checkpoint_every={10 * steps}", "--set", "data.class_weights=none",
               *(["--set", "train.tta_report=false"] if checkout == ROOT else []), *[f"--set={s}" for s in extra]]
    env = {**os.environ, "OMP_NUM_THREADS": str(common.CPU_THREADS), **SETTING_ENV.get(name, {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=checkout, capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{name} ({checkout}): the run failed:\n{result.stderr[-3000:]}")
    rates = [r["images_per_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "images_per_s" in r]
    kept = rates[1:] or rates
    return {"setting": name, "what": SETTINGS[name][0], "batch": batch, "image_size": size, "steps": steps,
            "images_per_s": statistics.median(kept), "images_per_s_windows": rates,
            "describe": next((line for line in result.stdout.splitlines() if line.startswith("model ")), "")}


def step_part(args, device):
    batch = args.batch or (2 if args.quick else 256 if device.type == "cuda" else 8)
    size = 64 if args.quick else args.image_size
    compile_modes = {"both": (False, True), "yes": (True,), "no": (False,)}[args.compile]
    notes = [f"one optimizer step of the engine's recipe on a batch of {batch} at {size} x {size}, channels_last, "
             f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}; median of timed steps after warm-up "
             "steps (which include compilation)", "paper_run_hours = 60,000 x 256 images / images_per_s"]
    results = common.Results("train", device, args, notes, measure_copy=False)
    # every eager row before the compiled ones: compiling a model takes a minute or more, and a run stopped by
    # its time limit should still have measured the eager steps of every model
    for compiled in compile_modes:
        for arch in args.models:
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



def engine_data(args, scratch: Path, results) -> Path:
    """The FERPlus folder the engine runs train on, named in results: --ferplus's FER2013Train alone, linked under
    scratch (with FER2013Valid there every run would end by evaluating it, minutes at 224 px, which is not what
    is timed), else drawn faces under scratch."""
    results.env["data"] = "FERPlus FER2013Train" if args.ferplus else "drawn faces in the FERPlus layout"
    if not args.ferplus:
        return drawn_ferplus(scratch / "ferplus", 256 if args.quick else 2048)
    train = args.ferplus.resolve() / "FER2013Train"
    if not train.is_dir():
        raise SystemExit(f"bench_train.py: --ferplus {args.ferplus} has no FER2013Train folder")
    folder = scratch / "ferplus-train"
    folder.mkdir()
    (folder / "FER2013Train").symlink_to(train, target_is_directory=True)
    return folder


def engine_rows(args) -> list[tuple[int, int]]:
    """(batch, image size) of the ENGINE_ROWS that --sizes asks for."""
    return [(batch, size) for batch, size in ENGINE_ROWS if size in args.sizes]


def engine_part(args, device):
    steps = 12 if args.quick else args.steps
    notes = ["each setting in a fresh `python -m fer_train train` process; images_per_s: median of the engine's "
             "per-window rates (metrics.jsonl) after the first window", f"{steps} steps per setting",
             "model resnet18 + mish + abp, Ranger + GC, FMix unless the setting says otherwise, no class weights"]
    results = common.Results("engine", device, args, notes, measure_copy=False)
    with tempfile.TemporaryDirectory() as scratch:
        data = engine_data(args, Path(scratch), results)
        for batch, size in engine_rows(args):
            for name in args.settings:
                row = run_setting(name, batch, size, steps, data, Path(scratch) / "run", device.type)
                results.append(row)
                print(f"{size:>3} px batch {batch:<3} {name:<18} {row['images_per_s']:8.1f} images/s   "
                      f"({row['what']})", flush=True)
    results.finish()


def other_process(share: float) -> subprocess.Popen | None:
    """A process that keeps one core busy `share` of the time, as a video call or a browser would."""
    if share <= 0:
        return None
    code = (f"import time\nwhile True:\n    t = time.perf_counter()\n    while time.perf_counter() - t < "
            f"{0.01 * share}: pass\n    time.sleep({0.01 * (1 - share)})")
    return subprocess.Popen([sys.executable, "-c", code])


def load_part(args, device):
    """The default engine and adaptive threads under each of LOADS, taking turns within a load."""
    steps = 12 if args.quick else args.steps
    settings = ("default", "adaptive-threads")
    notes = [f"each run in a fresh `python -m fer_train train` process, {steps} steps, while another process keeps "
             "one core busy for a share of every 10 ms (LOADS); the settings take turns under each load for "
             f"{args.rounds} rounds; images_per_s of a run: median of its per-window rates after the first window",
             "model resnet18 + mish + abp, Ranger + GC, FMix, no class weights"]
    results = common.Results("engine-load", device, args, notes, measure_copy=False)
    with tempfile.TemporaryDirectory() as scratch:
        data = engine_data(args, Path(scratch), results)
        for batch, size in engine_rows(args):
            for load, share in LOADS.items():
                for round_ in range(args.rounds):
                    for name in settings:
                        other = other_process(share)
                        try:
                            row = run_setting(name, batch, size, steps, data, Path(scratch) / "run", device.type)
                        finally:
                            if other is not None:
                                other.kill()
                                other.wait()
                        results.append({**row, "load": load, "other_process_share": share, "round": round_})
                        print(f"{size:>3} px batch {batch:<3} {load:<12} round {round_} {name:<17} "
                              f"{row['images_per_s']:8.1f} images/s", flush=True)
    results.finish()


def against_part(args, device):
    """The default engine of this tree and of another commit's checkout (--against), taking turns, so that
    a machine whose speed drifts between runs (shared hosts do, by 15 % or more within minutes) hits both
    alike; a speed-up claimed against an earlier commit comes from this, not from files of other days."""
    if args.against is None or not (args.against / "fer_train").is_dir():
        raise SystemExit(f"bench_train.py: the against part needs --against CHECKOUT, a checkout of this project "
                         f"(got {args.against})")
    if args.rounds < 1:
        raise SystemExit(f"bench_train.py: --rounds must be at least 1, got {args.rounds}")
    checkout = args.against.resolve()
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    steps = 12 if args.quick else args.steps
    notes = [f"the default engine here and at {commit or checkout.name} (its own defaults), "
             f"{args.rounds} runs of each taking turns, {steps} steps per run; images_per_s of a run: median of "
             "its per-window rates after the first window; ratio: median over rounds of here / there",
             "model resnet18 + mish + abp, Ranger + GC, FMix, no class weights"]
    results = common.Results("engine-against", device, args, notes, measure_copy=False)
    results.env["against_commit"] = commit
    with tempfile.TemporaryDirectory() as scratch:
        data = engine_data(args, Path(scratch), results)
        for batch, size in engine_rows(args):
            pairs = []
            for round_ in range(args.rounds):
                pair = {}
                for side, tree in (("there", checkout), ("here", ROOT)):
                    row = run_setting("default", batch, size, steps, data, Path(scratch) / "run", device.type,
                                      checkout=tree)
                    pair[side] = row["images_per_s"]
                    results.append({**row, "side": side, "round": round_})
                    print(f"{size:>3} px batch {batch:<3} round {round_} {side:<5} {row['images_per_s']:8.1f} images/s",
                          flush=True)
                pairs.append(pair)
            ratio = statistics.median(p["here"] / p["there"] for p in pairs)
            results.append({"image_size": size, "batch": batch, "ratio_here_to_there": ratio,
                            "here_images_per_s": statistics.median(p["here"] for p in pairs),
                            "there_images_per_s": statistics.median(p["there"] for p in pairs)})
            print(f"{size:>3} px batch {batch:<3} here / there: {ratio:.2f}x", flush=True)
    results.finish()


def main():
    args = common.parse_args(__doc__.split("\n")[0], _arguments, dtypes=False)
    device = common.setup(args.device)
    if "step" in args.parts:
        step_part(args, device)
    if "engine" in args.parts:
        engine_part(args, device)
    if "load" in args.parts:
        load_part(args, device)
    if "against" in args.parts:
        against_part(args, device)


if __name__ == "__main__":
    main()
