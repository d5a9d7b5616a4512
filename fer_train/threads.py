"""The number of intra-op threads, chosen by measuring training steps: on a CPU that another program also
uses, fewer threads are faster.

An OpenMP parallel region ends when its slowest thread does. When another process takes part of a core (a
video call, a browser, a second run), the thread that shares that core is descheduled for milliseconds at a
time, and every region of the step waits for it. Measured on 2 cores, one training step of ResNet-18 + Mish +
ABP (batch 32, 48 px, bfloat16 autocast): 81 ms with 2 threads and 121 ms with 1 on a quiet machine; 154 ms
and 122 ms while another process kept one core busy half of the time; 400 ms and 119 ms while it kept one
core busy all of the time. The load changes while a run trains, so the choice is made again and again: in a
round, PROBE_STEPS steps run at one thread fewer and one more than now, and the fastest count stays when it
beats the current one by MARGIN. Rounds come PERIOD seconds apart, twice as far apart after each round that
kept the count (up to MAX_PERIOD: a round costs a few slower steps, about 2 % of a quiet machine's time at
one round in 30 s), and again PERIOD seconds after the last when the step time moves by MARGIN (a load that
came or went).

The thread count changes how reductions are split, so the weights then depend on when the count changed.
train.threads=auto therefore adapts only where a run depends on the clock anyway (a time budget); `adaptive`
always does, a number fixes the count (fer_train.engine).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from fer_train.errors import ConfigError

__all__ = ["FIRST_PROBE", "MARGIN", "MAX_PERIOD", "PERIOD", "PROBE_STEPS", "IntraOpThreads", "thread_setting"]

FIRST_PROBE = 10.0  # seconds of training before the first comparison: the load at the start counts too
PERIOD = 30.0  # seconds between two rounds of comparison, at the least: how soon a change in the load is followed
MAX_PERIOD = 240.0  # seconds between two rounds, at the most, while the count and the step time stay
PROBE_STEPS = 5  # steps timed per count (after one unmeasured step at the new count: oneDNN's new primitives)
MARGIN = 0.1  # another count is taken when its median step is this much faster: step times scatter by ~5 %


def thread_setting(value: str, time_budget: bool, device: torch.device, world: int) -> int | None:
    """What train.threads asks of this run: a fixed count (an int), 0 to adapt, None for torch's default.
    Raises ConfigError with the reason when the value does not fit the run."""
    if value.isdigit() and int(value) > 0:
        return int(value)
    if value not in ("auto", "adaptive"):
        raise ConfigError(f"train.threads must be auto, adaptive or a positive number of threads, got {value!r}")
    if device.type != "cpu" or world > 1:
        if value == "adaptive":
            raise ConfigError("train.threads=adaptive is for a run in one process on the CPU (the processes of a "
                             "distributed run wait for each other, so one process's step time says little)")
        return None
    return 0 if value == "adaptive" or time_budget else None


class IntraOpThreads:
    """Torch's intra-op thread count for one run. `setting` (from thread_setting): a count to use, 0 to adapt,
    None to leave it as it is. Feed it the wall time of every training step (`record`); when adapting, it sets
    the fastest of the current count and its neighbours, between 1 and the count at the start, and tells `say`
    when it changes the count and why. `restore` sets the count the process had before."""

    def __init__(self, setting: int | None, say: Callable[[str], None], period: float = PERIOD,
                 max_period: float = MAX_PERIOD, probe_steps: int = PROBE_STEPS, margin: float = MARGIN,
                 first_probe: float = FIRST_PROBE, clock: Callable[[], float] = time.perf_counter):
        self.before = torch.get_num_threads()
        if setting:
            torch.set_num_threads(setting)
        self.adapts, self.most = setting == 0, torch.get_num_threads()
        self.current = self.most  # the count chosen
        self._say, self._period, self._max_period, self._clock = say, period, max_period, clock
        self._probe_steps, self._margin = probe_steps, margin
        self._running = self.most  # the count set now: the current one, or the one being timed
        self._recent: list[float] = []  # step times at the current count since the last comparison
        self._timed: dict[int, float] = {}  # the counts compared in this round: median step time
        self._queue: list[int] = []  # the counts still to be timed in this round
        self._times: list[float] = []  # step times at the count being timed
        self._skip = False  # the first step after a change is not timed
        self._next_round = clock() + first_probe  # when the next round starts if the step time stays
        self._interval = period  # the time between the last round and the next
        self._last_round = -float("inf")  # when the last round ended
        self._baseline: float | None = None  # the median step time at the current count in the last round

    def settle(self) -> None:
        """Ends a comparison under way on the count chosen before it (training is over)."""
        self._queue = []
        self._run(self.current)

    def restore(self) -> None:
        torch.set_num_threads(self.before)

    @property
    def comparing(self) -> bool:
        return self._running != self.current or bool(self._queue)

    def record(self, seconds: float) -> None:
        """One training step took `seconds` of wall time (its data included)."""
        if not self.adapts or self._skip:
            self._skip = False
            return
        if not self.comparing:
            self._recent = [*self._recent, seconds][-self._probe_steps:]
            if self.most == 1 or len(self._recent) < self._probe_steps:
                return
            now, median = self._clock(), statistics.median(self._recent)
            moved = self._baseline is not None and abs(median / self._baseline - 1) > self._margin
            if now >= self._next_round or (moved and now >= self._last_round + self._period):
                self._timed = {self.current: median}
                self._queue = [n for n in (self.current - 1, self.current + 1) if 1 <= n <= self.most]
                self._next()
            return
        self._times.append(seconds)
        if len(self._times) == self._probe_steps:
            self._timed[self._running] = statistics.median(self._times)
            self._next()

    def _next(self) -> None:
        """Times the next count of the round, or ends the round on the fastest count."""
        if self._queue:
            self._times = []
            self._run(self._queue.pop(0))
            return
        fastest = min(self._timed, key=self._timed.get)
        if self._timed[fastest] < self._timed[self.current] * (1 - self._margin):
            times = ", ".join(f"{n}: {1e3 * s:.0f} ms" for n, s in sorted(self._timed.items()))
            self._say(f"intra-op threads {self.current} -> {fastest} (median step time by thread count: {times})")
            self.current, self._interval = fastest, self._period
        else:
            self._interval = min(2 * self._interval, self._max_period)
        self._run(self.current)
        self._baseline, self._recent, self._last_round = self._timed[self.current], [], self._clock()
        self._next_round = self._last_round + self._interval

    def _run(self, threads: int) -> None:
        if threads != self._running:
            torch.set_num_threads(threads)
            self._running, self._skip = threads, True
