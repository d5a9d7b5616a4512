"""A run that must fit in a stated time (train.time_budget), evaluation included.

The number of steps is worked out once, early: after a few steps the engine knows what a training step
and an evaluation pass cost on this machine, and sets the run's length so that the training steps, the
evaluations every eval_every steps and the final evaluation (calibration, every test split, flip
test-time augmentation) end before the budget does; the learning-rate schedule then follows that length
as if it had been given in steps. The length is set again at every log step from the median of the
recent steps (the first steps are slower than the run's, and a shared machine's speed drifts by tens of
per cent within minutes), which changes no rate already used: while the rate is flat the fall moves with
the end, and once it falls its rest is stretched or shrunk from the rate it has
(fer_train.recipe.schedule.stretch_decay). The margin kept for noise is a share of the time left, so a
run ends close to its budget; if the machine turns out slower than measured the run stops training early
(and still evaluates and writes its reports). The clock starts with the command (`python -m fer_train` passes
the time it began, so its imports and data scan count) or, called from Python, with the Trainer; a resumed
run adds the time of its earlier sessions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["Budget", "MEASURE_STEPS", "REPLAN_WINDOW"]

MEASURE_STEPS = 20  # training steps timed before the run's length is set (after the first, which warms up)
REPLAN_WINDOW = 200  # the recent steps whose median step time sets the length again
SAFETY = 0.95  # of the time left that is planned for; the rest absorbs noise in the measurements
FINAL_FIXED_S = 20.0  # writing reports and the model card, building loaders: measured 5-15 s at 48 px


@dataclass
class Budget:
    seconds: float
    start: float  # time.perf_counter() at the start of the run
    step_seconds: float | None = None
    final_seconds: float | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def plan(self, step: int, step_seconds: float, eval_seconds: float, eval_every: int, final_seconds: float,
             upper: int) -> int:
        """The run's total number of steps (at most `upper`): `step` done so far, each further step costing
        step_seconds and every eval_every-th also eval_seconds, then a final evaluation of final_seconds."""
        self.step_seconds = step_seconds
        self.final_seconds = final_seconds + FINAL_FIXED_S
        left = SAFETY * (self.seconds - self.elapsed() - self.final_seconds)
        more = int(max(left, 0.0) / (step_seconds + eval_seconds / eval_every))
        return max(step + 1, min(upper, step + more))

    def exhausted(self) -> bool:
        """True when another training step would leave too little time for the final evaluation."""
        if self.step_seconds is None:
            return False
        return self.elapsed() + self.step_seconds + self.final_seconds > self.seconds
