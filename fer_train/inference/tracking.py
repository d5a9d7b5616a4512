"""Keeping a face's identity across video frames, and smoothing its expression over time.

Tracker: each track predicts its next box from its last two (constant velocity), detections are matched to
predictions greedily by IoU (highest first, at least min_iou), an unmatched detection starts a new track
(ids 1, 2, ... in order of appearance), and a track unmatched for longer than max_gap seconds ends, so a
face that leaves and comes back later gets a new id. Smoother: per track, an exponential moving average of
the probabilities with time constant tau seconds, weighted by the time since the track's previous frame
(so --every N smooths over the same seconds): p <- p + (1 - exp(-dt / tau)) (new - p); tau 0 turns it off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torchvision.ops import box_iou

__all__ = ["Smoother", "Track", "Tracker"]


@dataclass
class Track:
    id: int
    box: torch.Tensor  # float64 x0, y0, x1, y1 at the last frame seen
    time: float  # seconds, last frame seen
    velocity: torch.Tensor = field(default_factory=lambda: torch.zeros(4, dtype=torch.float64))  # per second

    def predict(self, time: float) -> torch.Tensor:
        return self.box + self.velocity * (time - self.time)


class Tracker:
    """update(boxes N x 4, time in seconds) -> N track ids, one per box in order."""

    def __init__(self, min_iou: float = 0.3, max_gap: float = 1.0):
        if not 0 < min_iou < 1 or max_gap < 0:
            raise ValueError(f"Tracker: min_iou {min_iou} must be in (0, 1) and max_gap {max_gap} >= 0")
        self.min_iou, self.max_gap = min_iou, max_gap
        self.tracks: list[Track] = []
        self.next_id = 1

    def update(self, boxes: torch.Tensor, time: float) -> list[int]:
        self.tracks = [t for t in self.tracks if time - t.time <= self.max_gap]
        boxes = boxes.double().reshape(-1, 4)
        ids: list[int | None] = [None] * len(boxes)
        if self.tracks and len(boxes):
            predicted = torch.stack([t.predict(time) for t in self.tracks])
            overlap = box_iou(predicted, boxes)
            pairs = sorted(((float(overlap[t, d]), t, d) for t in range(len(self.tracks)) for d in range(len(boxes))
                            if overlap[t, d] >= self.min_iou), reverse=True)
            used = set()
            for _, t, d in pairs:
                if t in used or ids[d] is not None:
                    continue
                used.add(t)
                ids[d] = self._follow(self.tracks[t], boxes[d], time)
        for d, box in enumerate(boxes):
            if ids[d] is None:
                self.tracks.append(Track(self.next_id, box.clone(), time))
                ids[d] = self.next_id
                self.next_id += 1
        return ids

    @staticmethod
    def _follow(track: Track, box: torch.Tensor, time: float) -> int:
        dt = time - track.time
        if dt > 0:  # a smoothed velocity: detector jitter alone should not fling the prediction
            track.velocity = 0.5 * track.velocity + 0.5 * (box - track.box) / dt
        track.box, track.time = box.clone(), time
        return track.id


class Smoother:
    """smooth(track id, probabilities tensor, time) -> the track's smoothed probabilities."""

    def __init__(self, tau: float = 0.5):
        if tau < 0 or not math.isfinite(tau):
            raise ValueError(f"Smoother: the time constant must be >= 0 seconds, got {tau}")
        self.tau = tau
        self.state: dict[int, tuple[torch.Tensor, float]] = {}

    def smooth(self, track: int, probabilities: torch.Tensor, time: float) -> torch.Tensor:
        previous = self.state.get(track)
        if previous is None or self.tau == 0:
            value = probabilities.clone()
        else:
            old, then = previous
            weight = 1 - math.exp(-max(time - then, 0.0) / self.tau)
            value = old + weight * (probabilities - old)
        self.state[track] = (value, time)
        return value
