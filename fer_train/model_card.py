"""model-card.md: what a person deciding whether to use a trained model needs on one page, written beside
its checkpoints at the end of every run: the architecture and its size, the training data (sets, splits,
label mode, what was left out and why, class counts), the recipe and the command, the time and hardware it
took, the evaluation of every split (accuracy, macro-F1, recall per class, calibration), the training curves
(training-curves.png beside it, drawn from metrics.jsonl), known limits and the versions."""

from __future__ import annotations

import platform
import shlex
import sys
from pathlib import Path

import torch

from fer_train.checkpoint import input_transform
from fer_train.reports import summary_table, write_training_curves
from fer_train.runlog import random_crops, read_metrics, weight_decay

__all__ = ["write_model_card"]

# Where each data set comes from, its licence terms, and what its images are.
SOURCES = {
    "ferplus": "FER2013 faces (48 x 48 grey, collected by web search for the 2013 ICML representation-learning "
               "challenge, research use) with the FERPlus crowd labels (10 votes per image; MIT licence)",
    "affectnet": "AffectNet (faces found on the web, manually annotated; academic research licence)",
    "rafdb": "RAF-DB basic (faces from the web, crowd-annotated; non-commercial research licence)",
    "facial_expressions": "the muxspace facial_expressions set (Apache-2.0; 92% neutral or happy)",
    "synthetic": "the built-in drawn cartoon faces (no people)",
}


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name}, {torch.get_num_threads()} threads"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _curves(run_dir: Path) -> list[str]:
    """The card's lines for training-curves.png, which this draws from the run's metrics.jsonl."""
    metrics = run_dir / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.is_file() else []
    if not records:
        return ["No progress or evaluation was recorded (metrics.jsonl is empty or missing)."]
    write_training_curves({run_dir.name: records}, run_dir / "training-curves.png")
    return ["Loss, evaluation accuracy and macro-F1, learning rate and speed over the steps, from metrics.jsonl "
            "(`python -m fer_train curves` draws runs side by side):", "",
            "![training curves](training-curves.png)"]


def write_model_card(trainer, results: list, temperature: float) -> Path:
    """Writes model-card.md into the trainer's run folder (with training-curves.png) and returns its path."""
    import fer_kernels

    c, data, model = trainer.config, trainer.data, trainer.eval_model
    params = sum(p.numel() for p in model.parameters())
    sets = [name for name in ("affectnet", "ferplus", "rafdb", "facial_expressions") if getattr(c.data, name)]
    sets = sets or ["synthetic"]
    train_report = "\n".join(f"    {line}" for line in data.train.report().splitlines())
    booster = {"plus": "Accuracy Booster Plus (dense C x C gate)", "depthwise": "Accuracy Booster (depthwise gate)",
               None: "no gate"}[c.model.booster]
    lines = [
        f"# Model card: {trainer.run_dir.name}",
        "",
        "## Model",
        f"- {c.model.arch} with {c.model.act} and {booster} in every block (docs/method.md section 2), "
        f"{c.model.stem} stem, {params:,} parameters.",
        "- Classes, in output order: neutral, happy, surprise, sad, anger, disgust, fear, contempt.",
        f"- Input: {c.data.image_size} x {c.data.image_size} RGB (grey images replicated), the shorter side resized to "
        f"{input_transform(c)['resize']} and centre-cropped, ImageNet mean/std "
        "(docs/method.md section 6).",
        f"- Calibration: divide the logits by the temperature {temperature:.3f} (fitted on "
        f"{data.selection[0] if data.selection else 'no split: none was held out'}); best.pt holds it.",
        f"- Weights: best.pt, the model chosen by {data.selection[0] if data.selection else 'none (the last step)'} "
        f"accuracy (step {trainer.best['step'] if trainer.best['step'] is not None else trainer.step})"
        f"{', an exponential moving average of the weights (decay ' + str(c.train.ema) + ')' if c.train.ema else ''}.",
        "",
        "## Training data",
        f"- Sets: {'; '.join(f'{name}: {SOURCES[name]}' for name in sets)}.",
        f"- FERPlus labels for training: {c.data.ferplus_label_mode} (evaluation always uses the majority labels)"
        if "ferplus" in sets else "- Labels as each set gives them (docs/method.md section 7).",
        f"- Class weights in the loss: {c.data.class_weights}"
        f"{'; class-balanced sampling, power ' + str(c.data.class_balance) if c.data.class_balance else ''}.",
        "- Images per class, and what was left out and why:",
        "",
        train_report,
        "",
        "## Recipe",
        f"- Command: `python -m fer_train {shlex.join(sys.argv[1:])}` "
        f"(preset {c.preset}).",
        f"- {trainer.step} steps of {c.train.batch_size} images at {c.data.image_size} px; optimizer {c.optim.name} lr "
        f"{c.optim.lr}{weight_decay(c.optim)}, betas {tuple(c.optim.betas)}, schedule {c.optim.schedule} "
        f"(flat for {c.optim.flat_fraction:.0%}); "
        f"FMix {'on' if c.data.fmix else 'off'}{random_crops(c.data)}; label smoothing {c.data.label_smoothing}; "
        "autocast "
        f"{str(trainer.amp_dtype).replace('torch.', '') if trainer.amp_dtype else 'off (float32)'}"
        f"{'; time budget ' + c.train.time_budget if c.train.time_budget else ''}.",
        "",
        "## Time and hardware",
        f"- {_duration(trainer.elapsed_seconds())} of wall time on {_hardware(trainer.device)}"
        f"{' at the end (the count followed the load, train.threads)' if trainer.threads == 0 else ''}"
        f"{f' x {trainer.dist.world} processes' if trainer.dist.world > 1 else ''}.",
        "",
        "## Evaluation",
        "Single centre crop; rows marked (flip TTA) average the image's and its mirror's probabilities. ECE: "
        "expected calibration error of the top-class probability (15 bins), raw and at the temperature.",
        "",
        summary_table(results) if results else "No test split was given.",
        "",
        "## Training curves",
        *_curves(trainer.run_dir),
        "",
        "## Known limits",
        "- Trained and evaluated on the face crops of the sets above"
        f"{' (FERPlus: tight, frontal, 48 x 48 grey faces)' if 'ferplus' in sets else ''}. Faces elsewhere must be "
        "found and cropped the same way (python -m fer_train predict does); accuracy on other populations, poses, "
        "lighting, occlusion and video compression is not measured here.",
        "- The labels are perceived expressions by annotators, not emotions people felt; classes with few training "
        "images (contempt, disgust) are recognised least reliably (see their recall above).",
        "- The split used to choose best.pt (and fit the temperature) is optimistic as a test of the model.",
        "- The data sets' licences restrict use to research; a model trained on them inherits that. Do not use it "
        "to make decisions about individuals.",
        "",
        "## Versions",
        f"- fer-kernels {fer_kernels.__version__}, torch {torch.__version__}, Python {platform.python_version()}.",
        "",
    ]
    path = trainer.run_dir / "model-card.md"
    path.write_text("\n".join(lines))
    return path
