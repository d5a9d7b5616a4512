"""fer_train.inference on videos: a generated clip of a drawn face moving across the frame (PyAV) goes through
`predict` with the real CenterFace detector: one row per frame, one track id throughout, boxes that follow the
face, --every, the annotated MP4, the timeline and summary; the tracker and smoother on their own; damaged,
empty and mislabelled videos give an error naming the file (or a counted skip), never a hang (subprocesses
under a timeout)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import torch

from fer_train.cli import main
from fer_train.config import installed
from fer_train.errors import DataError
from fer_train.inference.tracking import Smoother, Tracker
from fer_train.inference.video import Progress, read_frames
from helpers import FACE_SIZE, REPO, face_scene, png, tiny_run, write, write_video

RATE, FRAMES, STEP = 25, 20, 5  # the face moves STEP pixels a frame
# the clips are made and read with PyAV; the tracker, the smoother and the progress line need no video
needs_pyav = pytest.mark.skipif(not installed("av"), reason="PyAV is not installed: videos cannot be made or read")


def face_at(i: int) -> tuple[int, int]:
    return 10 + STEP * i, 30 + i


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    frames = [face_scene([face_at(i)], height=120, width=160)[0] for i in range(FRAMES)]
    return write_video(tmp_path_factory.mktemp("video") / "moving.mp4", frames, rate=RATE)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("run"))


@needs_pyav
def test_a_moving_face_keeps_one_track_and_its_rows_follow_it(run, clip, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert main(["predict", str(run), str(clip), "-o", str(out), "--annotate", str(tmp_path / "seen"),
                 "--report", str(tmp_path / "report"), "--batch-size", "8"]) == 0
    err = capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["frame"] for r in rows] == list(range(FRAMES))  # one face per frame, every frame
    assert {r["track"] for r in rows} == {1}
    for row in rows:
        x0, y0 = face_at(row["frame"])
        cx, cy = (row["box"][0] + row["box"][2]) / 2, (row["box"][1] + row["box"][3]) / 2
        assert x0 <= cx <= x0 + FACE_SIZE and y0 <= cy <= y0 + FACE_SIZE  # the box is on the face
        assert row["time_s"] == pytest.approx(row["frame"] / RATE, abs=1e-3)
        assert sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert row["class"] == max(row["probabilities"], key=row["probabilities"].get)
    assert "1 video(s): 20 frame(s) processed, 1 track(s)" in err
    assert f"frame {FRAMES}/{FRAMES}" in err and "frames/s" in err  # the progress line
    assert sum(len(b) for b in read_frames(tmp_path / "seen" / "moving.mp4")) == FRAMES
    summary = json.loads((tmp_path / "report" / "moving.summary.json").read_text())
    assert [t["track"] for t in summary["tracks"]] == [1] and summary["tracks"][0]["frames"] == FRAMES
    assert sum(summary["tracks"][0]["share"].values()) == pytest.approx(1)
    assert (tmp_path / "report" / "moving.track-1.png").read_bytes().startswith(b"\x89PNG")
    assert "| 1 |" in (tmp_path / "report" / "moving.summary.md").read_text()


def test_without_pyav_a_video_is_refused_before_any_work(run, tmp_path, capsys, monkeypatch):
    """Without PyAV the command stops at once, naming the video and the package, before it reads any image."""
    import fer_train.inference.predict as predict

    monkeypatch.setattr(predict, "installed", lambda module: module != "av")
    folder = tmp_path / "inputs"
    write(folder / "photo.png", png(face_scene([(20, 20)])[0]))
    write(folder / "clip.mp4", b"not read")
    out = tmp_path / "rows.jsonl"
    assert main(["predict", str(run), str(folder), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {folder / 'clip.mp4'} is a video, and reading videos needs PyAV" in err and "pip install av" in err
    assert not out.exists() or out.read_text() == ""


@needs_pyav
def test_every_nth_frame_and_csv_rows(run, clip, tmp_path):
    out = tmp_path / "rows.csv"
    assert main(["predict", str(run), str(clip), "-o", str(out), "--every", "3", "--smooth", "0"]) == 0
    lines = out.read_text().splitlines()[1:]
    assert [int(line.split(",")[1]) for line in lines] == list(range(0, FRAMES, 3))


def test_the_tracker_keeps_ids_of_faces_that_move_and_cross():
    tracker = Tracker()
    ids = []
    for t in range(12):  # two faces moving towards each other on one row, then past each other
        a = [10 + 8 * t, 50, 50 + 8 * t, 90]
        b = [200 - 8 * t, 56, 240 - 8 * t, 96]
        ids.append(tracker.update(torch.tensor([a, b], dtype=torch.float64), t / 10))
    assert all(i == [1, 2] for i in ids[:6])
    # a face missing for less than max_gap keeps its id; longer, a new one
    assert tracker.update(torch.tensor([[300.0, 300, 340, 340]]), 1.2) == [3]
    assert tracker.update(torch.tensor([[302.0, 300, 342, 340]]), 1.5) == [3]
    assert tracker.update(torch.tensor([[304.0, 300, 344, 340]]), 3.0) == [4]


def test_the_tracker_follows_a_face_by_its_velocity_across_a_gap():
    """Steady motion, then 2 frames unseen: the last box seen does not overlap the face's new box, the box
    predicted from its velocity does."""
    tracker = Tracker(max_gap=5)
    for t in range(4):
        assert tracker.update(torch.tensor([[10.0 * t, 0, 10.0 * t + 30, 30]]), t) == [1]
    assert tracker.update(torch.tensor([[60.0, 0, 90, 30]]), 6) == [1]
    assert tracker.update(torch.tensor([[200.0, 0, 230, 30]]), 7) == [2]  # far from any prediction: a new face
    assert tracker.update(torch.tensor([[70.0, 0, 100, 30]]), 13) == [3]  # unseen longer than max_gap: a new id


def test_the_smoother_is_an_exponential_average_in_time():
    smoother = Smoother(tau=0.5)
    first = torch.tensor([1.0, 0.0])
    assert torch.equal(smoother.smooth(1, first, 0.0), first)
    second = smoother.smooth(1, torch.tensor([0.0, 1.0]), 0.5)
    weight = 1 - math.exp(-1)
    torch.testing.assert_close(second, torch.tensor([1 - weight, weight]))
    assert torch.equal(smoother.smooth(2, torch.tensor([0.3, 0.7]), 0.5), torch.tensor([0.3, 0.7]))  # per track
    assert torch.equal(Smoother(0).smooth(1, torch.tensor([0.2, 0.8]), 1.0), torch.tensor([0.2, 0.8]))


def test_progress_line_counts_frames(capsys):
    import io

    stream = io.StringIO()
    bar = Progress("clip.mp4", 100, stream)
    bar.update(100, final=True)
    assert "clip.mp4: frame 100/100 [########################]" in stream.getvalue()


def _damaged(folder, clip):
    data = clip.read_bytes()
    write(folder / "truncated.mp4", data[: len(data) // 2])  # the index (moov) is at the end: cut off
    write(folder / "zero-bytes.mp4", b"")
    write(folder / "noise.mkv", bytes(range(256)) * 40)
    write(folder / "notes.avi", b"this is a text file named like a video\n")
    import av
    with av.open(str(folder / "no-frames.mp4"), "w") as container:  # a stream, no frame
        stream = container.add_stream("libx264", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
        container.mux(stream.encode(None))
    return ["truncated.mp4", "zero-bytes.mp4", "noise.mkv", "notes.avi", "no-frames.mp4"]


@needs_pyav
def test_damaged_and_empty_videos_are_errors_naming_the_file(clip, tmp_path):
    for name in _damaged(tmp_path, clip):
        with pytest.raises(DataError, match=name):
            list(read_frames(tmp_path / name))


@needs_pyav
def test_a_folder_of_images_and_good_and_bad_videos_in_one_run(run, clip, tmp_path):
    """In a subprocess with a timeout: a damaged video must never hang the command."""
    folder = tmp_path / "mixed"
    bad = _damaged(folder, clip)
    write(folder / "good.mp4", clip.read_bytes())
    write(folder / "photo.png", png(face_scene([(20, 20), (100, 40)])[0]))
    out = tmp_path / "rows.csv"
    done = subprocess.run([sys.executable, "-m", "fer_train", "predict", str(run), str(folder), "-o", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in bad:
        assert f"{name}" in done.stderr
    assert f"6 video(s): {FRAMES} frame(s) processed, 1 track(s), 5 unreadable" in done.stderr
    assert "1 image(s): 2 face(s) in 1" in done.stderr
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"].rsplit("/", 1)[1] for r in rows if r["error"]) == sorted(bad)
    assert {r["track"] for r in rows if r["path"].endswith("good.mp4")} == {"1"}
    strict = subprocess.run([sys.executable, "-m", "fer_train", "predict", str(run), str(folder), "-o", str(out),
                             "--strict"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert strict.returncode == 2 and strict.stderr.count("error:") == 1
