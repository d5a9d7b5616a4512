"""Video throughput: frames per second end to end, decode -> detect -> crop -> classify -> track -> write rows,
the path of `python -m fer_train predict MODEL VIDEO -o rows.csv` (fer_train.inference.video.process_video).

    python benchmarks/bench_video.py [VIDEO] [--device cpu|cuda] [--image-sizes 48,224] [--detect-sizes 640,320]
        [--every 1] [--batch 32] [--repeats 2] [--threads 2] [--out PATH] [--quick]

Without VIDEO, a clip is generated (--generated-frames frames of 640 x 360 at 30 frames/s: a drawn face of
fer_train.data.readers.synthetic, 48 pixels, moving across a plain background; H.264 via PyAV) under the
system's temporary folder, so the benchmark runs anywhere; the face is what CenterFace finds in drawn faces,
one per frame. The model is ResNet-18 + Mish + ABP (fused kernels) with random weights at each --image-sizes
(the classifier's input side; throughput does not depend on the weights), with the evaluation transform of
that size.

Per (image size, detect size): --repeats runs of the whole video, frames/s = decoded frames over the wall time
of the run (the median is reported), one untimed warm-up run of the first batch before. Also, to explain the
total, each stage alone on the same frames: decoding (PyAV to RGB arrays), detection (batches of --batch
frames already decoded) and classification (crops of the detected faces). The machine's load average is
recorded before and after each case: on a shared machine the figures are only as good as the load says.

Writes benchmarks/results/<device>-video.json (or --out).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import common
from fer_train import checkpoint
from fer_train.config import build_config
from fer_train.data.base import CLASSES
from fer_train.data.readers.synthetic import draw_face
from fer_train.factories import build_model
from fer_train.inference import FaceExpressionRecognizer
from fer_train.inference.outputs import RowWriter
from fer_train.inference.video import process_video, read_frames, video_info

GENERATED = Path(tempfile.gettempdir()) / "fer_bench_video"


def add_arguments(p) -> None:
    listed = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("video", nargs="?", type=Path, help="a video file (default: a generated clip)")
    p.add_argument("--image-sizes", type=listed, default=[48, 224], help="classifier input sides, comma-separated")
    p.add_argument("--detect-sizes", type=listed, default=[640, 320],
                   help="longest side the detector sees, comma-separated (predict's --detect-size; default first)")
    p.add_argument("--every", type=int, default=1, help="process every Nth frame (predict's --every)")
    p.add_argument("--batch", type=int, default=32, help="frames per detector pass (predict's --batch-size)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=common.CPU_THREADS, help="CPU threads (torch and onnxruntime)")
    p.add_argument("--generated-frames", type=int, default=300)
    p.add_argument("--out", type=Path, help="results file (default: benchmarks/results/<device>-video.json)")


def make_clip(frames: int, path: Path) -> Path:
    """640 x 360, 30 frames/s: a 48-pixel drawn face moving left to right and back on a grey background."""
    import av

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    face = draw_face(1, torch.Generator().manual_seed(0), 48)
    temporary = path.with_suffix(".partial.mp4")
    with av.open(str(temporary), "w") as container:
        stream = container.add_stream("libx264", rate=30, options={"crf": "20"})
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        for i in range(frames):
            image = torch.full((360, 640, 3), 110, dtype=torch.uint8)
            x = 20 + int(abs((i * 4) % 1120 - 560))  # back and forth
            image[150:198, x:x + 48] = face.permute(1, 2, 0)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image.numpy(), format="rgb24")))
        container.mux(stream.encode())
    temporary.replace(path)
    return path


def random_model(image_size: int, device: torch.device) -> checkpoint.LoadedModel:
    config = build_config("default", overrides={"data": {"image_size": image_size}}, check_paths=False)
    model = build_model(config.model, pretrained=False).to(device).eval()
    return checkpoint.LoadedModel(model, config, CLASSES, checkpoint.input_transform(config), 1.0, 0,
                                  f"random resnet18 {image_size}px")


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def stages(recognizer, video: Path, batch: int) -> dict:
    """Each stage alone on the video's first 4 batches of frames: frames (faces) per second."""
    start = time.perf_counter()
    frames = []
    for chunk in read_frames(video, 1, batch):
        frames += [c[2] for c in chunk]
        if len(frames) >= 4 * batch:
            break
    decode = len(frames) / (time.perf_counter() - start)
    batches = [frames[k:k + batch] for k in range(0, len(frames), batch)]
    recognizer.find(batches[0])  # warm-up
    start = time.perf_counter()
    found = [recognizer.find(b) for b in batches]
    detect = len(frames) / (time.perf_counter() - start)
    start = time.perf_counter()
    faces = sum(sum(len(f) for f in recognizer.process(b, detections=d)) for b, d in zip(batches, found))
    classify = faces / max(time.perf_counter() - start, 1e-9)
    return {"decode_frames_per_s": decode, "detect_frames_per_s": detect, "crop_classify_faces_per_s": classify,
            "faces_per_frame": faces / len(frames)}


def main():
    args = common.parse_args(__doc__.splitlines()[0], add_arguments, dtypes=False)
    device = common.setup(args.device)
    torch.set_num_threads(args.threads)
    video = args.video or make_clip(args.generated_frames if not args.quick else 60,
                                    GENERATED / f"clip-{args.generated_frames if not args.quick else 60}.mp4")
    total, rate, width, height = video_info(video)
    results = common.Results("video", device, args, measure_copy=False, path=args.out, notes=[
        "frames_per_s: decoded frames of the whole video over the wall time of process_video (decode on a "
        "background thread, CenterFace, crops by fer_kernels.augment, the classifier, the tracker, rows written to "
        "a CSV file), the median over repeats; every: every Nth frame detected and classified (all decoded)",
        "model: ResNet-18 + Mish + ABP, fused kernels, random weights, float32; detector: CenterFace (onnxruntime "
        "on a CPU with 'threads' intra-op threads, the torch port on CUDA) at its default threshold",
        "stages: each alone on the first 4 batches: decoding to RGB, detection on decoded frames, crop + classify "
        "of the detected faces (faces per second)",
        "load_before / load_after: the machine's 1, 5 and 15 minute load averages (os.getloadavg) around the case"],
        env={"cpu_cores": len(os.sched_getaffinity(0)), "onnxruntime": common.version(
            "onnxruntime"), "av": common.version("av"), "video": video.name if args.video else "generated",
             "video_frames": total, "video_fps": rate, "video_size": f"{width}x{height}"})
    print(f"{video}: {width} x {height}, {total} frames at {rate:.2f} frames/s; load {load()}", flush=True)
    for image_size in args.image_sizes:
        loaded = random_model(image_size, device)
        for detect_size in args.detect_sizes:
            recognizer = FaceExpressionRecognizer(loaded, device=device, batch_size=args.batch, detect_size=detect_size)
            before = load()
            part = stages(recognizer, video, args.batch)
            times, frames = [], 0
            for _ in range(1 if args.quick else args.repeats):
                with tempfile.TemporaryDirectory() as folder:
                    writer = RowWriter(str(Path(folder) / "rows.csv"), recognizer.classes)
                    start = time.perf_counter()
                    result = process_video(recognizer, video, writer.write, every=args.every, batch=args.batch,
                                           progress=False)
                    writer.close()
                    times.append(time.perf_counter() - start)
                    frames = result.frames
            rates = [frames / t for t in times]
            row = results.append({"model": "resnet18+mish+abp", "image_size": image_size, "detect_size": detect_size,
                                  "every": args.every, "batch": args.batch, "frames": frames,
                                  "frames_per_s": statistics.median(rates), "repeats_frames_per_s": rates,
                                  "real_time_x": statistics.median(rates) / rate, **part,
                                  "load_before": before, "load_after": load()})
            print(line(row), flush=True)
    results.finish()


def line(row: dict) -> str:
    return (f"resnet18 {row['image_size']:>3}px detect {row['detect_size']:>4}px every {row['every']}: "
            f"{row['frames_per_s']:7.1f} frames/s (x{row['real_time_x']:.2f} real time) | decode "
            f"{row['decode_frames_per_s']:.0f} frames/s, detect {row['detect_frames_per_s']:.1f} frames/s, "
            f"crop+classify {row['crop_classify_faces_per_s']:.0f} faces/s, {row['faces_per_frame']:.2f} faces/frame "
            f"| load {row['load_before']} -> {row['load_after']}")


if __name__ == "__main__":
    main()
