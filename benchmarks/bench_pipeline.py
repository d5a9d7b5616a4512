"""Data-pipeline throughput: images per second from files on disk to augmented, normalised batches.

From encoded files to a float32 batch N x 3 x S x S in the device's memory, for fer_train.data's DALI
pipeline, its fallback (PyTorch) pipeline and a torchvision DataLoader baseline with the paper's
transforms (docs/method.md section 6), all with the same number of workers; on the shared FERPlus training images
(48 x 48 PNG), facial_expressions (112 x 112 JPEG) and synthetic 256 x 256 JPEGs.

    python benchmarks/bench_pipeline.py [--device cpu|cuda] [--sets ferplus,facial_expressions,synthetic256]
        [--pipelines dali,torch,torchvision] [--images 4096] [--batch-size 64] [--workers 2]
        [--image-size 224] [--train | --eval] [--repeats 3] [--warmup-batches 4] [--threads 2] [--out PATH]
        [--quick]

Per set: a fixed subset, the first (warm-up + --images) images of a seeded shuffle (the whole set if it is
smaller), read once before timing so that every pipeline reads its files from the page cache. Each
repeat is one epoch over the subset by each pipeline in turn, so that a slow spell of a shared machine
hits them all alike. The first --warmup-batches batches of an epoch are not timed: they hold the worker
start-up (the PyTorch DataLoaders start their workers at every epoch, DALI spawns its own at the first)
and fill the queues. The clock runs from the last warm-up batch to the last batch of the epoch; every
batch is checked (shape, dtype, device) and touched (one element read on the CPU; on a GPU the stream
is synchronized at both ends of the window, so queued kernels are counted). images/s: the timed images
over that time, median over the repeats; vs_torchvision: that median over the baseline's on the same set.

synthetic256 is written once (faces of fer_train.data.readers.synthetic drawn at 128 x 128, upscaled, JPEG
quality 90) in facial_expressions' layout under --cache, outside the repository, and read as that set.

Writes benchmarks/results/<device>-pipeline.json (or --out); `python benchmarks/common.py
--markdown-pipeline FILE` prints the README table.
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

import common
from fer_train.data import DataError, build_loader, dali_available, open_dataset
from fer_train.data.readers.synthetic import draw_face, sample_seed

SETS = ("ferplus", "facial_expressions", "synthetic256")
PIPELINES = ("dali", "torch", "torchvision")
DATA = common.ROOT.parent / "shared" / "data"
CACHE = Path(tempfile.gettempdir()) / "fer_bench_pipeline"
# facial_expressions' names of CLASSES, in their order: the synthetic set's legend uses them
FE_EMOTIONS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")


def add_arguments(p) -> None:
    listed = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--sets", type=listed, default=list(SETS), help=f"comma-separated, of {', '.join(SETS)}")
    p.add_argument("--pipelines", type=listed, default=list(PIPELINES),
                   help=f"comma-separated, of {', '.join(PIPELINES)}")
    p.add_argument("--images", type=int, default=None, help="images timed per repeat (default 4096; --quick 256)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="worker processes of every pipeline (default 2)")
    p.add_argument("--image-size", type=int, default=224, help="output side; the resize is side * 256 / 224")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch threads of the main process, where the torch pipeline augments on a CPU (default: "
                        f"{common.CPU_THREADS} on cpu, torch's own on cuda)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train", dest="train", action="store_true", default=True,
                      help="random augmentation, shuffled (default)")
    mode.add_argument("--eval", dest="train", action="store_false", help="resize and centre crop, in order")
    p.add_argument("--repeats", type=int, default=None, help="epochs timed per pipeline (default 3; --quick 1)")
    p.add_argument("--warmup-batches", type=int, default=None,
                   help="untimed batches at the start of each epoch (default 4; --quick 2)")
    p.add_argument("--seed", type=int, default=0, help="of the subset's shuffle and of the pipelines")
    p.add_argument("--data", type=Path, default=DATA, help="folder holding ferplus/ and facial_expressions/")
    p.add_argument("--cache", type=Path, default=CACHE, help="where synthetic256 is written (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="the JSON file (default: <results>/<device>-pipeline.json)")


def parse_args():
    args = common.parse_args(__doc__.splitlines()[0], add_arguments, dtypes=False)
    for name, chosen, allowed in (("--sets", args.sets, SETS), ("--pipelines", args.pipelines, PIPELINES)):
        unknown = [x for x in chosen if x not in allowed]
        if unknown or not chosen:
            raise SystemExit(f"bench_pipeline.py: {name}: {unknown or 'none given'}; choose from {', '.join(allowed)}")
    quick = {"images": 256, "repeats": 1, "warmup_batches": 2}
    normal = {"images": 4096, "repeats": 3, "warmup_batches": 4}
    for key, value in (quick if args.quick else normal).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("images", "repeats", "warmup_batches", "batch_size", "image_size", "threads"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise SystemExit(f"bench_pipeline.py: --{key.replace('_', '-')} must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------- sets

def write_synthetic256(root: Path, count: int) -> Path:
    """facial_expressions' layout (data/legend.csv, images/) holding `count` 256 x 256 RGB JPEGs (quality
    90): faces drawn at 128 x 128 and upscaled (bicubic), as drawing at 256 costs 25 ms an image, 5x more
    (measured). Files already there are kept (sample i is the same every time); the legend is written
    last, so a run cut short never leaves a legend naming missing files."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = ["user.id,image,emotion"]
    made = 0
    for i in range(count):
        name = f"synthetic_{i:06d}.jpg"
        path = images / name
        if not path.exists():
            face = draw_face(i % len(FE_EMOTIONS), torch.Generator().manual_seed(sample_seed(0, "bench256", i)), 128)
            part = path.with_suffix(".part")
            Image.fromarray(face.permute(1, 2, 0).numpy()).resize((256, 256), Image.BICUBIC).save(
                part, "JPEG", quality=90)
            part.rename(path)
            made += 1
            if made % 1000 == 0:
                print(f"  synthetic256: {made} images written under {images}", flush=True)
        rows.append(f"0,{name},{FE_EMOTIONS[i % len(FE_EMOTIONS)]}")
    (root / "data").mkdir(exist_ok=True)
    legend = root / "data" / "legend.csv"
    legend.with_suffix(".part").write_text("\n".join(rows) + "\n")
    legend.with_suffix(".part").rename(legend)
    return root


def open_set(name: str, args, count: int):
    """The data set `name` reads: synthetic256 is written (once) with `count` images."""
    if name == "synthetic256":
        return open_dataset("facial_expressions", write_synthetic256(args.cache / name, count), "train")
    return open_dataset(name, args.data / name, "train")


def read_once(dataset) -> str:
    """Reads every file of `dataset` (into the page cache); what they are, e.g. '48x48 PNG, 2.1 kB'."""
    kinds, total = Counter(), 0
    for i in range(len(dataset)):
        data = dataset.encoded(i)
        total += len(data)
        with Image.open(io.BytesIO(data)) as image:
            kinds[f"{image.width}x{image.height} {image.format}"] += 1
    (kind, n), = kinds.most_common(1)
    others = "" if n == len(dataset) else f" ({len(dataset) - n} of other sizes)"
    return f"{kind}{others}, {total / len(dataset) / 1e3:.1f} kB"


# ---------------------------------------------------------------------------------------------- pipelines

class PILFiles(Dataset):
    """The baseline's data set: each record's file opened with PIL as RGB (grey replicated), cropped to its
    face box if it has one, through `transform`."""

    def __init__(self, dataset, transform):
        self.records, self.transform = dataset.records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        record = self.records[i]
        with Image.open(record.path) as image:
            image = image.convert("RGB")
        if record.box is not None:
            image = image.crop(record.box)
        return self.transform(image), record.label


def paper_transform(train: bool, size: int, config) -> transforms.Compose:
    """docs/method.md section 6 in torchvision's (v1) transforms, as the public implementations write it."""
    resize = [transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)]
    normalise = [transforms.ToTensor(), transforms.Normalize(config.mean, config.std)]
    if not train:
        return transforms.Compose(resize + normalise)
    return transforms.Compose(resize + [
        transforms.RandomHorizontalFlip(config.flip),
        transforms.ColorJitter(config.brightness, config.contrast, config.saturation, config.hue),
        # RandomAffine has no mirrored border: the corners it uncovers get its default fill (black), not
        # the specification's reflection; shear=15 shears along x only, as fer_train.recipe.augmentation does
        transforms.RandomAffine(degrees=config.rotation, shear=config.shear),
    ] + normalise)


class TorchvisionBaseline:
    """DataLoader(batch_size, shuffle, num_workers) over PILFiles, its batches moved to `device`."""

    def __init__(self, dataset, batch_size: int, train: bool, image_size: int, device: torch.device,
                 num_workers: int, seed: int):
        from fer_train.recipe.augmentation import AugmentConfig
        self.device = device
        self.loader = DataLoader(PILFiles(dataset, paper_transform(train, image_size, AugmentConfig())),
                                 batch_size=batch_size, shuffle=train, drop_last=train, num_workers=num_workers,
                                 pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, targets in self.loader:
            yield images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)


def make_loader(pipeline: str, dataset, args, device: torch.device):
    if pipeline == "torchvision":
        return TorchvisionBaseline(dataset, args.batch_size, args.train, args.image_size, device, args.workers,
                                   args.seed)
    return build_loader(dataset, args.batch_size, args.train, image_size=args.image_size, device=device,
                        backend=pipeline, seed=args.seed, num_workers=args.workers)


def time_epoch(loader, warmup: int, size: int, device: torch.device) -> tuple[float, int]:
    """(seconds, images) from the `warmup`-th batch of one epoch of `loader` to its last batch."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start, timed = None, 0
    for k, (images, _) in enumerate(loader):
        if images.shape[1:] != (3, size, size) or images.dtype != torch.float32 or images.device.type != device.type:
            raise RuntimeError(f"a batch of {tuple(images.shape)} {images.dtype} on {images.device}; expected "
                               f"N x 3 x {size} x {size} float32 on {device}")
        if device.type == "cpu":
            images[-1, -1, -1, -1].item()
        if k == warmup - 1:
            sync()
            start = time.perf_counter()
        elif k >= warmup:
            timed += images.shape[0]
    sync()
    if start is None or timed == 0:
        raise RuntimeError(f"the epoch had no batch after the {warmup} warm-up batches")
    return time.perf_counter() - start, timed


# ---------------------------------------------------------------------------------------------- run

def environment_extra() -> dict:
    dali = None
    if dali_available():
        import nvidia.dali
        dali = nvidia.dali.__version__
    return {"cpu": common.device_name(torch.device("cpu")), "cpu_cores": len(os.sched_getaffinity(0)),
            "torchvision": common.version("torchvision"), "nvidia_dali": dali, "pillow": common.version("pillow")}


def bench_set(name: str, args, device: torch.device, results) -> None:
    warmup_images = args.warmup_batches * args.batch_size
    case = {"set": name, "mode": "train" if args.train else "eval", "image_size": args.image_size,
            "batch_size": args.batch_size, "workers": args.workers}

    def skip(pipelines, reason):
        for pipeline in pipelines:
            row = results.append({**case, "pipeline": pipeline, "skipped": reason})
            print(common.pipeline_line(row), flush=True)

    try:
        dataset = open_set(name, args, warmup_images + args.images)
    except (DataError, OSError) as err:
        return skip(args.pipelines, f"cannot open the set ({err})")
    # the timed images fill whole batches, so training (which drops a short tail) and evaluation read alike
    timed = min(args.images, len(dataset) - warmup_images) // args.batch_size * args.batch_size
    if timed < args.batch_size:
        return skip(args.pipelines, f"{len(dataset)} images, fewer than {args.warmup_batches} warm-up batches and "
                                    f"one timed batch of {args.batch_size}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
    subset = dataset.subset(order[:warmup_images + timed].tolist())
    source = read_once(subset)
    print(f"{name}: {len(subset)} of {len(dataset)} images ({source}); {timed} timed per epoch after "
          f"{args.warmup_batches} warm-up batches of {args.batch_size}", flush=True)

    loaders = {}
    for pipeline in args.pipelines:
        if pipeline == "dali" and not dali_available():
            skip([pipeline], "nvidia.dali cannot be imported here")
            continue
        loaders[pipeline] = make_loader(pipeline, subset, args, device)
    seconds = {pipeline: [] for pipeline in loaders}
    for repeat in range(args.repeats):
        for pipeline, loader in loaders.items():
            elapsed, images = time_epoch(loader, args.warmup_batches, args.image_size, device)
            assert images == timed, (pipeline, images, timed)
            seconds[pipeline].append(elapsed)
            print(f"  repeat {repeat + 1}/{args.repeats} {pipeline:<12} {timed / elapsed:8,.0f} images/s "
                  f"({timed} images in {elapsed:.2f} s)", flush=True)
    rates = {pipeline: [timed / s for s in times] for pipeline, times in seconds.items()}
    medians = {pipeline: statistics.median(r) for pipeline, r in rates.items()}
    for pipeline, r in rates.items():
        row = results.append({
            **case, "pipeline": pipeline, "source": source, "images": timed, "warmup_batches": args.warmup_batches,
            "images_per_s": medians[pipeline], "repeats_images_per_s": r, "seconds": seconds[pipeline],
            "vs_torchvision": medians[pipeline] / medians["torchvision"] if "torchvision" in medians else None})
        print(common.pipeline_line(row), flush=True)
    del loaders  # DALI's worker processes end with their pipeline


def main():
    args = parse_args()
    device = common.setup(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = common.Results("pipeline", device, args, measure_copy=False, path=args.out, env=environment_extra(),
                             notes=[
        "images_per_s: images of the timed window over its wall time, median over repeats; one repeat is one "
        "epoch over the set's subset by each pipeline in turn; the first warmup_batches batches of each epoch "
        "are not timed (worker start-up: DataLoader workers start at every epoch, DALI's at the first)",
        "the subset: the first warm-up + timed images of a seeded shuffle of the set, read once before timing "
        "(files then come from the page cache); batches checked and touched (cpu: one element read; cuda: "
        "synchronized at both ends of the window)",
        "dali: fer_train.data.dali_pipeline (CPU graph on a CPU, nvJPEG + fer_kernels.augment on a GPU), "
        "workers = its Python reader processes, plus its default 2 operator threads; torch: "
        "fer_train.data.torch_pipeline (DataLoader workers read and decode, the main process augments with "
        "'threads' torch threads)",
        "torchvision: DataLoader(batch_size, shuffle, num_workers) over PIL.Image.open(...).convert('RGB'), face "
        "box crop, torchvision.transforms v1 Resize(256/224 of the side), CenterCrop, and in training "
        "RandomHorizontalFlip, ColorJitter(0.25, 0.25, 0.05, 0.05), RandomAffine(15, shear=15) with its default "
        "black fill (torchvision has no mirrored border), then ToTensor, Normalize; batches moved to the device",
        "vs_torchvision: images_per_s over the torchvision baseline's on the same set in the same run",
        "synthetic256: fer_train.data.readers.synthetic faces drawn at 128 x 128, upscaled to 256 x 256 (bicubic), "
        "JPEG quality 90, read as a facial_expressions folder",
    ])
    for name in args.sets:
        bench_set(name, args, device, results)
    path = results.finish()
    print("\n" + "\n".join(common.pipeline_line(row) for row in results.rows))
    return path


if __name__ == "__main__":
    main()
