"""What predict writes: rows (CSV, JSON, JSONL or JSON on standard output), annotated copies of images and
videos, and per video a timeline PNG per track and a summary (share of time per expression).

Rows, one per face (images: one per image without a face too, with face null; unreadable files: one row
with error set):
    path, frame, time_s, track (videos only), face (index in the image, left to right), box [x0, y0, x1, y1]
    in pixels of the original image, score (detector confidence), class, probabilities {class: p}, error
CSV spreads box into x0..y1 and probabilities into one column per class.

Names in an output folder: for an input whose file name is STEM.EXT (inputs sharing a stem get the folders
they are in prefixed: a__STEM), annotated images STEM.jpg, annotated videos STEM.mp4, timelines
STEM.track-ID.png, summaries STEM.summary.json and STEM.summary.md.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

from fer_train.errors import ConfigError

__all__ = ["OUTPUT_SUFFIXES", "RowWriter", "VideoAnnotator", "annotate_image", "check_folder", "check_output",
           "output_names", "track_summary", "write_report"]

OUTPUT_SUFFIXES = (".csv", ".json", ".jsonl")
# one colour per class (matplotlib's tab10 order), the same in annotations and timelines
PALETTE = ["#7f7f7f", "#2ca02c", "#ff7f0e", "#1f77b4", "#d62728", "#8c564b", "#9467bd", "#e377c2", "#bcbd22",
           "#17becf"]


def check_output(path: str) -> None:
    """ConfigError, before any work, for an output the rows cannot go to: a suffix other than .csv, .json or
    .jsonl, a folder, or a place that cannot be written."""
    if path == "-":
        return
    target = Path(path)
    if target.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"-o {path}: the output must end in .csv, .json or .jsonl (or be - for JSON on standard "
                          "output)")
    if target.is_dir():
        raise ConfigError(f"-o {path}: is a folder; give a file name ending in {', '.join(OUTPUT_SUFFIXES)}")
    if target.exists() and not os.access(target, os.W_OK):
        raise ConfigError(f"-o {path}: the file exists and cannot be written")
    check_folder(target.parent, f"-o {path}")


def check_folder(folder: str | Path, what: str) -> None:
    """ConfigError unless `folder` is a writable folder or can be made (its nearest existing parent is one)."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: cannot write in the folder {existing}")


def output_names(paths: list[Path]) -> dict[Path, str]:
    """A name per input for files derived from it: its stem, or for stems that several inputs share, the
    stem with its folders relative to the inputs' common folder in front (a__b__STEM)."""
    stems: dict[str, list[Path]] = {}
    for path in paths:
        stems.setdefault(path.stem, []).append(path)
    names = {}
    for stem, group in stems.items():
        if len(group) == 1:
            names[group[0]] = stem
            continue
        base = Path(os.path.commonpath([str(p.absolute().parent) for p in group]))
        for path in group:
            parts = path.absolute().relative_to(base).with_suffix("").parts
            names[path] = "__".join(parts) if len(parts) > 1 else f"{path.suffix.lstrip('.')}__{stem}"
    return names


class RowWriter:
    """Rows to a .csv or .jsonl file as they come, or to a .json file or standard output ("-": JSON) at close."""

    def __init__(self, path: str, classes: tuple[str, ...]):
        self.path, self.classes, self.count = path, tuple(classes), 0
        self.suffix = ".json" if path == "-" else Path(path).suffix.lower()
        self.rows: list[dict] = []
        self.file = None
        if path != "-" and self.suffix != ".json":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "w", newline="")
        if self.suffix == ".csv":
            self.csv = csv.writer(self.file)
            self.csv.writerow(["path", "frame", "time_s", "track", "face", "x0", "y0", "x1", "y1", "score", "class",
                               *self.classes, "error"])

    def write(self, row: dict) -> None:
        self.count += 1
        if self.suffix == ".csv":
            box = row.get("box") or [None] * 4
            probabilities = row.get("probabilities") or {}
            # repr() of a float is its shortest exact form: the CSV reads back to the same numbers
            self.csv.writerow([row["path"], *(_cell(row.get(k)) for k in ("frame", "time_s", "track", "face")),
                               *map(_cell, box), _cell(row.get("score")), row.get("class") or "",
                               *(_cell(probabilities.get(c)) for c in self.classes), row.get("error") or ""])
        elif self.suffix == ".jsonl":
            self.file.write(json.dumps(row) + "\n")
        else:
            self.rows.append(row)

    def close(self) -> None:
        if self.path == "-":
            json.dump(self.rows, sys.stdout, indent=2)
            sys.stdout.write("\n")
            sys.stdout.flush()
        elif self.suffix == ".json":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as f:
                json.dump(self.rows, f, indent=2)
                f.write("\n")
        if self.file is not None:
            self.file.close()


def _cell(value) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------- drawing

def _draw(rgb: np.ndarray, labels: list[tuple[list[float], str, int]]) -> np.ndarray:
    """The image (H x W x 3 uint8) with each (box, text, class index) drawn: a box in the class's colour,
    the text on a filled band above it (inside the image)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    size = max(11, min(image.size) // 40)
    try:
        font = ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        font = ImageFont.load_default()
    width = max(1, min(image.size) // 250)
    for box, text, cls in labels:
        colour = PALETTE[cls % len(PALETTE)]
        x0, y0, x1, y1 = box
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 4, bottom - top + 4
        ty = y0 - th if y0 - th >= 0 else min(y1, image.size[1] - th)
        draw.rectangle([x0, ty, x0 + tw, ty + th], fill=colour)
        draw.text((x0 + 2 - left, ty + 2 - top), text, fill="white", font=font)
    return np.asarray(image)


def _label(row: dict, classes: tuple[str, ...]) -> tuple[list[float], str, int]:
    probability = row["probabilities"][row["class"]]
    prefix = f"#{row['track']} " if row.get("track") is not None else ""
    return row["box"], f"{prefix}{row['class']} {probability:.2f}", classes.index(row["class"])


def annotate_image(image: torch.Tensor, rows: list[dict], classes: tuple[str, ...], path: Path) -> None:
    """A JPEG copy of a uint8 C x H x W image with its faces' rows drawn."""
    from PIL import Image

    rgb = (image.expand(3, -1, -1) if image.shape[0] == 1 else image).permute(1, 2, 0).cpu().numpy()
    drawn = _draw(np.ascontiguousarray(rgb), [_label(r, classes) for r in rows if r.get("box")])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(drawn).save(path, quality=90)


class VideoAnnotator:
    """An H.264 MP4 (libx264, or MPEG-4 part 2 where PyAV has no libx264) of every frame with the latest
    processed frame's faces drawn; call it as process_video's annotate, then close()."""

    def __init__(self, path: Path, width: int, height: int, rate: float, classes: tuple[str, ...]):
        import av
        from fractions import Fraction

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.classes, self.labels = path, classes, []
        self.width, self.height = width - width % 2, height - height % 2  # 4:2:0 needs even sides
        self.container = av.open(str(path), "w")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.stream = self.container.add_stream(codec, rate=Fraction(rate).limit_denominator(1001),
                                                options={"crf": "20", "preset": "veryfast"} if codec == "libx264"
                                                else {})
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.width, self.height, "yuv420p"

    def __call__(self, index: int, image: torch.Tensor, rows: list[dict] | None) -> None:
        import av

        if rows is not None:
            self.labels = [_label(r, self.classes) for r in rows]
        rgb = image.permute(1, 2, 0)[:self.height, :self.width].numpy()
        frame = av.VideoFrame.from_ndarray(_draw(np.ascontiguousarray(rgb), self.labels), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


# ---------------------------------------------------------------------------------------------- reports

def track_summary(series, classes: tuple[str, ...], frame_seconds: float) -> dict:
    """A track's first and last time, frames, seconds in view (frames x the time between processed frames),
    the share of its frames per expression (smoothed class) and its mean probabilities."""
    probabilities = torch.tensor(series.probabilities, dtype=torch.float64).reshape(-1, len(classes))
    counts = torch.bincount(probabilities.argmax(1), minlength=len(classes)).double()
    share = counts / counts.sum()
    return {"track": series.id, "first_s": round(series.times[0], 3), "last_s": round(series.times[-1], 3),
            "frames": len(series.times), "seconds": round(len(series.times) * frame_seconds, 3),
            "dominant": classes[int(share.argmax())], "share": dict(zip(classes, share.tolist())),
            "mean_probabilities": dict(zip(classes, probabilities.mean(0).tolist()))}


def write_report(result, classes: tuple[str, ...], folder: Path, name: str) -> list[Path]:
    """NAME.summary.json, NAME.summary.md and NAME.track-ID.png per track of a VideoResult, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    frame_seconds = result.every / result.fps
    tracks = [track_summary(s, classes, frame_seconds) for s in result.tracks.values()]
    doc = {"video": result.path, "frames": result.frames, "processed_frames": result.processed, "every": result.every,
           "fps": result.fps, "tracks": tracks}
    written = [folder / f"{name}.summary.json", folder / f"{name}.summary.md"]
    written[0].write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# {Path(result.path).name}: expressions per face", "",
             f"{result.frames} frames at {result.fps:.2f} frames/s, every {result.every} processed; share of each "
             "face's time per expression (smoothed class).", "",
             "| track | from | to | seconds | " + " | ".join(classes) + " |",
             "|---" * (4 + len(classes)) + "|"]
    for t in tracks:
        lines.append(f"| {t['track']} | {_clock(t['first_s'])} | {_clock(t['last_s'])} | {t['seconds']:.1f} | "
                     + " | ".join(f"{100 * t['share'][c]:.0f}%" for c in classes) + " |")
    written[1].write_text("\n".join(lines) + "\n")
    for series in result.tracks.values():
        path = folder / f"{name}.track-{series.id}.png"
        _timeline(series, classes, frame_seconds, f"{Path(result.path).name}: face #{series.id}", path)
        written.append(path)
    return written


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def _timeline(series, classes, frame_seconds: float, title: str, path: Path) -> None:
    """Each expression's smoothed probability over time (gaps where the face was out of view), and a band
    of the most probable expression under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = np.asarray(series.times)
    values = np.asarray(series.probabilities).reshape(len(times), len(classes))
    gaps = np.flatnonzero(np.diff(times) > 2.5 * frame_seconds) + 1  # break the lines where the face was not seen
    times = np.insert(times, gaps, np.nan)
    values = np.insert(values, gaps, np.nan, axis=0)
    fig, (ax, band) = plt.subplots(2, 1, figsize=(10, 4), sharex=True, gridspec_kw={"height_ratios": [6, 1]})
    for k, name in enumerate(classes):
        ax.plot(times, values[:, k], color=PALETTE[k % len(PALETTE)], label=name, linewidth=1.4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("probability")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    top = np.nan_to_num(values, nan=-1).argmax(1)
    for t0, t1, k, seen in zip(times[:-1], times[1:], top[:-1], ~np.isnan(values[:-1, 0])):
        if seen and not math.isnan(t1):
            band.axvspan(t0, t1, color=PALETTE[k % len(PALETTE)], linewidth=0)
    band.set_yticks([])
    band.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
