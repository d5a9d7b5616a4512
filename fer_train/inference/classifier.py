"""The expression classifier behind the recognizer: a PyTorch model file (best.pt, last.pt or a run folder,
through fer_train.checkpoint.load_model) or an ONNX file written by `python -m fer_train export` (run by
onnxruntime, its class names, input transform and temperature read from its metadata). Both give calibrated
probabilities, softmax(logits / temperature), for batches the input transform produced.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fer_train.errors import ConfigError

__all__ = ["Classifier", "ONNX_FORMAT", "load_classifier"]

ONNX_FORMAT = "fer_train.onnx/1"  # the metadata tag export.py writes and this module reads


class Classifier:
    """classes, input_transform (size, resize, mean, std, colour), temperature, device, channels_last, and
    probabilities(batch) -> float32 N x classes on the CPU."""

    def __init__(self, classes, input_transform: dict, temperature: float, device: torch.device, path: str,
                 channels_last: bool = False):
        self.classes = tuple(classes)
        self.input_transform = dict(input_transform)
        self.temperature = float(temperature)
        self.device = torch.device(device)
        self.path = path
        self.channels_last = channels_last
        if not self.temperature > 0:
            raise ConfigError(f"{path}: calibration temperature {temperature} is not positive")

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] == 0:
            return torch.zeros(0, len(self.classes))
        logits = self.logits(batch).float().cpu()
        if logits.dim() != 2 or logits.shape[1] != len(self.classes):
            raise ValueError(f"{self.path}: the model gives outputs of shape {tuple(logits.shape)}, expected N x "
                             f"{len(self.classes)} (one logit per class of {self.classes})")
        return (logits / self.temperature).softmax(1)


class TorchClassifier(Classifier):
    def __init__(self, loaded, device: torch.device):
        channels_last = device.type == "cuda" and bool(getattr(loaded.config.train, "channels_last", False))
        super().__init__(loaded.classes, loaded.input_transform, loaded.temperature, device, loaded.path,
                         channels_last)
        self.model = loaded.model.to(device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loaded = loaded

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(batch.to(self.device))


class OnnxClassifier(Classifier):
    """An exported model in onnxruntime on the CPU (the GPU path is the PyTorch model file)."""

    def __init__(self, path: Path):
        try:
            import onnx
        except ImportError:
            raise ConfigError("reading an .onnx model needs onnx and onnxruntime: pip install onnx onnxruntime") from None
        from fer_train.inference.centerface import onnxruntime_session

        try:
            model = onnx.load(str(path))
        except Exception as err:  # noqa: BLE001 - any parse failure means the file is not a usable model
            raise ConfigError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from None
        meta = {p.key: p.value for p in model.metadata_props}
        if meta.get("format") != ONNX_FORMAT:
            raise ConfigError(f"{path}: an ONNX model without fer_train's metadata (format {ONNX_FORMAT!r}); write "
                              "it with `python -m fer_train export RUN -o model.onnx`")
        try:
            classes, transform = json.loads(meta["classes"]), json.loads(meta["input_transform"])
            temperature = float(meta.get("temperature", 1.0))
        except (KeyError, ValueError) as err:
            raise ConfigError(f"{path}: broken fer_train metadata ({err})") from None
        super().__init__(classes, transform, temperature, torch.device("cpu"), str(path))
        self.session = onnxruntime_session(model)
        self.input = self.session.get_inputs()[0].name

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.session.run(["logits"], {self.input: batch.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)


def load_classifier(model, device: torch.device | str = "cpu") -> Classifier:
    """model: a run folder, a .pt model file or training state, an .onnx export, a LoadedModel or a Classifier."""
    from fer_train import checkpoint

    device = torch.device(device)
    if isinstance(model, Classifier):
        return model
    if isinstance(model, checkpoint.LoadedModel):
        return TorchClassifier(model, device)
    if not isinstance(model, (str, Path)):
        raise TypeError(f"a model is a path (run folder, .pt, .onnx), a LoadedModel or a Classifier, not "
                        f"{type(model).__name__}")
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise ConfigError(f"model {path} does not exist")
        return OnnxClassifier(path)
    return TorchClassifier(checkpoint.load_model(path, device), device)
