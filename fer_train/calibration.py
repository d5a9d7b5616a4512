"""Calibrated probabilities: the expected calibration error (ECE) of a model's top-class probability, and
the temperature that makes them honest (Guo et al. 2017: one scalar T, logits / T, fitted by minimising the
negative log-likelihood on a held-out split; accuracy does not change, as the arg-max does not)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["BINS", "CalibrationBins", "fit_temperature"]

BINS = 15  # equal-width confidence bins, the usual choice for ECE


class CalibrationBins:
    """Per confidence bin: images, sum of top-class probabilities, correct predictions; accumulated on the
    device, summed across processes by the caller (`sums`), turned into the ECE at the end."""

    def __init__(self, device):
        self.sums = torch.zeros(3, BINS, dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor, truth: torch.Tensor) -> None:
        confidence, predicted = logits.float().softmax(1).max(1)
        bins = (confidence * BINS).long().clamp(max=BINS - 1)
        for row, values in enumerate((torch.ones_like(confidence), confidence, (predicted == truth).float())):
            self.sums[row] += torch.bincount(bins, values.double(), minlength=BINS)

    def ece(self) -> float:
        """sum over bins of |accuracy - confidence| weighted by the bin's share of the images."""
        count, confidence, correct = self.sums
        total = count.sum()
        return float((correct - confidence).abs().sum() / total) if total > 0 else math.nan


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The T > 0 minimising the mean cross-entropy of logits / T against targets (class indices or
    probabilities). logits: N x K, -inf allowed for classes a split cannot have."""
    logits, targets = logits.detach().double(), targets.detach()
    if logits.shape[0] == 0:
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = exp(log_t): always positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    return temperature if math.isfinite(temperature) else 1.0
