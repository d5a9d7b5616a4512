"""The run folder: checked before any work starts, so a run never overwrites another by accident and never
finds out after an hour that it cannot write its checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fer_train.errors import ConfigError

__all__ = ["RUN_FILES", "prepare"]

# What a run writes into its folder (fer_train.engine, fer_train.reports, fer_train.runlog).
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "summary.md", "model-card.md", "confusion-*", "tensorboard",
             "eval-*", ".*.pt.*.tmp")


def _run_files(folder: Path) -> list[Path]:
    return sorted({p for pattern in RUN_FILES for p in folder.glob(pattern)})


def prepare(folder: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> Path:
    """The run folder, created and checked to be writable. A folder that already holds a run is an error
    unless the run is resumed, or `overwrite` asks for its files to be deleted first (only the files a run
    writes: anything else in the folder stays)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"train.out: {folder} is a file, not a folder")
    existing = _run_files(folder) if folder.is_dir() else []
    if existing and not resume:
        if not overwrite:
            held = ", ".join(p.name for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
            raise ConfigError(f"train.out: {folder} already holds a run ({held}); continue it with --resume {folder}, "
                              f"or replace it with --overwrite")
        for path in existing:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"train.out: cannot write into {folder} ({err.strerror}); choose another folder with --out")
    return folder
