"""Checkpoints: written atomically (a reader sees the old file or the new one, never half of one), read back
with a clear error, and turned back into a model for evaluate / predict."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from fer_train.errors import ConfigError

FORMAT = "fer_train.checkpoint/1"


def save_atomic(state: dict, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path` (atomic on POSIX
    and Windows): a crash or a kill mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save({"format": FORMAT, **state}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint written by save_atomic; a run folder means its last.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise ConfigError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"checkpoint {path} was not written by fer_train (no {FORMAT!r} format tag)")
    state["path"] = str(path)
    return state


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """(model in eval mode on `device`, the run's RunConfig) from a checkpoint or a run folder."""
    from fer_train.config import RunConfig, build_config
    from fer_train.factories import build_model

    state = load(path)
    config: RunConfig = build_config(state["config"]["preset"], overrides=_as_overrides(state["config"]),
                                     check_paths=False)
    model = build_model(config.model, pretrained=False)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config


def _as_overrides(config: dict) -> dict:
    return {section: values for section, values in config.items() if isinstance(values, dict)}
