"""What a run tells the person watching it and leaves for later: a progress line on the console, a JSON
Lines metrics file, and TensorBoard event files where tensorboard is installed. Only rank 0 writes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class RunLog:
    def __init__(self, directory: Path | None, total_steps: int, stream=None):
        """directory None: print nothing, write nothing (the other ranks). stream: sys.stdout by default."""
        self.directory, self.total, self.stream = directory, total_steps, stream or sys.stdout
        self.live = directory is not None
        self._tty = self.live and self.stream.isatty()
        self._open_line = False
        self._metrics = open(directory / "metrics.jsonl", "a") if self.live else None
        self._board = None
        if self.live:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._board = SummaryWriter(str(directory / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def message(self, text: str) -> None:
        if not self.live:
            return
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        print(text, file=self.stream, flush=True)

    def train(self, step: int, loss: float, lr: float, images_per_s: float, seconds_per_step: float,
              skipped: dict | None = None) -> None:
        """One progress report: the console line (rewritten in place on a terminal) and a metrics record.
        skipped: training images left out so far while reading, by reason (recorded when there are any)."""
        if not self.live:
            return
        self._write({"step": step, "loss": loss, "lr": lr, "images_per_s": images_per_s,
                     **({"skipped": dict(skipped)} if skipped else {})})
        if self._board is not None:
            for name, value in (("train/loss", loss), ("train/lr", lr), ("train/images_per_s", images_per_s)):
                self._board.add_scalar(name, value, step)
        done = step / self.total
        bar = "#" * int(24 * done) + "-" * (24 - int(24 * done))
        line = (f"step {step:>{len(str(self.total))}}/{self.total} [{bar}] loss {loss:.4f} lr {lr:.3g} "
                f"{images_per_s:,.0f} img/s ETA {_duration((self.total - step) * seconds_per_step)}")
        if self._tty:
            self.stream.write("\r" + line)
            self.stream.flush()
            self._open_line = True
        else:
            print(line, file=self.stream, flush=True)

    def evaluation(self, step: int, result) -> None:
        if not self.live:
            return
        self._write({"step": step, "eval": result.name, "accuracy": result.accuracy, "loss": result.loss,
                     "images": result.count})
        if self._board is not None:
            tag = result.name.replace(" ", "_")
            self._board.add_scalar(f"eval/{tag}/accuracy", result.accuracy, step)
            self._board.add_scalar(f"eval/{tag}/loss", result.loss, step)
        self.message(f"  eval {result.name}: accuracy {result.accuracy:.4f}, loss {result.loss:.4f} "
                     f"({result.count} images)")

    def _write(self, record: dict) -> None:
        self._metrics.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        self._metrics.flush()

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
        if self._metrics is not None:
            self._metrics.close()
        if self._board is not None:
            self._board.close()
