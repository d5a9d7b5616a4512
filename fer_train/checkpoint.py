"""The two files a run keeps, written atomically (a reader sees the old file or the new one, never half of
one) and read back with a clear error:

- last.pt, the training state: model, optimizer (Lookahead's slow weights too), scaler, step, data position,
  RNG states; what --resume needs. Read with torch.load(weights_only=False): only load files you trust.
- best.pt, the model file: weights, the run's settings, the class names, the input transform and the
  calibration temperature, nothing else; plain tensors and Python values, so it loads with
  torch.load(weights_only=True) and is a quarter of last.pt's size.

load_model() turns either into a model for evaluate / predict.
"""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from fer_train.errors import ConfigError

TRAINING_FORMAT = "fer_train.checkpoint/1"
MODEL_FORMAT = "fer_train.model/1"

__all__ = ["LoadedModel", "MODEL_FORMAT", "TRAINING_FORMAT", "load", "load_model", "model_file", "save_atomic",
           "write_atomic"]


def save_atomic(state: dict, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path` (write_atomic)."""
    return write_atomic(path, lambda file: torch.save(state, file))


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """write(file) into a temporary file in the same folder, fsync, then rename over `path` (atomic on POSIX
    and Windows): a crash or a kill mid-write leaves the previous file intact. The file gets the
    permissions of any other file the process creates there (umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException as err:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ConfigError(f"no space left on the device holding {path.parent} while writing {path.name}; the "
                              "previous file is intact: free some space, then resume") from err
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files of saves that were killed mid-write (.NAME.*.tmp); returns them."""
    stale = [p for p in Path(folder).glob(".*.pt.*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def training_state(**state) -> dict:
    return {"format": TRAINING_FORMAT, **state}


def model_file(model: torch.nn.Module, config: dict, *, step: int, classes, input_transform: dict,
               temperature: float = 1.0, metrics: dict | None = None) -> dict:
    """What best.pt holds: everything inference needs, in types torch.load(weights_only=True) reads.
    input_transform: size, resize, mean, std and colour ("rgb": grey images are replicated)."""
    return {"format": MODEL_FORMAT, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "config": config, "step": int(step), "classes": list(classes), "input": dict(input_transform),
            "temperature": float(temperature), "metrics": dict(metrics or {})}


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """A training state (last.pt) or a model file (best.pt); a run folder means its last.pt. Model files are
    read with weights_only=True; training states, which hold RNG and optimizer objects, without."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # noqa: BLE001 - not a model file (or not readable at all): try it as a training state
        try:
            state = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
            raise ConfigError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") not in (TRAINING_FORMAT, MODEL_FORMAT):
        raise ConfigError(f"checkpoint {path} was not written by fer_train (no {TRAINING_FORMAT!r} or "
                          f"{MODEL_FORMAT!r} format tag)")
    state["path"] = str(path)
    return state


@dataclass
class LoadedModel:
    """A model ready for inference and what it needs around it."""

    model: torch.nn.Module  # in eval mode
    config: object  # fer_train.config.RunConfig
    classes: tuple[str, ...]
    input_transform: dict  # size, resize, mean, std, colour
    temperature: float  # divide the logits by it for calibrated probabilities
    step: int
    path: str


def input_transform(config) -> dict:
    """The evaluation transform of a run's settings (docs/method.md section 6)."""
    from fer_kernels.reference import IMAGENET_MEAN, IMAGENET_STD
    from fer_train.recipe.augmentation import resized_side

    size = config.data.image_size
    return {"size": size, "resize": resized_side(size, config.data.crop), "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "colour": "rgb"}


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedModel:
    """The model of a model file or a training state (or a run folder: its best.pt, else last.pt)."""
    from fer_train.config import build_config
    from fer_train.data.base import CLASSES
    from fer_train.factories import build_model

    path = Path(path)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").is_file() else path / "last.pt"
    state = load(path)
    config = build_config(state["config"]["preset"], overrides=saved_settings(state["config"]), check_paths=False)
    model = build_model(config.model, pretrained=False)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ConfigError(f"checkpoint {path}: its weights do not fit the model its settings describe ({err})") from None
    return LoadedModel(model.to(device).eval(), config, tuple(state.get("classes", CLASSES)),
                       state.get("input") or input_transform(config), float(state.get("temperature", 1.0)),
                       int(state.get("step", 0)), str(path))


def saved_settings(saved: dict) -> dict:
    """A run's saved configuration (RunConfig.to_dict(), as checkpoints hold it) as overrides for
    build_config(its preset, ...): every section it saved, and each setting it predates (added to the code
    since) at its dataclass default, the behaviour the run had, not at the value its preset gives now."""
    from fer_train.config import RunConfig

    defaults = RunConfig().to_dict()
    return {section: {**defaults.get(section, {}), **values} for section, values in saved.items()
            if isinstance(values, dict)}
