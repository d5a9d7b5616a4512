"""FaceExpressionRecognizer: find every face in images and classify its expression, with the model's own
evaluation transform and calibrated probabilities.

    from fer_train import FaceExpressionRecognizer
    recognizer = FaceExpressionRecognizer("runs/RUN", detector="centerface", device="auto")
    faces = recognizer.detect("party.jpg")             # [Face(box, score, landmarks, probabilities), ...]
    faces[0].label, faces[0].probabilities["happy"]
    per_image = recognizer.detect([frame1, frame2])    # a list in: one list of faces per image, one pass each
    recognizer.classify([crop1, crop2])                # faces already cut out: each whole image is the face

An image is a path, a numpy array (H x W grey, H x W x 3 RGB, or RGBA: alpha is dropped; OpenCV's BGR arrays
need image[..., ::-1] first), a PIL image or a uint8 torch tensor (C x H x W, or H x W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fer_train.errors import ConfigError
from fer_train.inference.classifier import Classifier, load_classifier
from fer_train.inference.detect import MAX_SIDE, Detections, Detector, make_detector
from fer_train.inference.faces import crop_faces

__all__ = ["Face", "FaceExpressionRecognizer", "as_image"]


@dataclass
class Face:
    """One face: box (x0, y0, x1, y1) in pixels of the image given; score: the detector's confidence (None
    where it gives none, or for a whole-image face); landmarks: 5 (x, y) points (eyes, nose, mouth corners)
    or None; probabilities: {class: calibrated probability}; index: its place in the image, left to right."""

    box: tuple[float, float, float, float]
    score: float | None
    landmarks: list[tuple[float, float]] | None
    probabilities: dict[str, float]
    index: int = 0

    @property
    def label(self) -> str:
        """The most probable class."""
        return max(self.probabilities, key=self.probabilities.get)


def as_image(image) -> torch.Tensor:
    """uint8 C x H x W (C 1 or 3) of a path (fer_train.data.images.load), numpy array, PIL image or tensor."""
    if isinstance(image, (str, Path)):
        from fer_train.data.images import load
        return load(image)
    if isinstance(image, torch.Tensor):
        tensor = image if image.dim() == 3 else image[None] if image.dim() == 2 else None
        if tensor is None or tensor.dtype != torch.uint8 or tensor.shape[0] not in (1, 3, 4):
            raise ValueError(f"an image tensor must be uint8 C x H x W (C 1, 3 or 4) or H x W, got {image.dtype} "
                             f"{tuple(image.shape)}")
        return tensor[:3] if tensor.shape[0] == 4 else tensor
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        image = np.asarray(image.convert("L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.ndim == 3 and image.shape[2] not in (1, 3, 4):
            raise ValueError(f"an image array must be uint8 H x W or H x W x C (C 1, 3 or 4), got {image.dtype} "
                             f"{image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(image) if image.flags.writeable else image.copy())
        return tensor[None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)[:3]
    raise TypeError(f"cannot read {type(image).__name__} as an image: give a path, a numpy array, a PIL image or "
                    "a uint8 tensor")


class FaceExpressionRecognizer:
    """model: a run folder, .pt or .onnx file, or a loaded model (fer_train.checkpoint.LoadedModel);
    detector: "centerface" (default), "haar", or a function rgb -> boxes (fer_train.inference.detect);
    device: "auto", "cpu", "cuda", "cuda:N"; threshold: the detector's confidence threshold (default: the
    detector's own); margin: the crop margin (default: the one measured for the detector); align: level the
    eyes where the detector gives landmarks; batch_size: faces per classifier pass; detect_size: the longest
    side the detector sees (larger images are shrunk for detection only)."""

    def __init__(self, model, detector="centerface", device: str | torch.device = "auto",
                 threshold: float | None = None, margin: float | None = None, align: bool = True,
                 batch_size: int = 64, detect_size: int = MAX_SIDE):
        from fer_train.distributed import select_device

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch size {batch_size!r}: must be a whole number of at least 1")
        self.device = select_device(device) if isinstance(device, str) else torch.device(device)
        self.classifier: Classifier = load_classifier(model, self.device)
        self._detector_spec = (detector, threshold, detect_size)
        self._detector: Detector | None = None
        self._margin = margin
        if margin is not None and not -0.5 < margin < 3:
            raise ConfigError(f"crop margin {margin}: expected a value between -0.5 and 3 (0.2 = 20% around the box)")
        self.align = align
        self.batch_size = batch_size

    @property
    def classes(self) -> tuple[str, ...]:
        return self.classifier.classes

    @property
    def detector(self) -> Detector:
        """Made on first use: whole-image classification needs no detector (nor its model file)."""
        if self._detector is None:
            spec, threshold, size = self._detector_spec
            self._detector = make_detector(spec, self.device, threshold, size)
        return self._detector

    @property
    def margin(self) -> float:
        return self.detector.margin if self._margin is None else self._margin

    # ------------------------------------------------------------------------------------------- API

    def detect(self, images):
        """Faces of one image (a list of Face), or of each image of a list (a list of lists)."""
        single = not isinstance(images, (list, tuple))
        tensors = [as_image(im) for im in ([images] if single else images)]
        found = self.process(tensors)
        return found[0] if single else found

    def classify(self, faces):
        """Faces already cut out (one image, or a list): each whole image is the face (the evaluation
        transform of training, as for the data sets). Returns a Face, or a list of them, with the whole
        image as box and no score."""
        single = not isinstance(faces, (list, tuple))
        tensors = [as_image(im) for im in ([faces] if single else faces)]
        found = self.process(tensors, whole_image=True)
        flat = [f[0] for f in found]
        return flat[0] if single else flat

    # ------------------------------------------------------------------------------------------- batches

    def find(self, images: list[torch.Tensor]) -> list[Detections]:
        """One detector pass over uint8 C x H x W images (on any device)."""
        return self.detector([_moved(im, self.device) for im in images]) if images else []

    def process(self, images: list[torch.Tensor], whole_image: bool = False,
                detections: list[Detections] | None = None) -> list[list[Face]]:
        """Per image, its faces: one detector pass (or the detections given), one crop pass, classifier
        passes of batch_size faces. whole_image: each image is one face."""
        # one copy of each image where the faces are cut out, the classifier's device (an ONNX model's is the
        # CPU), used by the detector too when it runs there
        images = [_moved(im, self.classifier.device) for im in images]
        if whole_image:
            detections = [Detections(torch.tensor([[0.0, 0.0, im.shape[-1], im.shape[-2]]]), torch.tensor([math.nan]))
                          for im in images]
        elif detections is None:
            detections = self.find(images)
        owners = [i for i, d in enumerate(detections) for _ in range(len(d))]
        boxes = torch.cat([d.boxes for d in detections]) if owners else torch.zeros(0, 4)
        probabilities = self._classify(images, owners, None if whole_image else boxes,
                                       _landmarks(detections) if not whole_image else None)
        out: list[list[Face]] = [[] for _ in images]
        for k, owner in enumerate(owners):
            d, index = detections[owner], len(out[owner])
            score = float(d.scores[index])
            marks = d.landmarks[index].tolist() if d.landmarks is not None else None
            out[owner].append(Face(tuple(float(v) for v in boxes[k]), None if math.isnan(score) else score,
                                   [tuple(p) for p in marks] if marks is not None else None,
                                   dict(zip(self.classes, probabilities[k].tolist())), index))
        return out

    def _classify(self, images, owners, boxes, landmarks) -> torch.Tensor:
        if not owners:
            return torch.zeros(0, len(self.classes))
        chunks = []
        for start in range(0, len(owners), self.batch_size):
            part = owners[start:start + self.batch_size]
            used = sorted(set(part))
            local = {i: k for k, i in enumerate(used)}
            batch = crop_faces([images[i] for i in used], [local[i] for i in part],
                               None if boxes is None else boxes[start:start + len(part)],
                               None if landmarks is None else landmarks[start:start + len(part)],
                               self.classifier.input_transform, self.margin if boxes is not None else 0.0,
                               self.align, channels_last=self.classifier.channels_last)
            chunks.append(self.classifier.probabilities(batch))
        return torch.cat(chunks)


def _landmarks(detections: list[Detections]) -> torch.Tensor | None:
    """N x 5 x 2 of all faces, NaN for faces of images whose detector gave none; None if none did."""
    if all(d.landmarks is None for d in detections):
        return None
    return torch.cat([d.landmarks if d.landmarks is not None else torch.full((len(d), 5, 2), math.nan)
                      for d in detections])


def _moved(image: torch.Tensor, device) -> torch.Tensor:
    """`image` on `device`; asynchronously only towards a GPU: a copy from a GPU to the host that does not wait
    could be read (by the crops, by onnxruntime) before it has arrived."""
    device = torch.device(device)
    return image.to(device, non_blocking=device.type == "cuda")
