"""What several test modules share: which backends run on which device here, the accuracy rule every fast
path meets, and small image and data-set fixtures written in the real on-disk formats."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
from torchvision.io import encode_jpeg, encode_png

from fer_kernels._accuracy import ATOL, tolerance_excess

HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

# (backend, device) pairs that must match the reference. The reference backend is in the list too: it
# is what machines without the extension run.
BACKEND_DEVICES = [("cpu", "cpu"), ("triton", TRITON_DEVICE), ("reference", "cpu")]
if HAS_CUDA:
    BACKEND_DEVICES += [("cuda", "cuda"), ("reference", "cuda")]
FAST_BACKEND_DEVICES = [bd for bd in BACKEND_DEVICES if bd[0] != "reference"]

__all__ = ["TINY", "ATOL", "BACKEND_DEVICES", "FAST_BACKEND_DEVICES", "HAS_CUDA", "TRITON_DEVICE", "assert_accurate",
           "augment_sources", "generator", "random_batch",
           "ferplus_line", "ids", "jpeg", "make_ferplus", "make_rafdb", "pattern", "png", "read_confusion", "write",
           "FERPLUS_ROWS"]


def ids(pairs):
    return [f"{b}-{d}" for b, d in pairs]


def assert_accurate(ours, ref64, plain, name="", dtype=None):
    """fer_kernels' accuracy rule (fer_kernels._accuracy.tolerance_excess, which auto's check applies too):
    the kernel's max error against the float64 reference is at most twice the error that plain PyTorch
    makes in the same dtype, plus one rounding of the storage dtype and a small absolute floor; NaN and
    inf where the reference has them. (Triton's CPU interpreter rounds float32 -> bfloat16 by truncation,
    up to one ulp; GPUs round to nearest.)

    ours: the kernel's result; ref64: the reference in float64; plain: the reference run in ours' dtype.
    dtype: the precision the result was computed from, when it differs from its storage (a float64 gate
    gradient of bfloat16 activations).
    """
    error = tolerance_excess(ours, ref64, plain, dtype)
    assert error is None, f"{name}: {error}"


# ------------------------------------------------------------------------------------------- runs

# small enough for seconds per run: 32 x 32 faces, 64 to train on, 40 per evaluation split, no workers
TINY = ["--set", "data.image_size=32", "--set", "data.synthetic_size=32", "--set", "data.synthetic_length=64",
        "--set", "data.synthetic_eval_length=40", "--set", "data.workers=0", "--set", "data.backend=torch",
        "--set", "train.eval_batch_size=40", "--set", "train.log_every=1"]


# ------------------------------------------------------------------------------------------- tensors

def generator(seed: int = 0, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def random_batch(shape, dtype, device, channels_last, seed=0) -> torch.Tensor:
    """N x C x H x W: uint8 noise, or normal values of spread 2 in a floating dtype."""
    gen = generator(seed)
    if dtype == torch.uint8:
        x = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float64).mul(2).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device)


def augment_sources(device="cpu", seed=0) -> list[torch.Tensor]:
    """uint8 sources as the pipelines meet them: RGB and grey, CHW and HWC storage, odd sizes, a large image."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)  # noqa: E731
    images = [rnd(3, 48, 48), rnd(1, 61, 37), rnd(3, 300, 500), rnd(112, 112, 3).permute(2, 0, 1), rnd(1, 7, 9)]
    return [im.to(device) for im in images]


# ------------------------------------------------------------------------------------------- images

def pattern(channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A uint8 image whose pixels differ from place to place, so a wrong crop shows."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    base = torch.stack([(x * 5 + y * 3 + 40 * c + seed * 17) % 256 for c in range(channels)])
    return base.to(torch.uint8)


def png(image: torch.Tensor) -> bytes:
    return encode_png(image).numpy().tobytes()


def jpeg(image: torch.Tensor) -> bytes:
    return encode_jpeg(image, quality=95).numpy().tobytes()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------- FERPlus

# votes: neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF;
# then the expected label (or drop reason) under majority, plurality and soft
FERPLUS_ROWS = [
    ("neutral", (10, 0, 0, 0, 0, 0, 0, 0, 0, 0), 0, 0, 0),
    ("happy", (0, 6, 1, 1, 0, 0, 0, 0, 2, 0), 1, 1, 1),
    ("surprise", (0, 0, 9, 0, 0, 0, 0, 0, 1, 0), 2, 2, 2),
    ("sad", (3, 0, 0, 7, 0, 0, 0, 0, 0, 0), 3, 3, 3),
    ("anger", (0, 0, 0, 0, 6, 0, 0, 0, 0, 0), 4, 4, 4),
    ("disgust", (0, 0, 0, 0, 0, 7, 0, 0, 1, 0), 5, 5, 5),
    ("fear", (0, 0, 0, 0, 0, 0, 8, 0, 0, 2), 6, 6, 6),
    ("singles", (1, 1, 1, 1, 1, 1, 1, 3, 0, 0), 7, 7, 7),  # votes of 1 dropped: contempt has 3 of 3
    ("tie", (0, 0, 4, 4, 0, 0, 0, 0, 2, 0), "no majority", 2, 2),  # ties: the first column
    ("half", (0, 0, 0, 0, 4, 2, 2, 0, 0, 0), "no majority", 4, 4),  # 4 of 8 is not more than half
    ("unknown", (2, 0, 0, 0, 0, 0, 0, 0, 6, 2), "unknown or NF wins", "unknown or NF wins", 0),
    ("noface", (0, 0, 0, 0, 0, 0, 0, 0, 0, 10), "unknown or NF wins", "unknown or NF wins", "no emotion votes"),
    ("happy_or_unknown", (0, 4, 0, 0, 0, 0, 0, 0, 4, 2), "no majority", 1, 1),  # a tie with unknown: happy first
    ("all_single", (1,) * 10, "no majority", 0, 0),
]


def ferplus_line(name: str, votes, box: str = "(0, 0, 48, 48)") -> str:
    return f'{name},"{box}",' + ",".join(str(v) for v in votes)


def make_ferplus(root: Path, lines: list[str] | None = None, folder: str = "FER2013Train") -> Path:
    """A FERPlus split folder with a 48 x 48 grey PNG per named row and the headerless label.csv."""
    lines = lines if lines is not None else [ferplus_line(f"{n}.png", v) for n, v, *_ in FERPLUS_ROWS]
    for k, line in enumerate(lines):
        name = line.split(",")[0]
        if not (root / folder / name).exists():
            write(root / folder / name, png(pattern(1, 48, 48, seed=k)))
    write(root / folder / "label.csv", ("\n".join(lines) + "\n").encode())
    return root / folder


def make_rafdb(root: Path, lines: list[str]) -> Path:
    """A RAF-DB basic folder: the label list and a 32 x 32 aligned JPEG per line."""
    for k, line in enumerate(lines):
        stem = line.split()[0].rpartition(".")[0]
        write(root / "Image" / "aligned" / f"{stem}_aligned.jpg", jpeg(pattern(3, 32, 32, seed=k)))
    return write(root / "EmoLabel" / "list_patition_label.txt", ("\n".join(lines) + "\n").encode())


def read_confusion(path) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 [8, 8] row percentages with NaN rows, int64 [8] images per true class) from a confusion CSV
    that fer_train.reports.write_confusion wrote."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    body = rows[1:-1]  # header and the "predicted" totals row around the per-class rows
    percent = torch.tensor([[float(v) if v else math.nan for v in row[1:-1]] for row in body], dtype=torch.float64)
    images = torch.tensor([int(row[-1]) for row in body], dtype=torch.int64)
    return percent, images


# ------------------------------------------------------------------------------------------- damaged files

__all__ += ["corrupt_jpeg_body", "huge_header", "REPO", "python_process", "process_group_gone"]


def corrupt_jpeg_body(data: bytes) -> bytes:
    """The JPEG with its entropy-coded data broken halfway through, header and end marker intact: it passes
    the checks made when a set is opened, torchvision and PIL refuse to decode it, DALI's decoder does not."""
    data = bytearray(data)
    scan = data.find(b"\xff\xda")
    start = scan + 2 + int.from_bytes(data[scan + 2:scan + 4], "big")
    middle = (start + len(data) - 2) // 2
    data[middle:middle + 16] = b"\xff\x76" * 8  # a marker that does not exist
    return bytes(data)


def huge_header(data: bytes, width: int, height: int) -> bytes:
    """The JPEG (baseline) or PNG with its header claiming width x height pixels, as a decompression bomb's
    does: a file of a few kB that would decode to gigabytes."""
    import zlib

    data = bytearray(data)
    if data.startswith(b"\x89PNG"):
        data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # the IHDR chunk's CRC
    else:
        frame = data.find(b"\xff\xc0")
        data[frame + 5:frame + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


# ------------------------------------------------------------------------------------------- processes

REPO = Path(__file__).resolve().parents[1]


def python_process(args: list[str], **options):
    """`python args...` from the repository root in a session (and process group) of its own, so that
    os.killpg reaches it and its workers and nothing else; one OpenMP thread, text pipes."""
    import os
    import subprocess
    import sys

    options.setdefault("stdout", subprocess.PIPE)
    options.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, *args], cwd=REPO, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **options)


def process_group_gone(group: int, within: float = 20.0) -> bool:
    """Whether every process of the group has ended (waiting up to `within` seconds); zombies count as ended,
    since an orphan's reaping depends on the machine's init process."""
    import time

    def alive() -> bool:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:  # it ended while being read
                continue
            if int(fields[2]) == group and fields[0] not in ("Z", "X"):
                return True
        return False

    deadline = time.monotonic() + within
    while alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# ------------------------------------------------------------------------------------------- faces in scenes

__all__ += ["FACE_SIZE", "face_scene", "tiny_run", "write_video"]

# Cartoon faces (fer_train.data.readers.synthetic.draw_face) of this size are found by CenterFace with scores
# of about 0.6-0.85 on a plain background (measured); it frames their inner features, not the whole square.
FACE_SIZE = 40


def face_scene(places, height: int = 160, width: int = 240, seed: int = 0, level: int = 110):
    """uint8 3 x height x width: a plain grey background with a drawn face (class k % 8, its own seed) pasted
    as a square at each (x0, y0) of `places`; returns (image, float boxes N x 4 of the squares)."""
    from fer_train.data.readers.synthetic import draw_face

    image = torch.full((3, height, width), level, dtype=torch.uint8)
    boxes = []
    for k, (x0, y0) in enumerate(places):
        image[:, y0:y0 + FACE_SIZE, x0:x0 + FACE_SIZE] = draw_face(k % 8, generator(seed * 100 + k), FACE_SIZE)
        boxes.append([x0, y0, x0 + FACE_SIZE, y0 + FACE_SIZE])
    return image, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def write_video(path: Path, frames, rate: int = 25, codec: str = "libx264") -> Path:
    """An encoded video of uint8 3 x H x W frames (even sides), through PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames[0].shape[1:]
        stream.pix_fmt = "yuv420p"
        for image in frames:
            frame = av.VideoFrame.from_ndarray(image.permute(1, 2, 0).contiguous().numpy(), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def tiny_run(folder: Path) -> Path:
    """A run folder with a best.pt of 2 training steps on TINY synthetic faces (seconds on a CPU)."""
    from fer_train.cli import main

    assert main(["--steps", "2", "--batch-size", "4", "--out", str(folder), *TINY]) == 0
    return folder
