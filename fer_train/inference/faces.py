"""Cutting faces out of whole images as the training data frames them, in one fer_kernels.augment pass.

A model trained on FERPlus saw tight 48 x 48 crops through the evaluation transform (shorter side resized,
centre crop, normalisation; fer_train.recipe.augmentation with train=False). Here each detected box becomes
a square face box around the box's centre, (1 + margin) times its longer side (the margin that gives the
best accuracy was measured: docs/inference.md); with landmarks the square is turned so that the eyes are
level; the evaluation transform is then applied to that square, straight from the decoded frame: one 2 x 3
matrix per face, no intermediate crop.

    batch = crop_faces(images, owners, boxes, landmarks, transform, margin=0.0)   # N x 3 x S x S, normalised
"""

from __future__ import annotations

import math

import torch

from fer_train.errors import ConfigError
from fer_train.recipe.augmentation import AugmentConfig, AugmentParams, apply, full_boxes, sample_params

__all__ = ["COLOURS", "augment_config", "crop_faces", "eye_angles", "face_squares", "face_matrices"]

COLOURS = ("rgb", "grey")  # what a model's input transform may ask for: colour as is, or grey (saturation 0)
_FOOTPRINT_PAD = 2  # pixels around a face's sampling footprint kept in its view (bilinear taps, rounding)


def augment_config(transform: dict) -> AugmentConfig:
    """The evaluation AugmentConfig of a model's input transform (LoadedModel.input_transform)."""
    try:
        return AugmentConfig(out_size=int(transform["size"]), resize=int(transform["resize"]),
                             mean=tuple(transform["mean"]), std=tuple(transform["std"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"the model's input transform {transform} lacks size, resize, mean or std ({err})") from None


def _colour(transform: dict, n: int) -> torch.Tensor:
    colour = transform.get("colour", "rgb")
    if colour not in COLOURS:
        raise ConfigError(f"the model's input transform has colour {colour!r}; expected one of {COLOURS}")
    saturation = 0.0 if colour == "grey" else 1.0  # augment's saturation step at 0 gives the grey of each pixel
    return torch.tensor([[1.0, 1.0, saturation, 0.0]]).expand(n, 4).contiguous()


def face_squares(boxes: torch.Tensor, margin: float) -> torch.Tensor:
    """N x 4 squares (x0, y0, x1, y1) centred on the boxes, (1 + margin) times their longer side."""
    boxes = boxes.double().reshape(-1, 4)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).amax(1, keepdim=True).clamp_min(1.0) * (1 + margin) / 2
    return torch.cat([centre - half, centre + half], 1)


def eye_angles(landmarks: torch.Tensor | None, n: int) -> torch.Tensor:
    """Radians by which each face's eye line (landmarks 0 -> 1) is turned from level; 0 without landmarks
    (None, or NaN for faces whose detector gave none)."""
    if landmarks is None:
        return torch.zeros(n, dtype=torch.float64)
    eyes = landmarks.double().reshape(-1, 5, 2)
    d = eyes[:, 1] - eyes[:, 0]
    return torch.atan2(d[:, 1], d[:, 0]).nan_to_num(0.0)


def face_matrices(squares: torch.Tensor, angles: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
    """N x 2 x 3 float64 output-pixel -> source-pixel matrices: the evaluation transform of each square
    (sample_params, train=False), then the turn by its angle about the square's centre, so that the output's
    horizontal runs along the eye line."""
    base = sample_params(squares, train=False, config=config).matrices.double()
    angles = torch.as_tensor(angles, dtype=torch.float64)
    cos, sin = torch.cos(angles), torch.sin(angles)
    turn = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # N x 2 x 2
    centre = ((squares[:, :2] + squares[:, 2:]) / 2 - 0.5)[..., None]  # in pixel index coordinates
    linear = turn @ base[:, :, :2]
    shift = turn @ (base[:, :, 2:] - centre) + centre
    return torch.cat([linear, shift], -1)


def _views(images: list[torch.Tensor], matrices: torch.Tensor, size: int):
    """Per face, the part of its image its output can sample (the mapped output square plus a border) and
    the matrix shifted to that view: the same result as sampling the whole image (the mirrored border is
    the image's own wherever the view touches an edge), without the reference backend converting the whole
    frame once per face."""
    corners = torch.tensor([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=torch.float64)
    views, shifted = [], matrices.clone()
    for i, image in enumerate(images):
        height, width = image.shape[-2:]
        points = corners @ matrices[i].T  # 4 x 2 source positions
        x0 = min(max(math.floor(points[:, 0].min()) - _FOOTPRINT_PAD, 0), width - 1)
        y0 = min(max(math.floor(points[:, 1].min()) - _FOOTPRINT_PAD, 0), height - 1)
        x1 = max(min(math.ceil(points[:, 0].max()) + _FOOTPRINT_PAD + 1, width), x0 + 1)
        y1 = max(min(math.ceil(points[:, 1].max()) + _FOOTPRINT_PAD + 1, height), y0 + 1)
        if x0 > 0 or y0 > 0 or x1 < width or y1 < height:
            inside = points[:, 0].min() >= x0 and points[:, 1].min() >= y0 and \
                points[:, 0].max() <= x1 - 1 and points[:, 1].max() <= y1 - 1
            if inside:  # a view that cuts off part of the footprint would mirror about the wrong edge
                image = image[:, y0:y1, x0:x1]
                shifted[i, 0, 2] -= x0
                shifted[i, 1, 2] -= y0
        views.append(image)
    return views, shifted


def crop_faces(images: list[torch.Tensor], owners: list[int], boxes: torch.Tensor | None,
               landmarks: torch.Tensor | None, transform: dict, margin: float = 0.0, align: bool = True,
               channels_last: bool = False) -> torch.Tensor:
    """The model-ready batch (float32 N x 3 x S x S on the images' device) of N faces: face k lies in
    images[owners[k]] at boxes[k] (None: the whole image is the face, as for pre-cropped faces).
    landmarks: N x 5 x 2 or None; align: level the eyes where landmarks exist."""
    config = augment_config(transform)
    sources = [images[i] for i in owners]
    n = len(sources)
    if boxes is None:
        squares = full_boxes([s.shape[-2:] for s in sources])
        matrices = sample_params(squares, train=False, config=config).matrices.double()
    else:
        angles = eye_angles(landmarks if align else None, n)
        matrices = face_matrices(face_squares(boxes, margin), angles, config)
    views, matrices = _views(sources, matrices, config.out_size)
    params = AugmentParams(matrices.float().to(views[0].device) if n else matrices.float(),
                           _colour(transform, n).to(views[0].device) if n else _colour(transform, 0), config)
    return apply(views, params, channels_last=channels_last)
