"""Evaluation: a model's confusion matrix, accuracy, macro-F1, loss and calibration on one evaluation split
(docs/method.md section 8); fer_train.reports.evaluate_and_report does it for every split of a run and
writes the reports.

    result = evaluate(model, build_loader(valid_set, 256, train=False), "ferplus valid")
    print(result.accuracy, result.macro_f1, result.loss, result.ece)

Accuracy and the confusion matrix use hard classes: the arg-max of the model's output, over the classes the
split can have (RAF-DB has no contempt, so its accuracy is over its own 7 classes), against the class index
or the arg-max of a soft target. The loss is the unweighted cross-entropy against the targets as given,
averaged over images. ECE is the expected calibration error of the top-class probability over 15 equal bins,
with the logits as they are and, when a temperature is given, divided by it (fer_train.calibration).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from fer_train.calibration import CalibrationBins, fit_temperature
from fer_train.data.base import CLASSES

__all__ = ["EvalResult", "confusion_matrix", "evaluate", "split_logits"]


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
    set without contempt, such as RAF-DB, lists 7), used to show absent classes as such; ece: expected
    calibration error of the raw probabilities, ece_calibrated: after dividing the logits by temperature."""

    name: str
    confusion: torch.Tensor
    loss: float
    present_classes: tuple[int, ...] = field(default_factory=lambda: tuple(range(len(CLASSES))))
    ece: float = math.nan
    temperature: float = 1.0
    ece_calibrated: float = math.nan

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

    @property
    def macro_f1(self) -> float:
        """The mean F1 over the classes that have images in the split (a class never predicted scores 0)."""
        counts = self.confusion.double()
        true, predicted, hits = counts.sum(1), counts.sum(0), counts.diagonal()
        scored = true > 0
        if not scored.any():
            return math.nan
        f1 = 2 * hits / (true + predicted).clamp_min(1)
        return float(f1[scored].mean())

    def to_dict(self) -> dict:
        """JSON-ready (NaN becomes None, which JSON has)."""
        per_class = self.per_class_accuracy.tolist()
        return {"name": self.name, "images": self.count, "accuracy": _finite_or_none(self.accuracy),
                "macro_f1": _finite_or_none(self.macro_f1), "loss": _finite_or_none(self.loss),
                "ece": _finite_or_none(self.ece), "temperature": self.temperature,
                "ece_calibrated": _finite_or_none(self.ece_calibrated),
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


def _present(loader, present_classes) -> tuple[int, ...]:
    if present_classes is None:
        dataset = getattr(getattr(loader, "pipeline", None), "dataset", None)  # a build_loader Loader's set
        present_classes = getattr(dataset, "present_classes", tuple(range(len(CLASSES))))
    return tuple(present_classes)


def split_logits(model: torch.nn.Module, loader, *, device=None, amp_dtype: torch.dtype | None = None,
                 channels_last: bool = False, tta: bool = False, present_classes: tuple[int, ...] | None = None,
                 progress: Callable[[int, int | None], None] | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """(float32 logits N x 8, targets) for every batch of `loader`, in eval mode and without gradients.
    Logits of classes the split cannot have are -inf (no probability, never predicted). tta: also the
    horizontally flipped image, and the logits are the log of the mean of the two passes' probabilities."""
    inner = _unwrap(model)
    device = torch.device(device) if device is not None else _model_device(inner)
    classes = len(CLASSES)
    absent = [c for c in range(classes) if c not in _present(loader, present_classes)]
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
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = inner(images).float()
                    if tta:
                        flipped = inner(images.flip(-1)).float()
                if logits.dim() != 2 or logits.shape[1] != classes:
                    raise ValueError(f"evaluate: the model gives outputs of shape {tuple(logits.shape)}, expected "
                                     f"N x {classes} (one logit per class of {CLASSES})")
                if absent:
                    logits[:, absent] = -math.inf
                if tta:
                    if absent:
                        flipped[:, absent] = -math.inf
                    logits = torch.logsumexp(torch.stack([logits.log_softmax(1), flipped.log_softmax(1)]), 0) \
                        - math.log(2)
                yield logits, targets.to(device, non_blocking=True)
                if progress is not None:
                    progress(done, total)
    finally:
        model.train(was_training)


def evaluate(model: torch.nn.Module, loader, name: str, *, device=None, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, progress: Callable[[int, int | None], None] | None = None,
             present_classes: tuple[int, ...] | None = None, temperature: float = 1.0,
             tta: bool = False) -> EvalResult:
    """Run `model` over every batch of `loader` ((images, targets) pairs, e.g. build_loader(..., train=False))
    and return the confusion matrix, mean cross-entropy and calibration.

    device: where the batches go (default: the model's parameters' device). amp_dtype: autocast to it
    (e.g. torch.bfloat16); the loss is computed in float32 either way. progress(done, total) is called
    after each batch (total is None when the loader has no len()). The model is put in eval mode and
    back in its previous mode afterwards. Under torch.distributed, each rank passes its own shard and
    every rank gets the global result (counts and sums are all-reduced). present_classes: the classes the
    split can have; by default the loader's data set's (build_loader), else all. temperature: the
    calibration temperature whose ECE is reported beside the raw one. tta: horizontal-flip test-time
    augmentation (split_logits).
    """
    inner = _unwrap(model)
    device = torch.device(device) if device is not None else _model_device(inner)
    present = _present(loader, present_classes)
    classes = len(CLASSES)
    # accumulated on the device, so there is no host sync per batch
    confusion = torch.zeros(classes, classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    raw, calibrated = CalibrationBins(device), CalibrationBins(device)
    for logits, targets in split_logits(model, loader, device=device, amp_dtype=amp_dtype, channels_last=channels_last,
                                        tta=tta, present_classes=present, progress=progress):
        # cross_entropy takes class indices or probabilities alike (soft FERPlus targets)
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
        truth = targets.argmax(1) if targets.is_floating_point() else targets
        confusion += confusion_matrix(logits.argmax(1), truth, classes)
        raw.add(logits, truth)
        calibrated.add(logits / temperature, truth)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # each rank saw a disjoint shard: sums of counts and losses are the global ones
        for total in (confusion, loss_sum, raw.sums, calibrated.sums):
            torch.distributed.all_reduce(total)
    count = int(confusion.sum())
    loss = float(loss_sum) / count if count else math.nan
    return EvalResult(name, confusion, loss, present, raw.ece(), float(temperature), calibrated.ece())


def selection_temperature(model: torch.nn.Module, loader, *, device=None, amp_dtype: torch.dtype | None = None,
                          channels_last: bool = False) -> tuple[float, int]:
    """The calibration temperature of the model's logits on a split (fer_train.calibration), and the number of
    images it saw; under torch.distributed every rank's shard is gathered so all ranks get the same value."""
    pairs = [(logits.cpu(), (targets.argmax(1) if targets.is_floating_point() else targets).cpu())
             for logits, targets in split_logits(model, loader, device=device, amp_dtype=amp_dtype,
                                                 channels_last=channels_last)]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, pairs)
        pairs = [pair for shard in gathered for pair in shard]
    logits, targets = (torch.cat(part) for part in zip(*pairs))
    return fit_temperature(logits, targets), len(targets)
