"""fer_train.inference on photos: the detectors (CenterFace in onnxruntime and its torch port, Haar, a
caller's function), the crops (face square, eye alignment, grey models, the evaluation transform), the
FaceExpressionRecognizer API and `predict` on files.

What the real detector is tested on: CenterFace finds the cartoon faces of fer_train.data.readers.synthetic
(helpers.face_scene) but frames their inner features (eyes to mouth), not the pasted square, so its tests
assert recall, that each box lies inside its square and a loose overlap (IoU >= 0.25), and no detection on
the bare background. Exact boxes, crops and classes are tested with a stub detector and a model whose
output is a known function of the crop's grey level (Levels)."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.ops import box_iou

from fer_kernels.reference import IMAGENET_MEAN, IMAGENET_STD
from fer_train.checkpoint import LoadedModel
from fer_train.cli import main
from fer_train.data import CLASSES, DataError
from fer_train.errors import ConfigError
from fer_train.inference import FaceExpressionRecognizer
from fer_train.inference.centerface import CenterFaceNet
from fer_train.inference.detect import CenterFace, Haar, make_detector
from fer_train.inference.faces import crop_faces, face_matrices, face_squares
from fer_train.inference.outputs import RowWriter
from fer_train.inference.predict import collect_inputs
from fer_train.inference.recognizer import as_image
from fer_train.recipe.augmentation import AugmentConfig, sample_params
from helpers import face_scene, huge_header, jpeg, png, tiny_run, write

LEVELS = [16 + 32 * k for k in range(8)]  # Levels() maps each grey level to its own class
TRANSFORM = {"size": 32, "resize": 36, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "colour": "rgb"}
PLACES = [(20, 20), (110, 30), (60, 100), (170, 95)]


class Levels(nn.Module):
    def forward(self, images):
        centres = torch.tensor([(v / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0] for v in LEVELS])
        return -20 * (images[:, 0].mean((1, 2))[:, None] - centres) ** 2


def levels_model(temperature: float = 1.0, transform: dict = TRANSFORM) -> LoadedModel:
    return LoadedModel(Levels(), None, CLASSES, dict(transform), temperature, 0, "levels")


def squares_image(boxes, levels, height=120, width=200, background=0) -> torch.Tensor:
    image = torch.full((3, height, width), background, dtype=torch.uint8)
    for (x0, y0, x1, y1), level in zip(boxes, levels):
        image[:, y0:y1, x0:x1] = level
    return image


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("run"))


# ---------------------------------------------------------------------------------------------- detectors

def test_centerface_finds_the_faces_of_a_scene_and_nothing_on_its_background():
    image, boxes = face_scene(PLACES)
    found = CenterFace()([image])[0]
    assert len(found) == len(PLACES)
    overlap = box_iou(boxes, found.boxes)
    assert overlap.max(1).values.min() >= 0.25
    match = overlap.argmax(1)
    assert sorted(match.tolist()) == list(range(len(PLACES)))  # one detection per face
    inside = (found.boxes[match, :2] >= boxes[:, :2] - 2).all() and (found.boxes[match, 2:] <= boxes[:, 2:] + 2).all()
    assert inside
    assert found.landmarks.shape == (len(PLACES), 5, 2)
    assert (found.scores > 0.3).all() and (found.scores <= 1).all()
    assert found.boxes[:, 0].tolist() == sorted(found.boxes[:, 0].tolist())  # left to right
    blank = CenterFace()([torch.full((3, 160, 240), 110, dtype=torch.uint8)])[0]
    assert len(blank) == 0


def test_the_torch_port_matches_onnxruntime():
    image, _ = face_scene(PLACES)
    batch = torch.cat([image[None].float(), torch.rand(1, 3, 160, 240, generator=torch.Generator().manual_seed(0))
                       * 255])[:, :, :160, :224]
    ours = CenterFaceNet("torch", "cpu")(batch)
    theirs = CenterFaceNet("onnxruntime", "cpu")(batch)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-4
    assert torch.equal(torch.tensor(ours[0].shape), torch.tensor([2, 1, 40, 56]))  # stride 4


def test_a_batch_of_images_of_several_sizes_equals_one_image_at_a_time():
    scene, _ = face_scene(PLACES)
    images = [scene, scene[:, :120, :200].contiguous(), scene[:1], torch.flip(scene, [2])]
    detector = CenterFace()
    together = detector(images)
    for image, found in zip(images, together):
        alone = detector([image])[0]
        torch.testing.assert_close(found.boxes, alone.boxes)
        torch.testing.assert_close(found.scores, alone.scores)


def test_large_images_are_shrunk_for_detection_and_boxes_come_back_in_their_pixels():
    scene, boxes = face_scene(PLACES)
    big = torch.nn.functional.interpolate(scene[None].float(), scale_factor=3, mode="nearest")[0].to(torch.uint8)
    found = CenterFace(max_side=240)([big])[0]  # the detector sees the 240 x 160 scene
    small = CenterFace()([scene])[0]
    torch.testing.assert_close(found.boxes, small.boxes * 3, atol=6, rtol=0)


def test_haar_and_a_callers_function_give_detections():
    found = Haar()([face_scene(PLACES)[0]])[0]
    assert found.boxes.shape[1] == 4 and found.landmarks is None and found.scores.isnan().all()

    def boxes_with_scores(rgb):
        assert rgb.shape == (50, 60, 3) and rgb.dtype == np.uint8
        return [[30, 5, 50, 25, 0.9], [1, 2, 11, 12, 0.5]]

    found = make_detector(boxes_with_scores)([torch.zeros(1, 50, 60, dtype=torch.uint8)])[0]
    assert found.boxes.tolist() == [[1, 2, 11, 12], [30, 5, 50, 25]]  # left to right
    assert found.scores.tolist() == pytest.approx([0.5, 0.9])
    marks = np.zeros((1, 5, 2))
    found = make_detector(lambda rgb: (np.array([[10, 10, 5, 5]]), [0.7], marks))([torch.zeros(3, 20, 20,
                                                                                                dtype=torch.uint8)])[0]
    assert found.boxes.tolist() == [[5, 5, 10, 10]] and found.landmarks.shape == (1, 5, 2)
    for bad, message in ((lambda rgb: [[1, 2, 3]], "N x 4"), (lambda rgb: ([[0, 0, 5, 5]], [0.1, 0.2]), "scores"),
                         (lambda rgb: "boxes", "not numbers")):
        with pytest.raises(ConfigError, match=message):
            make_detector(bad)([torch.zeros(3, 20, 20, dtype=torch.uint8)])
    with pytest.raises(ConfigError, match="centerface, haar"):
        make_detector("retina")
    with pytest.raises(ConfigError, match="between 0 and 1"):
        make_detector("centerface", threshold=1.5)


# ---------------------------------------------------------------------------------------------- crops

def test_an_unturned_face_square_is_the_evaluation_transform_of_that_square():
    config = AugmentConfig(out_size=32, resize=36)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 70.0], [0.0, 0.0, 30.0, 30.0]])
    squares = face_squares(boxes, 0.25)
    assert squares[0].tolist() == pytest.approx([-1.25, 13.75, 61.25, 76.25])  # 1.25 x the longer side
    torch.testing.assert_close(face_matrices(squares, torch.zeros(2), config).float(),
                               sample_params(squares, train=False, config=config).matrices)


def test_faces_are_turned_so_that_the_eyes_are_level():
    """A bright line through the face's centre at 30 degrees, eyes on it: the aligned crop shows it level."""
    angle = math.radians(30)
    y, x = torch.meshgrid(torch.arange(200.0), torch.arange(200.0), indexing="ij")
    distance = ((y - 100) * math.cos(angle) - (x - 100) * math.sin(angle)).abs()
    image = torch.where(distance < 4, 255, 0).to(torch.uint8)[None].expand(3, -1, -1).contiguous()
    eyes = torch.tensor([[100 - 30 * math.cos(angle), 100 - 30 * math.sin(angle)],
                         [100 + 30 * math.cos(angle), 100 + 30 * math.sin(angle)]])
    marks = torch.cat([eyes, torch.zeros(3, 2)])[None]
    box = torch.tensor([[60.0, 60.0, 140.0, 140.0]])
    aligned = crop_faces([image], [0], box, marks, TRANSFORM, align=True)[0, 0]
    plain = crop_faces([image], [0], box, marks, TRANSFORM, align=False)[0, 0]
    row, column = aligned[16].mean() - aligned.mean(), aligned[:, 16].mean() - aligned.mean()
    assert row > 1.0 and column < 0.5  # the middle row runs along the line
    assert plain[16].mean() - plain.mean() < row / 2


def test_a_grey_model_sees_grey_and_a_region_equals_the_whole_image_sampled_there():
    image = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    box = torch.tensor([[30.0, 20.0, 70.0, 60.0]])
    grey = crop_faces([image], [0], box, None, {**TRANSFORM, "colour": "grey"})[0]
    unnormalised = grey * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    torch.testing.assert_close(unnormalised[0], unnormalised[1], atol=1e-5, rtol=0)
    # the view cut around a face samples what the whole image gives (reference backend on the whole image)
    from fer_train.inference.faces import augment_config, _colour
    from fer_train.recipe.augmentation import AugmentParams, apply
    matrices = face_matrices(face_squares(box, 0.0), torch.tensor([0.3]), augment_config(TRANSFORM))
    whole = apply([image], AugmentParams(matrices.float(), _colour(TRANSFORM, 1), augment_config(TRANSFORM)))
    marks = torch.tensor([[[40.0, 30.0], [40 + 10 * math.cos(0.3), 30 + 10 * math.sin(0.3)], [0, 0], [0, 0], [0, 0]]])
    torch.testing.assert_close(crop_faces([image], [0], box, marks, TRANSFORM), whole, atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="colour 'sepia'"):
        crop_faces([image], [0], box, None, {**TRANSFORM, "colour": "sepia"})


# ---------------------------------------------------------------------------------------------- the API

def test_the_recognizer_classifies_each_detected_face_with_calibrated_probabilities():
    boxes = [(10, 10, 50, 50), (120, 30, 170, 80), (70, 60, 110, 100)]  # squares: the crop stays inside
    levels = [LEVELS[5], LEVELS[2], LEVELS[7]]
    image = squares_image(boxes, levels)
    stub = lambda rgb: [list(b) + [0.8] for b in boxes]  # noqa: E731
    recognizer = FaceExpressionRecognizer(levels_model(temperature=2.0), detector=stub, device="cpu", margin=0.0)
    faces = recognizer.detect(image)
    assert [f.box for f in faces] == [(10, 10, 50, 50), (70, 60, 110, 100), (120, 30, 170, 80)]
    assert [f.index for f in faces] == [0, 1, 2]
    assert [f.label for f in faces] == [CLASSES[5], CLASSES[7], CLASSES[2]]
    assert all(f.score == pytest.approx(0.8) and f.landmarks is None for f in faces)
    # calibrated: softmax(logits / 2) of the crop's mean level
    crop = crop_faces([image], [0], torch.tensor([[10.0, 10, 50, 50]]), None, TRANSFORM)
    want = (Levels()(crop) / 2).softmax(1)[0]
    assert list(faces[0].probabilities.values()) == pytest.approx(want.tolist(), abs=1e-6)
    # a list in: one detector pass, one list per image; every kind of image
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    many = recognizer.detect([image, pil, np.asarray(pil), image[:1], torch.zeros(3, 40, 40, dtype=torch.uint8)])
    assert [len(f) for f in many] == [3, 3, 3, 3, 1]  # on the 40 x 40 image: one box cut to it, two outside
    assert [f.label for f in many[3]] == [f.label for f in faces]


def test_as_image_reads_arrays_pil_images_tensors_and_paths(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    want = torch.from_numpy(rgb).permute(2, 0, 1)
    assert torch.equal(as_image(rgb), want)
    assert torch.equal(as_image(np.dstack([rgb, np.full((6, 7), 9, np.uint8)])), want)  # alpha dropped
    assert torch.equal(as_image(Image.fromarray(rgb)), want)
    assert torch.equal(as_image(rgb[..., 0]), want[:1])
    assert as_image(Image.fromarray(rgb[..., 0])).shape == (1, 6, 7)
    assert torch.equal(as_image(want), want)
    assert torch.equal(as_image(write(tmp_path / "a.png", png(want))), want)
    for bad in (rgb.astype(np.float32), np.zeros((2, 3, 5), np.uint8), torch.zeros(3, 4, 4)):
        with pytest.raises(ValueError, match="uint8"):
            as_image(bad)
    with pytest.raises(TypeError, match="cannot read"):
        as_image(3.5)


def test_classify_takes_each_image_as_the_face_png_jpeg_and_grey(tmp_path):
    """Pre-cropped faces (the old whole-image predict): files of every kind, each its own class."""
    paths = []
    for k, level in enumerate(LEVELS):
        channels = 1 if k % 3 == 2 else 3  # grey files among the colour ones
        image = torch.full((channels, 40 + 3 * k, 50), level, dtype=torch.uint8)
        paths.append(write(tmp_path / f"face{k}.{'jpg' if k % 2 else 'png'}", jpeg(image) if k % 2 else png(image)))
    recognizer = FaceExpressionRecognizer(levels_model(), device="cpu", batch_size=3)
    faces = recognizer.classify(paths)
    for k, face in enumerate(faces):
        assert list(face.probabilities) == list(CLASSES)
        assert sum(face.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        assert face.label == CLASSES[k]
        assert face.score is None and face.box == (0.0, 0.0, 50.0, 40.0 + 3 * k)
    assert recognizer._detector is None  # whole images need no detector


def test_bad_recognizer_settings_are_config_errors():
    with pytest.raises(ConfigError, match="batch size"):
        FaceExpressionRecognizer(levels_model(), device="cpu", batch_size=0)
    with pytest.raises(ConfigError, match="margin"):
        FaceExpressionRecognizer(levels_model(), device="cpu", margin=-2)
    with pytest.raises(ConfigError, match="does not exist"):
        FaceExpressionRecognizer("missing-run/best.pt", device="cpu")


# ---------------------------------------------------------------------------------------------- inputs and rows

def test_collect_inputs(tmp_path):
    (tmp_path / "set" / "sub").mkdir(parents=True)
    for name in ("set/b.png", "set/a.JPG", "set/sub/c.webp", "set/notes.txt", "set/clip.MP4", "set/d.tif", "loose.png"):
        (tmp_path / name).write_bytes(b"x")
    images, videos = collect_inputs([tmp_path / "loose.png", tmp_path / "set", str(tmp_path / "set" / "b.png")])
    assert images == [tmp_path / "loose.png", tmp_path / "set" / "a.JPG", tmp_path / "set" / "b.png",
                      tmp_path / "set" / "d.tif", tmp_path / "set" / "sub" / "c.webp"]
    assert videos == [tmp_path / "set" / "clip.MP4"]
    with pytest.raises(DataError, match="missing.png"):
        collect_inputs([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no faces")
    with pytest.raises(DataError, match="empty.*no image or video"):
        collect_inputs([tmp_path / "empty"])


def test_rows_round_trip_through_csv_json_and_jsonl(tmp_path, capsys):
    rows = [{"path": f"faces/{k}.png", "face": k, "box": [1.5, 2.0, 30.25, 40.0], "score": 0.75, "class": CLASSES[k],
             "probabilities": dict(zip(CLASSES, torch.randn(8, generator=torch.Generator().manual_seed(k))
                                       .softmax(0).tolist()))} for k in range(3)]
    rows.append({"path": "empty.png", "face": None, "box": None, "score": None, "class": None, "probabilities": None})
    for name in ("out.json", "out.jsonl", "out.csv", "-"):
        writer = RowWriter(name if name == "-" else str(tmp_path / name), CLASSES)
        for row in rows:
            writer.write(row)
        writer.close()
    assert json.loads((tmp_path / "out.json").read_text()) == rows
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()] == rows
    assert json.loads(capsys.readouterr().out) == rows
    with open(tmp_path / "out.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == ["path", "frame", "time_s", "track", "face", "x0", "y0", "x1", "y1", "score", "class",
                             *CLASSES, "error"]
    for row, line in zip(rows[:3], read):
        assert [float(line[k]) for k in ("x0", "y0", "x1", "y1")] == row["box"]
        assert {c: float(line[c]) for c in CLASSES} == row["probabilities"]  # exact: repr of each float
        assert line["class"] == row["class"] and int(line["face"]) == row["face"] and line["frame"] == ""
    assert read[3]["face"] == read[3]["class"] == read[3]["x0"] == ""


# ---------------------------------------------------------------------------------------------- the command

def test_predict_detects_faces_counts_images_without_one_and_goes_on_past_bad_files(run, tmp_path, capsys):
    folder = tmp_path / "photos"
    scene, boxes = face_scene(PLACES)
    write(folder / "scene.png", png(scene))
    write(folder / "grey.jpg", jpeg(scene[:1].contiguous()))
    write(folder / "blank.png", png(torch.full((3, 60, 80), 110, dtype=torch.uint8)))
    write(folder / "broken.jpg", b"not an image at all")
    write(folder / "huge.png", huge_header(png(scene), 10_000, 10_000))
    out = tmp_path / "rows.csv"
    assert main(["predict", str(run), str(folder), "-o", str(out), "--annotate", str(tmp_path / "seen")]) == 0
    err = capsys.readouterr().err
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    by_file = {}
    for row in rows:
        by_file.setdefault(row["path"].rsplit("/", 1)[1], []).append(row)
    assert len(by_file["scene.png"]) == len(by_file["grey.jpg"]) == len(PLACES)
    got = torch.tensor([[float(r[k]) for k in ("x0", "y0", "x1", "y1")] for r in by_file["scene.png"]])
    assert box_iou(boxes, got).max(1).values.min() >= 0.25  # the rows' boxes are the faces' boxes
    assert all(sum(float(r[c]) for c in CLASSES) == pytest.approx(1, abs=1e-5) for r in by_file["scene.png"])
    assert [r["face"] for r in by_file["scene.png"]] == ["0", "1", "2", "3"]
    assert by_file["blank.png"][0]["face"] == "" and by_file["blank.png"][0]["error"] == ""
    assert "not a whole" in by_file["broken.jpg"][0]["error"] and "10000 x 10000" in by_file["huge.png"][0]["error"]
    assert re.search(r"5 image\(s\): 8 face\(s\) in 2, 1 without a face, 2 unreadable", err)
    assert "skipped: " in err and "broken.jpg" in err
    assert sorted(p.name for p in (tmp_path / "seen").iterdir()) == ["blank.jpg", "grey.jpg", "scene.jpg"]
    assert main(["predict", str(run), str(folder), "-o", str(out), "--strict"]) == 2
    assert "broken.jpg" in capsys.readouterr().err


def test_predict_whole_image_keeps_the_old_behaviour(run, tmp_path):
    from fer_train.data.readers.synthetic import draw_face

    folder = tmp_path / "faces"
    for k in range(3):
        write(folder / f"face{k}.png", png(draw_face(k, torch.Generator().manual_seed(k), 40)))
    assert main(["predict", str(run), str(folder), "--whole-image", "-o", str(tmp_path / "p.json")]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [r["path"].rsplit("/", 1)[1] for r in rows] == ["face0.png", "face1.png", "face2.png"]
    assert all(r["box"] == [0, 0, 40, 40] and r["score"] is None and r["face"] == 0 for r in rows)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)


@pytest.mark.parametrize("args, message", [
    (["-o", "rows.txt"], "must end in .csv, .json or .jsonl"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--batch-size", "-3"], "--batch-size -3"),
    (["--every", "0"], "--every 0"),
    (["--threshold", "1.5"], "--threshold 1.5"),
    (["--smooth", "-1"], "--smooth -1"),
    (["--device", "tpu"], "device 'tpu'"),
    (["--annotate", "{file}"], "is a file, not a folder"),
])
def test_predict_refuses_bad_settings_before_loading_the_model(tmp_path, capsys, args, message):
    """The model path does not exist: each error must come before the model is looked for."""
    write(tmp_path / "a.png", png(torch.zeros(3, 8, 8, dtype=torch.uint8)))
    write(tmp_path / "file", b"x")
    args = [a.replace("{file}", str(tmp_path / "file" / "sub")) for a in args]
    assert main(["predict", "missing.pt", str(tmp_path / "a.png"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
