"""The learning-rate schedule (docs/method.md section 3)."""

from __future__ import annotations

import math

__all__ = ["decay_start", "lr_factor", "stretch_decay"]


def decay_start(total: int, schedule: str, flat_fraction: float) -> float:
    """The step at which the rate starts to fall: after flat_fraction of the run with flat_cosine, at once
    with cosine; never with constant."""
    return {"flat_cosine": int(total * flat_fraction), "cosine": 0}.get(schedule, math.inf)


def lr_factor(step: int, total: int, schedule: str, flat_fraction: float, start: float | None = None) -> float:
    """The learning rate of step `step` (0-based) over the configured one: flat for flat_fraction of the
    run, then half a cosine down toward 0 at the end (the authors' schedule); or cosine from the start, or
    constant. `start` replaces the step the fall starts at once a run's length was changed during the fall
    (stretch_decay)."""
    first = decay_start(total, schedule, flat_fraction) if start is None else start
    if step < first:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - first) / max(total - first, 1)))


def stretch_decay(step: int, total: int, new_total: int, schedule: str, flat_fraction: float,
                  start: float | None = None) -> float | None:
    """lr_factor's `start` for a run whose length changes from total to new_total after `step` steps (a time
    budget sets it again as the machine's speed drifts), such that the rates of the steps done stay what
    they were and the next step's rate is unchanged: while the rate is flat the fall moves with the new
    length (None), unless the shorter run's fall would have begun already (it begins now); once falling,
    the rest of the fall stretches or shrinks from the rate it has now and still ends at 0 at new_total.
    The result may be a fraction of a step."""
    first = decay_start(total, schedule, flat_fraction) if start is None else start
    if step <= first:
        return start if decay_start(new_total, schedule, flat_fraction) >= step else float(step)
    done = (step - first) / max(total - first, 1)  # the fraction of the fall behind
    return first if done >= 1 else (step - done * new_total) / (1 - done)
