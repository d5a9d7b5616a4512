"""train.threads: what each value means for a run, the choice of the intra-op thread count by timed steps
(on a simulated clock, with step times that depend on the count set), and the engine setting and restoring it."""

from __future__ import annotations

import pytest
import torch

from fer_train.cli import main
from fer_train.errors import ConfigError
from fer_train.threads import FIRST_PROBE, MAX_PERIOD, PERIOD, PROBE_STEPS, IntraOpThreads, thread_setting
from helpers import TINY

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _threads_back():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("value, budget, device, world, expected", [
    ("3", False, CPU, 1, 3), ("1", True, CUDA, 2, 1),  # a number is a number everywhere
    ("auto", True, CPU, 1, 0), ("auto", False, CPU, 1, None),  # adapts only where the clock sets the run
    ("auto", True, CUDA, 1, None), ("auto", True, CPU, 2, None),
    ("adaptive", False, CPU, 1, 0),
])
def test_what_each_setting_asks_for(value, budget, device, world, expected):
    assert thread_setting(value, budget, device, world) == expected


@pytest.mark.parametrize("value, device, world, words", [
    ("two", CPU, 1, "train.threads must be auto, adaptive or a positive number"), ("0", CPU, 1, "got '0'"),
    ("-2", CPU, 1, "got '-2'"), ("adaptive", CUDA, 1, "one process on the CPU"), ("adaptive", CPU, 2, "one process"),
])
def test_a_setting_that_does_not_fit_is_refused_by_name(value, device, world, words):
    with pytest.raises(ConfigError, match=words):
        thread_setting(value, False, device, world)


class Machine:
    """A simulated host: a step takes `profile[threads set now]` seconds, and the step after a change of the
    count costs `switch_cost` times as much (new oneDNN primitives)."""

    def __init__(self, profile: dict, switch_cost: float = 1.0):
        self.profile, self.switch_cost, self.now, self.said = profile, switch_cost, 0.0, []
        self._last = torch.get_num_threads()
        self.counts: list[int] = []

    def clock(self) -> float:
        return self.now

    def run(self, threads: IntraOpThreads, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            n = torch.get_num_threads()
            step = self.profile[n] * (self.switch_cost if n != self._last else 1.0)
            self._last = n
            self.now += step
            self.counts.append(n)
            threads.record(step)


def _adaptive(machine: Machine, most: int) -> IntraOpThreads:
    torch.set_num_threads(most)
    return IntraOpThreads(0, machine.said.append, clock=machine.clock)


def test_a_quiet_machine_keeps_every_thread_and_compares_less_and_less_often():
    machine = Machine({2: 0.08, 1: 0.12}, switch_cost=3.0)
    threads = _adaptive(machine, 2)
    machine.run(threads, 3600)
    assert threads.current == 2 and torch.get_num_threads() == 2 and machine.said == []
    at_one = [i for i, n in enumerate(machine.counts) if n == 1]
    rounds = 1 + sum(b > a + 1 for a, b in zip(at_one, at_one[1:]))
    assert len(at_one) == rounds * (PROBE_STEPS + 1) and 3600 / MAX_PERIOD < rounds < 3600 / MAX_PERIOD + 6


def test_a_core_taken_by_another_process_moves_to_fewer_threads_and_back_when_it_is_free():
    machine = Machine({2: 0.15, 1: 0.12})
    threads = _adaptive(machine, 2)
    machine.run(threads, FIRST_PROBE + 2)  # the first round: right after the start
    assert threads.current == 1 and torch.get_num_threads() == 1
    assert machine.said == ["intra-op threads 2 -> 1 (median step time by thread count: 1: 120 ms, 2: 150 ms)"]
    machine.run(threads, 3 * PERIOD)
    assert threads.current == 1 and len(machine.said) == 1  # compared again, and stayed
    machine.profile = {2: 0.08, 1: 0.12}  # the other process ended; the step at 1 thread takes as long as before
    machine.run(threads, MAX_PERIOD + 2)
    assert threads.current == 2 and torch.get_num_threads() == 2
    assert machine.said[-1].startswith("intra-op threads 1 -> 2")


def test_a_load_that_comes_is_followed_within_a_period_when_rounds_have_grown_far_apart():
    machine = Machine({2: 0.08, 1: 0.12})
    threads = _adaptive(machine, 2)
    machine.run(threads, 450)  # rounds at about 10, 70, 190 and 430 s; the next would come at about 670
    machine.profile = {2: 0.15, 1: 0.12}
    machine.run(threads, PERIOD + 5)
    assert threads.current == 1 and machine.said[0].startswith("intra-op threads 2 -> 1")


def test_it_walks_to_the_fastest_count_and_not_beyond():
    machine = Machine({4: 0.20, 3: 0.10, 2: 0.14, 1: 0.30})
    threads = _adaptive(machine, 4)
    machine.run(threads, FIRST_PROBE + 6 * PERIOD)
    assert threads.current == 3 and [s.split(" (")[0] for s in machine.said] == ["intra-op threads 4 -> 3"]
    assert max(machine.counts) == 4  # never more threads than at the start


def test_a_gain_within_the_margin_or_only_on_the_first_step_after_a_change_is_no_reason_to_move():
    machine = Machine({2: 0.100, 1: 0.095}, switch_cost=0.01)  # 5 % faster; 100x faster on its first step
    threads = _adaptive(machine, 2)
    machine.run(threads, 5 * PERIOD)
    assert threads.current == 2 and machine.said == []


def test_settle_ends_a_comparison_on_the_count_chosen_and_restore_gives_back_the_count_before():
    torch.set_num_threads(1)
    machine = Machine({2: 0.08, 1: 0.12})
    torch.set_num_threads(2)
    threads = IntraOpThreads(0, machine.said.append, clock=machine.clock)
    machine.run(threads, FIRST_PROBE + 0.08 * (PROBE_STEPS + 2))  # into the round, timing 1 thread
    assert threads.comparing and torch.get_num_threads() == 1
    threads.settle()
    assert not threads.comparing and torch.get_num_threads() == 2
    threads.restore()
    assert torch.get_num_threads() == 2  # the count when it was made
    fixed = IntraOpThreads(1, machine.said.append, clock=machine.clock)
    machine.run(fixed, 4 * PERIOD)
    assert torch.get_num_threads() == 1 and set(machine.counts[-10:]) == {1}
    fixed.restore()
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("setting, header", [("1", "intra-op threads 1;"),
                                             ("adaptive", "intra-op threads 2 (adapting to the load)")])
def test_the_run_uses_the_setting_says_so_and_leaves_the_process_as_it_was(tmp_path, capsys, setting, header):
    torch.set_num_threads(2)
    main(["train", *TINY, "--set", "train.steps=2", "--set", f"train.threads={setting}", "--out", str(tmp_path)])
    assert header in capsys.readouterr().out
    assert torch.get_num_threads() == 2
    card = (tmp_path / "model-card.md").read_text()
    assert ("the count followed the load" in card) == (setting == "adaptive")


def test_a_wrong_setting_stops_the_command_with_its_name(tmp_path, capsys):
    assert main(["train", *TINY, "--set", "train.threads=many", "--out", str(tmp_path)]) == 2
    assert "train.threads must be auto, adaptive or a positive number of threads, got 'many'" in capsys.readouterr().err
