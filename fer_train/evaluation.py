"""Evaluation: the confusion matrix, accuracy and loss of a model on one evaluation split, and the files
a run leaves behind (confusion matrix as CSV and heat map, a Markdown summary table).

    result = evaluate(model, build_loader(valid_set, 256, train=False), "ferplus valid")
    print(result.accuracy, result.loss)
    write_confusion(result, run_dir)            # confusion-ferplus-valid.csv / .png
    print(summary_table([result, ...]))

Accuracy and the confusion matrix use hard classes: the arg-max of the model's output against the
class index, or against the arg-max of a soft (FERPlus vote) target. The loss is the unweighted
cross-entropy against the targets as given (soft targets included), averaged over images.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from fer_train.data.base import CLASSES

__all__ = ["EvalResult", "confusion_matrix", "evaluate", "evaluate_and_report", "slug", "summary_table",
           "write_confusion"]


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, classes: int = len(CLASSES)) -> torch.Tensor:
    """int64 classes x classes counts: entry [t, p] is how many samples of true class t were predicted as
    p. One bincount over the pair index t * classes + p, on the tensors' device (no host sync)."""
    predicted, target = predicted.reshape(-1).long(), target.reshape(-1).long()
    if predicted.shape != target.shape:
        raise ValueError(f"confusion_matrix: {predicted.numel()} predictions but {target.numel()} targets")
    pairs = target * classes + predicted
    return torch.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


@dataclass
class EvalResult:
    """The outcome of evaluate() on one split. confusion: int64 [8, 8] counts, rows = true class,
    columns = predicted; loss: mean cross-entropy; present_classes: the classes the split can have (a
    set without contempt, such as RAF-DB, lists 7), used to show absent classes as such."""

    name: str
    confusion: torch.Tensor
    loss: float
    present_classes: tuple[int, ...] = field(default_factory=lambda: tuple(range(len(CLASSES))))

    def __post_init__(self):
        self.confusion = self.confusion.detach().to("cpu", torch.int64)
        self.present_classes = tuple(int(c) for c in self.present_classes)

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASSES[:self.confusion.shape[0]]

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        """Fraction of images whose predicted class is the true one (NaN for an empty result)."""
        return float(self.confusion.trace()) / self.count if self.count else math.nan

    def normalised(self) -> torch.Tensor:
        """float64 [8, 8]: each row as percentages of that true class's images; NaN rows where the split
        has no image of the class (0 / 0, deliberately not 0: "never seen" is not "always wrong")."""
        counts = self.confusion.double()
        return 100.0 * counts / counts.sum(1, keepdim=True)

    @property
    def per_class_accuracy(self) -> torch.Tensor:
        """float64 [8]: recall of each class as a fraction, NaN for classes with no image."""
        return self.normalised().diagonal() / 100.0

    def to_dict(self) -> dict:
        """JSON-ready (NaN becomes None, which JSON has)."""
        per_class = self.per_class_accuracy.tolist()
        return {"name": self.name, "images": self.count, "accuracy": _finite_or_none(self.accuracy),
                "loss": _finite_or_none(self.loss),
                "per_class_accuracy": {c: _finite_or_none(a) for c, a in zip(self.classes, per_class)},
                "present_classes": [self.classes[c] for c in self.present_classes],
                "confusion": self.confusion.tolist()}


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel. Evaluation runs it directly: DDP's forward adds nothing
    without gradients, and its buffer broadcast (a collective; PyTorch skips it under no_grad today) must
    never run when evaluation shards differ by one batch between ranks, or a rank would wait forever."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def evaluate(model: torch.nn.Module, loader, name: str, *, device=None, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, progress: Callable[[int, int | None], None] | None = None,
             present_classes: tuple[int, ...] | None = None) -> EvalResult:
    """Run `model` over every batch of `loader` ((images, targets) pairs, e.g. build_loader(..., train=False))
    and return the confusion matrix and mean cross-entropy.

    device: where the batches go (default: the model's parameters' device). amp_dtype: autocast to it
    (e.g. torch.bfloat16); the loss is computed in float32 either way. progress(done, total) is called
    after each batch (total is None when the loader has no len()). The model is put in eval mode and
    back in its previous mode afterwards. Under torch.distributed, each rank passes its own shard and
    every rank gets the global result (counts and loss sums are all-reduced). present_classes: the
    classes the split can have; by default the loader's data set's (build_loader), else all.
    """
    inner = _unwrap(model)
    device = torch.device(device) if device is not None else _model_device(inner)
    classes = len(CLASSES)
    # accumulated on the device, so there is no host sync per batch
    confusion = torch.zeros(classes, classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    try:
        total = len(loader)
    except TypeError:
        total = None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for done, (images, targets) in enumerate(loader, 1):
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                targets = targets.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = inner(images)
                logits = logits.float()
                if logits.dim() != 2 or logits.shape[1] != classes:
                    raise ValueError(f"evaluate: the model gives outputs of shape {tuple(logits.shape)}, expected "
                                     f"N x {classes} (one logit per class of {CLASSES})")
                # cross_entropy takes class indices or probabilities alike (soft FERPlus targets)
                loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
                truth = targets.argmax(1) if targets.is_floating_point() else targets
                confusion += confusion_matrix(logits.argmax(1), truth, classes)
                if progress is not None:
                    progress(done, total)
    finally:
        model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # each rank saw a disjoint shard: sums of counts and losses are the global ones
        torch.distributed.all_reduce(confusion)
        torch.distributed.all_reduce(loss_sum)
    count = int(confusion.sum())
    loss = float(loss_sum) / count if count else math.nan
    if present_classes is None:
        dataset = getattr(getattr(loader, "pipeline", None), "dataset", None)  # a build_loader Loader's set
        present_classes = getattr(dataset, "present_classes", tuple(range(classes)))
    return EvalResult(name, confusion, loss, present_classes)


def evaluate_and_report(model: torch.nn.Module, splits: dict, loader_for: Callable, directory, title: str, *,
                        write: bool = True, **options) -> tuple[list[EvalResult], str]:
    """Evaluates `model` on every split ({name: data set}; loader_for(name, data set) gives its loader) and,
    with `write`, leaves the reports in `directory`: confusion-<split>.csv and .png per split and summary.md
    (under the heading `title`). options: as evaluate's (device, amp_dtype, channels_last). Returns the
    results and the summary table."""
    results = [evaluate(model, loader_for(name, dataset), name, **options) for name, dataset in splits.items()]
    table = summary_table(results)
    if write and results:
        for result in results:
            write_confusion(result, directory)
        (Path(directory) / "summary.md").write_text(f"# {title}\n\n{table}\n")
    return results, table


def slug(name: str) -> str:
    """A file-name part from a result name: "FERPlus valid" -> "ferplus-valid"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "eval"


def write_confusion(result: EvalResult, directory) -> tuple[Path, Path]:
    """Write confusion-<slug>.csv and confusion-<slug>.png into `directory` (created if needed) and
    return their paths.

    CSV format:
        true \\ predicted,neutral,happy,...,contempt,images
        neutral,93.5000,1.2500,...,0.0000,160       <- one row per true class: percent of that row's images
        ...                                            predicted as each class, then the row's image count;
        contempt,,,...,,0                              a class with no image has empty percentage cells
        predicted,150,171,...,3,1270                <- images predicted as each class, then the total
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = directory / f"confusion-{slug(result.name)}"
    csv_path, png_path = base.with_suffix(".csv"), base.with_suffix(".png")
    percent, counts = result.normalised(), result.confusion
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *result.classes, "images"])
        for name, row, n in zip(result.classes, percent.tolist(), counts.sum(1).tolist()):
            writer.writerow([name, *("" if math.isnan(v) else f"{v:.4f}" for v in row), n])
        writer.writerow(["predicted", *counts.sum(0).tolist(), result.count])
    _plot_confusion(result, png_path)
    return csv_path, png_path


def _plot_confusion(result: EvalResult, path: Path) -> None:
    try:
        # Figure with no pyplot: renders through Agg, touches no global backend or GUI state
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("write_confusion: the heat map needs matplotlib; pip install matplotlib "
                          "(it is in requirements.txt)") from err
    import matplotlib

    percent = result.normalised().numpy()
    n = len(result.classes)
    fig = Figure(figsize=(1.0 + 0.8 * n, 1.0 + 0.75 * n), dpi=100)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#d0d0d0")  # NaN rows: grey, no number
    image = ax.imshow(percent, cmap=cmap, vmin=0, vmax=100)
    for t in range(n):
        for p in range(n):
            value = percent[t, p]
            if value == value:  # not NaN
                ax.text(p, t, f"{value:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if value > 60 else "black")
    ax.set_xticks(range(n), result.classes, rotation=45, ha="right")
    ax.set_yticks(range(n), result.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = "n/a" if math.isnan(result.accuracy) else f"{100 * result.accuracy:.2f}%"
    ax.set_title(f"{result.name}: accuracy {accuracy} ({result.count} images)")
    fig.colorbar(image, ax=ax, label="% of the true class", fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, format="png")


def summary_table(results: list[EvalResult]) -> str:
    """A Markdown table (columns padded, so it also reads as plain text): one row per result with its
    image count, accuracy %, mean loss and per-class accuracy %; "-" where a class is not in the set or
    has no image there."""
    header = ["set", "images", "accuracy %", "loss", *CLASSES]
    rows = []
    for r in results:
        per_class = r.per_class_accuracy.tolist()
        rows.append([r.name, str(r.count), _pct(r.accuracy), "-" if math.isnan(r.loss) else f"{r.loss:.4f}",
                     *(_pct(a) if c in r.present_classes else "-" for c, a in enumerate(per_class))])
    widths = [max(len(row[k]) for row in [header, *rows]) for k in range(len(header))]

    def line(cells, numbers=True):
        # the set name left-aligned, numbers right-aligned
        return "| " + " | ".join(c.ljust(w) if k == 0 or not numbers else c.rjust(w)
                                 for k, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "| " + " | ".join((":" + "-" * (w - 1)) if k == 0 else ("-" * (w - 1) + ":")
                             for k, w in enumerate(widths)) + " |"
    return "\n".join([line(header, numbers=False), rule, *map(line, rows)])


def _pct(fraction: float) -> str:
    return "-" if math.isnan(fraction) else f"{100 * fraction:.2f}"
