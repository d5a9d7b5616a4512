"""What a run tells the person watching it and leaves for later: a progress line on the console, a JSON
Lines metrics file (read_metrics reads it back), and TensorBoard event files where tensorboard is installed.
Only rank 0 writes."""

from __future__ import annotations

import errno
import json
import sys
import time
from pathlib import Path

import torch

from fer_train.errors import ConfigError, DataError


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _metrics_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, record) for each record of a metrics.jsonl. A last line cut short (a run killed while writing
    it) is left out; any other line that is not a JSON object with a step raises DataError naming the file
    and line."""
    lines = path.read_text().splitlines(keepends=True)
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise DataError(f"{path}, line {number}: not a JSON record ({err.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise DataError(f"{path}, line {number}: not a metrics record (a JSON object with a step)")
        out.append((line, record))
    return out


def read_metrics(path) -> list[dict]:
    """The records of a run's metrics.jsonl (RunLog writes them): progress reports (step, loss, lr,
    images_per_s) and evaluations (step, eval, accuracy, macro_f1, loss, ...), in the order written."""
    return [record for _, record in _metrics_lines(Path(path))]


def _drop_records_after(path: Path, step: int) -> None:
    """Keeps the records of steps up to `step`; a last line cut short by a kill goes too, so that the resumed
    run's first record starts a line of its own."""
    if not path.is_file():
        return
    kept = [line if line.endswith("\n") else line + "\n"
            for line, record in _metrics_lines(path) if record["step"] <= step]
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(kept))
    temporary.replace(path)


class RunLog:
    def __init__(self, directory: Path | None, total_steps: int, stream=None, resumed_at: int | None = None):
        """directory None: print nothing, write nothing (the other ranks). stream: sys.stdout by default.
        resumed_at: the step a resumed run restarts from; metrics.jsonl loses the records of later steps,
        which the run is about to compute again."""
        self.directory, self.total, self.stream = directory, total_steps, stream or sys.stdout
        self.live = directory is not None
        self._tty = self.live and self.stream.isatty()
        self._open_line = False
        if self.live and resumed_at is not None:
            _drop_records_after(directory / "metrics.jsonl", resumed_at)
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
        recall = {c: round(r, 4) for c, r in result.to_dict()["per_class_accuracy"].items() if r is not None}
        self._write({"step": step, "eval": result.name, "accuracy": result.accuracy, "macro_f1": result.macro_f1,
                     "loss": result.loss, "images": result.count, "recall": recall})
        if self._board is not None:
            tag = result.name.replace(" ", "_")
            for metric in ("accuracy", "macro_f1", "loss"):
                self._board.add_scalar(f"eval/{tag}/{metric}", getattr(result, metric), step)
        self.message(f"  eval {result.name}: accuracy {result.accuracy:.4f}, macro-F1 {result.macro_f1:.4f}, loss "
                     f"{result.loss:.4f} ({result.count} images); recall " +
                     " ".join(f"{c} {100 * r:.0f}" for c, r in recall.items()))

    def _write(self, record: dict) -> None:
        try:
            self._metrics.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            self._metrics.flush()
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ConfigError(f"no space left on the device holding {self.directory} while writing "
                                  "metrics.jsonl: free some space, then resume from last.pt") from err
            raise

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
        if self._metrics is not None:
            self._metrics.close()
        if self._board is not None:
            self._board.close()


def _small_map_convolutions(device) -> str:
    """How the CPU computes convolutions on small maps (fer_kernels.nn.conv)."""
    if device.type != "cpu":
        return ""
    from fer_kernels.nn import conv
    if conv.SMALL_MAP <= 0:
        return "; conv weight gradient oneDNN"
    taps = f", every pass by kernel tap on maps of at most {conv.TAP_MAP} positions" if conv.TAP_MAP > 0 else ""
    return (f"; conv weight gradient unfolded on maps of at most min({conv.SMALL_MAP}, output channels) positions"
            f"{taps} (bfloat16: {min(conv.SMALL_MAP, conv.BF16_SMALL_MAP)} and {conv.BF16_TAP_MAP})")


def weight_decay(optim) -> str:
    """', weight decay 0.05 (decoupled)' for an OptimConfig with decay (an L2 term unless decoupled); '' without."""
    if not optim.weight_decay:
        return ""
    return f", weight decay {optim.weight_decay} ({'decoupled' if optim.decoupled_weight_decay else 'L2'})"


def random_crops(data) -> str:
    """', random crops (zoom 0.1, shift 0.1 of the side)' for a DataConfig with zoom or translate; '' without."""
    if not (data.zoom or data.translate):
        return ""
    return f", random crops (zoom {data.zoom:g}, shift {data.translate:g} of the side)"


def bfloat16_weights(net) -> str:
    """The describe line's note when the passes use bfloat16 weight copies (train.bf16_weights)."""
    from fer_kernels.optim import BFloat16Weights

    return " with bfloat16 weight copies written by the optimizer" if isinstance(net, BFloat16Weights) else ""


def describe(trainer) -> str:
    """The header a run prints: where it runs, the model, optimizer and recipe, the data and its evaluation."""
    c = trainer.config
    sets = "\n".join("  " + line for line in trainer.data.train.report().splitlines())
    return (f"run {trainer.run_dir} (preset {c.preset}) on {trainer.device}"
            f"{f' x {trainer.dist.world} processes' if trainer.dist.world > 1 else ''}\n"
            f"model {c.model.arch} act={c.model.act} booster={c.model.booster} stem={c.model.stem} "
            f"fused={c.model.fused}; optimizer {c.optim.name} lr {c.optim.lr}{weight_decay(c.optim)}; "
            f"{c.train.steps} steps of {c.train.batch_size} ({trainer.micro_batch} x {trainer.accumulation} "
            f"accumulation x {trainer.dist.world} processes)"
            f"{f', time budget {c.train.time_budget}' if c.train.time_budget else ''}; amp "
            f"{trainer.amp_dtype}{bfloat16_weights(trainer.net)}; weight EMA {c.train.ema or 'off'}; "
            f"data backend {trainer.loader.backend} ({trainer.loader.pipeline.num_workers} workers); "
            f"{c.data.image_size} px, centre crop {c.data.crop:g} of the face{random_crops(c.data)}; "
            f"freed memory {'kept' if trainer.keeps_freed_memory else 'returned'}; intra-op threads "
            f"{torch.get_num_threads()}{' (adapting to the load)' if trainer.threads == 0 else ''}"
            f"{_small_map_convolutions(trainer.device)}\n"
            f"training data:\n{sets}\n"
            f"{f'class-balanced sampling, power {c.data.class_balance}; ' if c.data.class_balance else ''}"
            f"class weights ({c.data.class_weights}): "
            f"{[round(w, 4) for w in trainer.weights.tolist()]}\n"
            f"evaluation: {', '.join(trainer.data.validation) or 'none'}; best model by "
            f"{trainer.data.selection[0] if trainer.data.selection else 'none (the last is kept)'}"
            + "".join(f"\nnot on disk, so not evaluated: {missing}" for missing in trainer.data.missing))
