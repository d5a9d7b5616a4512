"""`python -m fer_train export`: the model (trained with the fused custom ops) as an ONNX file of standard
operators with fer_train's metadata; onnxruntime's calibrated probabilities equal PyTorch's within 1e-4, and
`predict` takes the .onnx file as the model and gives what the .pt file gives."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from fer_train import checkpoint
from fer_train.cli import main
from fer_train.data import CLASSES
from fer_train.inference import FaceExpressionRecognizer
from helpers import face_scene, png, tiny_run, write


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    run = tiny_run(folder / "run")
    assert main(["export", str(run), "-o", str(folder / "model.onnx")]) == 0
    return run, folder / "model.onnx"


def test_the_onnx_file_gives_the_models_calibrated_probabilities(exported):
    run, path = exported
    loaded = checkpoint.load_model(run, "cpu")
    model = onnx.load(str(path))
    ops = {node.op_type for node in model.graph.node}
    assert not any(node.domain for node in model.graph.node), "custom-domain operators in the export"
    assert "Softplus" in ops and "Tanh" in ops  # Mish in standard operators
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["format"] == "fer_train.onnx/1"
    assert json.loads(meta["classes"]) == list(CLASSES)
    assert json.loads(meta["input_transform"]) == loaded.input_transform
    assert float(meta["temperature"]) == loaded.temperature
    size = loaded.input_transform["size"]
    batch = torch.randn(7, 3, size, size, generator=torch.Generator().manual_seed(3))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(["logits", "probabilities"], {"input": batch.numpy()})
    with torch.inference_mode():
        want_logits = loaded.model(batch)
    want = (want_logits / loaded.temperature).softmax(1)
    assert np.abs(probabilities - want.numpy()).max() <= 1e-4
    assert np.abs(logits - want_logits.numpy()).max() <= 1e-3


def test_predict_takes_the_onnx_file_as_the_model(exported, tmp_path):
    run, path = exported
    scene, _ = face_scene([(20, 20), (100, 40), (170, 100)])
    image = write(tmp_path / "scene.png", png(scene))
    from_pt = FaceExpressionRecognizer(run, device="cpu").detect(image)
    from_onnx = FaceExpressionRecognizer(path, device="cpu").detect(image)
    assert [f.box for f in from_onnx] == [f.box for f in from_pt] and len(from_pt) == 3
    for a, b in zip(from_onnx, from_pt):
        assert max(abs(a.probabilities[c] - b.probabilities[c]) for c in CLASSES) <= 1e-4
    assert main(["predict", str(path), str(image), "-o", str(tmp_path / "rows.json")]) == 0
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 3


def test_export_refuses_a_name_without_onnx_and_predict_an_onnx_file_without_metadata(exported, tmp_path, capsys):
    run, _ = exported
    assert main(["export", str(run), "-o", str(tmp_path / "model.pt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
    bare = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "bare",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    image = write(tmp_path / "a.png", png(torch.zeros(3, 8, 8, dtype=torch.uint8)))
    assert main(["predict", str(tmp_path / "bare.onnx"), str(image)]) == 2
    assert "without fer_train's metadata" in capsys.readouterr().err
    write(tmp_path / "junk.onnx", b"not a model")
    assert main(["predict", str(tmp_path / "junk.onnx"), str(image)]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err
