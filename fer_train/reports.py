"""The files a run leaves for people to read: each split's confusion matrix as CSV and heat map, a
Markdown summary table of every split (accuracy, macro-F1, loss, calibration, recall per class), and the
training curves drawn from metrics.jsonl; evaluate_and_report evaluates every split and writes the first
two (the engine and the evaluate command call it), write_training_curves draws one run or several."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from typing import Callable

import torch

from fer_train.data.base import CLASSES
from fer_train.evaluation import EvalResult, evaluate

__all__ = ["evaluate_and_report", "slug", "summary_table", "training_curves", "write_confusion",
           "write_reports", "write_training_curves"]


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


def _figure_class(what: str):
    try:
        # Figure with no pyplot: renders through Agg, touches no global backend or GUI state
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"{what} needs matplotlib; pip install matplotlib (it is in requirements.txt)") from err
    return Figure


def _plot_confusion(result: EvalResult, path: Path) -> None:
    Figure = _figure_class("write_confusion: the heat map")
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
    image count, accuracy %, macro-F1 %, mean loss, ECE % (raw, and after the calibration temperature when
    there is one) and recall % per class; "-" where a class is not in the set or has no image there."""
    calibrated = any(r.temperature != 1.0 for r in results)
    header = ["set", "images", "accuracy %", "macro-F1 %", "loss", "ECE %",
              *(["ECE % at T"] if calibrated else []), *CLASSES]
    rows = []
    for r in results:
        per_class = r.per_class_accuracy.tolist()
        rows.append([r.name, str(r.count), _pct(r.accuracy), _pct(r.macro_f1),
                     "-" if math.isnan(r.loss) else f"{r.loss:.4f}", _pct(r.ece),
                     *([f"{_pct(r.ece_calibrated)} (T={r.temperature:.2f})"] if calibrated else []),
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


def write_reports(results: list[EvalResult], directory, title: str, write: bool = True) -> str:
    """confusion-<split>.csv and .png per result and summary.md (under the heading `title`) in `directory`,
    when `write`; returns the summary table."""
    table = summary_table(results)
    if write and results:
        for result in results:
            write_confusion(result, directory)
        (Path(directory) / "summary.md").write_text(f"# {title}\n\n{table}\n")
    return table


TTA_SUFFIX = " (flip TTA)"


def evaluate_and_report(model: torch.nn.Module, splits: dict, loader_for: Callable, directory, title: str, *,
                        write: bool = True, tta_rows: bool = False, **options) -> tuple[list[EvalResult], str]:
    """Evaluates `model` on every split ({name: data set}; loader_for(name, data set) gives its loader) and
    writes the reports (write_reports). tta_rows: each split once more with horizontal-flip test-time
    augmentation, as "<name> (flip TTA)". options: as fer_train.evaluation.evaluate's. Returns the results
    and the summary table."""
    results = [evaluate(model, loader_for(name, dataset), name, **options) for name, dataset in splits.items()]
    if tta_rows:
        results += [evaluate(model, loader_for(name, dataset), name + TTA_SUFFIX, **{**options, "tta": True})
                    for name, dataset in splits.items()]
    return results, write_reports(results, directory, title, write)


def _values(records: list[dict], key: str, scale: float = 1.0) -> list[float]:
    """record[key] * scale for each record; NaN where it is missing or not finite (a gap in the line)."""
    out = []
    for record in records:
        value = record.get(key)
        out.append(value * scale if isinstance(value, (int, float)) and math.isfinite(value) else math.nan)
    return out


def training_curves(runs: dict[str, list[dict]]):
    """A matplotlib Figure of runs' metrics records ({label: read_metrics(...)}), four panels over the step:
    training loss per log window with each evaluation's loss, evaluation accuracy and macro-F1 with the best
    accuracy starred (and given in the legend; the first of equal bests, as the engine keeps), the learning
    rate, and training images/s. One run: its evaluation splits in their own colours; several: one colour per
    run, the splits told apart by marker."""
    Figure = _figure_class("training_curves")
    fig = Figure(figsize=(12, 7.5), dpi=100)
    (loss_ax, score_ax), (lr_ax, speed_ax) = fig.subplots(2, 2, sharex=True)
    single = len(runs) == 1
    evaluated = trained = False
    last_step = max((x["step"] for records in runs.values() for x in records), default=0)
    later_scores, early_scores = [], []  # of evaluations after / in the first 5 % of the steps
    for r, (label, records) in enumerate(runs.items()):
        prefix = "" if single else f"{label}: "
        progress = [x for x in records if "eval" not in x and "lr" in x]
        trained |= bool(progress)
        steps = [x["step"] for x in progress]
        loss_ax.plot(steps, _values(progress, "loss"), color=f"C{r}", lw=1, label=f"{prefix}training")
        lr_ax.plot(steps, _values(progress, "lr"), color=f"C{r}", label=label)
        speed_ax.plot(steps, _values(progress, "images_per_s"), color=f"C{r}", lw=1, label=label)
        splits = dict.fromkeys(x["eval"] for x in records if "eval" in x)
        for k, split in enumerate(splits):
            rows = [x for x in records if x.get("eval") == split]
            evaluated = True
            colour, marker = (f"C{k + 1}" if single else f"C{r}"), "osD^v<>"[k % 7]
            steps = [x["step"] for x in rows]
            accuracy, macro_f1 = _values(rows, "accuracy", 100.0), _values(rows, "macro_f1", 100.0)
            scored = [(a, s) for a, s in zip(accuracy, steps) if not math.isnan(a)]
            best, at = max(scored, key=lambda pair: pair[0]) if scored else (math.nan, None)
            score_ax.plot(steps, accuracy, color=colour, marker=marker, ms=4, label=f"{prefix}{split} accuracy"
                          + (f" (best {best:.2f} % at step {at:,})" if scored else ""))
            score_ax.plot(steps, macro_f1, color=colour, marker=marker, ms=4, ls=":", mfc="none",
                          label=f"{prefix}{split} macro-F1")
            for step, a, f in zip(steps, accuracy, macro_f1):
                (early_scores if step < 0.05 * last_step else later_scores).extend(
                    v for v in (a, f) if not math.isnan(v))
            loss_ax.plot(steps, _values(rows, "loss"), color=colour, marker=marker, ms=4, ls="--",
                         label=f"{prefix}{split}")
            if scored:
                score_ax.plot([at], [best], color=colour, marker="*", ms=14, ls="none")
    for ax, title in ((loss_ax, "loss: training (per log window), evaluation (dashed)"),
                      (score_ax, "evaluation: accuracy % (solid), macro-F1 % (dotted)"),
                      (lr_ax, "learning rate"), (speed_ax, "training images/s (per log window)")):
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in (lr_ax, speed_ax):
        ax.set_xlabel("step")
    if not trained:
        for ax in (loss_ax, lr_ax, speed_ax):
            ax.text(0.5, 0.5, "no progress records", transform=ax.transAxes, ha="center", color="grey")
    zoomed = None
    if later_scores and early_scores and min(early_scores) < min(later_scores) - 10:
        # the first evaluations (an untrained model's) would squeeze the points that tell runs apart
        score_ax.set_ylim(min(later_scores) - 3, max(later_scores) + 2)
        zoomed = "evaluations in the first 5 % of the steps: below the axis"
    if evaluated:  # room below the lines for the legend, whose title says what the zoom left out
        entries = len(score_ax.get_legend_handles_labels()[1])
        columns = 1 if entries <= 4 else 2
        legend_rows = math.ceil(entries / columns) + (zoomed is not None)
        low, high = score_ax.get_ylim()
        score_ax.set_ylim(low - 0.09 * legend_rows * (high - low), high)
        score_ax.legend(fontsize=8, loc="lower right", ncol=columns, title=zoomed, title_fontsize=8)
    else:
        score_ax.text(0.5, 0.5, "no evaluation during training", transform=score_ax.transAxes, ha="center",
                      color="grey")
    if not single:
        lr_ax.legend(fontsize=8)
    fig.suptitle(next(iter(runs)) if single else f"{len(runs)} runs")
    fig.tight_layout()
    return fig


def write_training_curves(runs: dict[str, list[dict]], path) -> Path:
    """training_curves(runs) as a PNG at `path` (its folder created if needed); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    training_curves(runs).savefig(path, format="png")
    return path
