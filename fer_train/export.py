"""A trained model as an ONNX file that any ONNX runtime runs, and that `predict` takes as the model.

The model trains with the fused Mish and block-tail kernels (custom ops fer_kernels::mish and
::recalibrate, which no exporter knows). Fused and unfused models share state dicts, so the export builds
the same architecture with fused=False (plain PyTorch operators), loads the weights and exports that through
torch.onnx's TorchScript exporter (the dynamo exporter needs onnxscript, which is not a dependency).

The file: input "input" (float32 N x 3 x S x S, normalised as the input transform says), outputs "logits" and
"probabilities" (softmax(logits / temperature), calibrated); metadata_props: format (fer_train.onnx/1),
classes and input_transform (JSON), temperature, arch, step, source (the checkpoint it came from).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import warnings
from pathlib import Path

import torch

from fer_train import checkpoint
from fer_train.errors import ConfigError
from fer_train.inference.classifier import ONNX_FORMAT

__all__ = ["OPSET", "export_onnx", "unfused_model"]

OPSET = 17  # Mish decomposes into Softplus, Tanh and Mul (opset 18's Mish op is not in every runtime)
TOLERANCE = 1e-4  # the largest probability difference from PyTorch accepted (float32)


class _Calibrated(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, temperature: float):
        super().__init__()
        self.model, self.temperature = model, float(temperature)

    def forward(self, x):
        logits = self.model(x)
        return logits, torch.softmax(logits / self.temperature, 1)


def unfused_model(loaded) -> torch.nn.Module:
    """The loaded model's architecture with fused=False and its weights, in eval mode on the CPU."""
    from fer_train.factories import build_model

    model = build_model(dataclasses.replace(loaded.config.model, fused=False), pretrained=False)
    model.load_state_dict({k: v.detach().cpu() for k, v in loaded.model.state_dict().items()})
    return model.eval()


def export_onnx(loaded, path: str | os.PathLike, check: bool = True) -> tuple[Path, float]:
    """Writes loaded (fer_train.checkpoint.LoadedModel) to `path` atomically; returns (path, the largest
    difference between onnxruntime's probabilities and PyTorch's on a test batch, NaN unchecked). A difference
    above TOLERANCE is a bug: ValueError, and the file is not written."""
    import onnx

    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise ConfigError(f"-o {path}: the file must end in .onnx")
    if path.is_dir():
        raise ConfigError(f"-o {path}: is a folder; give a file name ending in .onnx")
    size = int(loaded.input_transform["size"])
    wrapped = _Calibrated(unfused_model(loaded), loaded.temperature).eval()
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(wrapped, (example,), buffer, dynamo=False, input_names=["input"],
                          output_names=["logits", "probabilities"], opset_version=OPSET,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "probabilities": {0: "batch"}})
    model = onnx.load_from_string(buffer.getvalue())
    metadata = {"format": ONNX_FORMAT, "classes": json.dumps(list(loaded.classes)),
                "input_transform": json.dumps(loaded.input_transform), "temperature": repr(float(loaded.temperature)),
                "arch": loaded.config.model.arch, "step": str(loaded.step), "source": str(loaded.path)}
    onnx.helper.set_model_props(model, metadata)
    model.doc_string = (f"fer_train {loaded.config.model.arch}: facial expression logits and calibrated probabilities "
                        f"of {', '.join(loaded.classes)}")
    data = model.SerializeToString()
    difference = _check(data, wrapped, size) if check else float("nan")
    return checkpoint.write_atomic(path, lambda file: file.write(data)), difference


def _check(data: bytes, wrapped: torch.nn.Module, size: int) -> float:
    from fer_train.inference.centerface import onnxruntime_session

    batch = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = wrapped(batch)[1]
    got = onnxruntime_session(data).run(["probabilities"], {"input": batch.numpy()})[0]
    difference = float((torch.from_numpy(got) - want).abs().max())
    if not difference <= TOLERANCE:
        raise ValueError(f"export: onnxruntime's probabilities differ from PyTorch's by {difference:.3g} > {TOLERANCE}")
    return difference
