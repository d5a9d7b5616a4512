"""Videos: decoded with PyAV (FFmpeg) on a background thread, every Nth frame detected and classified in
batches, faces tracked across frames (fer_train.inference.tracking), each track's probabilities smoothed over
time; rows per frame and face go to a callback, an annotated copy to an MP4, and per track the series that
the timeline plots and the summary are drawn from.

    result = process_video(recognizer, "meeting.mp4", on_row=rows.append, every=2)
    result.tracks[1].times, result.tracks[1].probabilities      # for fer_train.inference.outputs
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fer_train.errors import DataError
from fer_train.inference.tracking import Smoother, Tracker

__all__ = ["Progress", "TrackSeries", "VIDEO_EXTENSIONS", "VideoResult", "process_video", "read_frames"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
_PREFETCH = 2  # decoded batches waiting for the detector: decoding overlaps detection, memory stays bounded


@dataclass
class TrackSeries:
    """One track's frames: times (seconds), smoothed probabilities (one list per frame), boxes."""

    id: int
    times: list[float] = field(default_factory=list)
    probabilities: list[list[float]] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)


@dataclass
class VideoResult:
    path: str
    frames: int  # decoded
    processed: int  # detected and classified (every Nth)
    fps: float
    width: int
    height: int
    every: int
    tracks: dict[int, TrackSeries]
    seconds: float  # wall time


def _open(path: Path):
    import av

    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError) as err:
        raise DataError(f"{path}: cannot open the video ({_reason(err)})") from None
    if not container.streams.video:
        container.close()
        raise DataError(f"{path}: the file holds no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # FFmpeg's own frame/slice threads
    return container, stream


def _reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def read_frames(path: str | Path, every: int = 1, batch: int = 32, keep_all: bool = False):
    """Batches of (index, seconds, uint8 3 x H x W tensor or None, processed) for the frames of a video, decoded
    on a background thread. Frame index % every == 0 is processed; the others are listed only with
    keep_all (an annotated copy needs every frame), their image then given too. DataError naming the file
    if it cannot be decoded, or holds no frame."""
    import av

    path = Path(path)
    container, stream = _open(path)
    rate = float(stream.average_rate or stream.guessed_rate or 30)
    out: queue.Queue = queue.Queue(_PREFETCH)
    stop = threading.Event()

    def work():
        index, pending, chosen_count = 0, [], 0
        try:
            for frame in container.decode(stream):
                if stop.is_set():
                    return
                chosen = index % every == 0
                if chosen or keep_all:
                    seconds = float(frame.time) if frame.time is not None else index / rate
                    image = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
                    pending.append((index, seconds, image, chosen))
                    chosen_count += chosen
                index += 1
                if chosen_count >= batch or len(pending) >= batch * every:
                    out.put(pending)
                    pending, chosen_count = [], 0
            if pending:
                out.put(pending)
            out.put(index if index else DataError(f"{path}: the video holds no frame that can be decoded"))
        except (av.FFmpegError, OSError, ValueError) as err:
            out.put(DataError(f"{path}: the video cannot be decoded after frame {index} ({_reason(err)}); it may "
                              "be truncated or corrupt"))
        except BaseException as err:  # noqa: BLE001 - a bug: hand it to the reading thread with its traceback
            out.put(err)

    worker = threading.Thread(target=work, name=f"decode {path.name}", daemon=True)
    worker.start()
    try:
        while True:
            item = out.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, int):
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a worker waiting on a full queue, then let it see the stop
            try:
                out.get_nowait()
            except queue.Empty:
                worker.join(0.05)
        container.close()


def video_info(path: str | Path) -> tuple[int, float, int, int]:
    """(frames as the container states them, 0 if unknown; frames per second; width; height)."""
    container, stream = _open(Path(path))
    try:
        rate = float(stream.average_rate or stream.guessed_rate or 30)
        frames = stream.frames or (int(float(stream.duration * stream.time_base) * rate) if stream.duration else 0)
        return frames, rate, stream.codec_context.width, stream.codec_context.height
    finally:
        container.close()


class Progress:
    """A progress line on standard error: frames done of the total, frames per second, ETA; redrawn in
    place on a terminal, a line every 10 seconds elsewhere (logs)."""

    def __init__(self, name: str, total: int, stream=None):
        self.name, self.total = name, total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self.last = time.monotonic()

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        if self.total:
            part = min(done / self.total, 1.0)
            bar = "#" * int(24 * part) + "-" * (24 - int(24 * part))
            eta = f" ETA {_clock(max(self.total - done, 0) / rate)}" if rate > 0 and not final else ""
            line = f"{self.name}: frame {done}/{self.total} [{bar}] {rate:,.1f} frames/s{eta}"
        else:
            line = f"{self.name}: frame {done} {rate:,.1f} frames/s"
        if final:
            line += f", {_clock(now - self.start)}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def process_video(recognizer, path: str | Path, on_row: Callable[[dict], None], *, every: int = 1,
                  batch: int = 32, smooth: float = 0.5, tracker: Tracker | None = None,
                  annotate: Callable | None = None, progress: bool = True) -> VideoResult:
    """Detect, classify and track the faces of every `every`-th frame; on_row(row) for each face (or, for a
    processed frame without a face, nothing: the frame count says how many were processed). smooth: the
    smoother's time constant in seconds (0: raw probabilities); annotate(index, image, faces or None):
    called for every frame in order when given (fer_train.inference.outputs.VideoAnnotator)."""
    if every < 1:
        raise ValueError(f"process_video: every must be >= 1, got {every}")
    path = Path(path)
    total, rate, width, height = video_info(path)
    tracker = tracker or Tracker(max_gap=max(1.0, 2 * every / rate))
    smoother = Smoother(smooth)
    tracks: dict[int, TrackSeries] = {}
    bar = Progress(path.name, total) if progress else None
    start, frames, processed = time.monotonic(), 0, 0
    classes = recognizer.classes
    for chunk in read_frames(path, every, batch, keep_all=annotate is not None):
        chosen = [c for c in chunk if c[3]]
        faces = recognizer.process([c[2] for c in chosen]) if chosen else []
        found = dict(zip((c[0] for c in chosen), faces))
        for index, seconds, image, is_chosen in chunk:
            shown = None
            if is_chosen:
                shown = _track(path, index, seconds, found[index], tracker, smoother, tracks, classes, on_row)
                processed += 1
            if annotate is not None:
                annotate(index, image, shown)
        frames = chunk[-1][0] + 1
        if bar is not None:
            bar.update(frames)
    if bar is not None:
        bar.update(frames, final=True)
    return VideoResult(str(path), frames, processed, rate, width, height, every, tracks, time.monotonic() - start)


def _track(path, index, seconds, faces, tracker, smoother, tracks, classes, on_row) -> list[dict]:
    ids = tracker.update(torch.tensor([f.box for f in faces], dtype=torch.float64).reshape(-1, 4), seconds)
    rows = []
    for face, track in zip(faces, ids):
        raw = torch.tensor([face.probabilities[c] for c in classes], dtype=torch.float64)
        probabilities = smoother.smooth(track, raw, seconds).tolist()
        label = classes[max(range(len(classes)), key=probabilities.__getitem__)]
        row = {"path": str(path), "frame": index, "time_s": round(seconds, 4), "track": track, "face": face.index,
               "box": [round(v, 2) for v in face.box], "score": face.score, "class": label,
               "probabilities": dict(zip(classes, probabilities))}
        series = tracks.setdefault(track, TrackSeries(track))
        series.times.append(seconds)
        series.probabilities.append(probabilities)
        series.boxes.append(row["box"])
        on_row(row)
        rows.append(row)
    return rows
