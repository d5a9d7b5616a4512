"""The learning-rate schedule (docs/method.md section 3)."""

from __future__ import annotations

import math

__all__ = ["lr_factor"]


def lr_factor(step: int, total: int, schedule: str, flat_fraction: float) -> float:
    """The learning rate of step `step` (0-based) over the configured one: flat for flat_fraction of the
    run, then half a cosine down toward 0 at the end (the authors' schedule); or cosine from the start, or
    constant."""
    if schedule == "constant":
        return 1.0
    flat = int(total * flat_fraction) if schedule == "flat_cosine" else 0
    if step < flat:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - flat) / max(total - flat, 1)))
