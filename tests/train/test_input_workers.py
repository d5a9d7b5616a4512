"""The input pipelines' worker processes: they outlive a stop signal sent to the whole process group (so
the run saves and resumes exactly), end with their parent, and when one dies or stops the run ends with
an error naming it instead of failing obscurely or hanging. Each case runs in a process group of its own."""

import os
import signal
import subprocess
import time

import pytest
import torch

from fer_train import checkpoint
from fer_train.data import dali_available
from helpers import TINY, process_group_gone, python_process

BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                   reason="nvidia-dali is not installed"))]
# a constant learning rate: the interrupted run (1000 steps planned) and the straight one (N) agree step by step
TRAIN = ["-m", "fer_train", "train", "--batch-size", "4", *TINY, "--set", "optim.schedule=constant"]


def _finish(process: subprocess.Popen, timeout: float = 300, input: str | None = None) -> tuple[str, str]:
    """(stdout, stderr) of the process once it ends; killed with its group if it takes longer than timeout."""
    try:
        return process.communicate(input, timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stop_signal_to_the_group_saves_and_resumes_exactly(tmp_path, backend):
    """SIGTERM to every process of the run (what timeout, scancel and systemctl stop do) while its input
    workers run: the run finishes its step, writes last.pt and exits 143, and nothing of it is left; resumed
    to N steps it has the weights of a run of N steps that was never stopped. The two run side by side, which
    on 2 cores made DALI's worker pool hang at the end of one of them (until DaliPipeline.close waited for
    DALI's observer thread)."""
    data = ["--set", f"data.backend={backend}", "--set", "data.workers=1"]
    run = tmp_path / "stopped"
    process = python_process([*TRAIN, *data, "--steps", "1000", "--out", str(run)])
    for line in process.stdout:
        if line.startswith("step"):  # training has started: the workers are reading
            os.killpg(process.pid, signal.SIGTERM)
            break
    out, err = _finish(process)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped (SIGTERM)" in out and "Traceback" not in err
    assert process_group_gone(process.pid), "a worker outlived the run"
    steps = checkpoint.load(run / "last.pt")["step"] + 2
    # the resumed and the straight run side by side (one thread each); TRAIN's settings apply to both
    finished = [python_process([*TRAIN, *data, "--steps", str(steps), *args], stdout=subprocess.DEVNULL)
                for args in (["--resume", str(run)], ["--out", str(tmp_path / "straight")])]
    for process in finished:
        _, err = _finish(process)
        assert process.returncode == 0, err[-3000:]
    resumed, straight = (checkpoint.load(tmp_path / name / "last.pt") for name in ("stopped", "straight"))
    assert resumed["step"] == straight["step"] == steps
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def _reader(backend: str, stop_handler: bool = False, hold: bool = False) -> str:
    """A script reading a synthetic set with one worker and a 3 s timeout, which prints the worker's pid after
    the first batch; with stop_handler, it handles SIGTERM and SIGINT as the engine does and waits for one
    before reading on; with hold, it reads on once a line comes on its standard input."""
    handler = """
for stop in (signal.SIGTERM, signal.SIGINT):
    signal.signal(stop, lambda signum, frame: got.append(signum))
""" if stop_handler else ""
    wait = "while not got:\n    time.sleep(0.01)" if stop_handler else "sys.stdin.readline()" if hold else ""
    return f"""
import multiprocessing, signal, sys, time
from fer_train.data import build_loader, open_dataset
from fer_train.recipe.augmentation import AugmentConfig
got = []
{handler}
data = open_dataset("synthetic", None, "val", size=16, length=400)
loader = build_loader(data, 4, False, device="cpu", backend={backend!r}, num_workers=1, timeout=3,
                      config=AugmentConfig(out_size=16, resize=18))
batches = iter(loader)
next(batches)
print("worker", *[p.pid for p in multiprocessing.active_children()], flush=True)
{wait}
for _ in batches:
    pass
print("read everything", flush=True)
"""


def _worker(process: subprocess.Popen) -> int:
    line = process.stdout.readline()
    assert line.startswith("worker "), line + process.stderr.read()[-3000:]
    (pid,) = map(int, line.split()[1:])
    return pid


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_workers_outlive_a_stop_signal_to_the_group(backend, stop):
    """The main process handles the signal; the worker it needs for the rest of the epoch is still there."""
    process = python_process(["-c", _reader(backend, stop_handler=True)])
    worker = _worker(process)
    os.killpg(process.pid, stop)
    out, err = _finish(process, timeout=120)
    assert process.returncode == 0 and "read everything" in out, err[-3000:]
    assert process_group_gone(process.pid), f"worker {worker} outlived the run"


@pytest.mark.parametrize("waiting", [False, True], ids=["reading", "waiting-for-work"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_killed_worker_is_named_with_how_it_ended(backend, waiting):
    """Killed as soon as the first batch is in, or a second later, when it has filled the queue and sleeps
    until asked for more: then DALI's task queue would wait for good for the dead sleeper to take the next
    task (a multiprocessing Condition counts on the woken to answer). Either way the error names it."""
    process = python_process(["-c", _reader(backend, hold=waiting)], stdin=subprocess.PIPE if waiting else None)
    worker = _worker(process)
    if waiting:
        time.sleep(1.0)
    os.kill(worker, signal.SIGKILL)
    out, err = _finish(process, timeout=60, input="go\n" if waiting else None)
    assert process.returncode != 0 and "read everything" not in out
    # the PyTorch DataLoader may report it first, from its SIGCHLD handler: "worker (pid N) is killed by
    # signal: Killed" (when it lands outside the pipeline's wait for a batch)
    assert f"pid {worker}" in err and ("was killed by SIGKILL" in err or "killed by signal: Killed" in err), err[-3000:]
    if backend == "dali":
        assert f"InputWorkerError: the DALI pipeline's input worker pid {worker} was killed by SIGKILL" in err
        assert "--resume RUN" in err
    assert process_group_gone(process.pid)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stopped_worker_ends_the_wait_with_its_state(backend):
    """Stopped a second after the first batch, when it has filled the queue while the main process held: the
    batches it sent before the stop are still to be read, and reading them must not need the worker."""
    process = python_process(["-c", _reader(backend, hold=True)], stdin=subprocess.PIPE)
    worker = _worker(process)
    time.sleep(1.0)
    os.kill(worker, signal.SIGSTOP)
    try:
        out, err = _finish(process, timeout=60, input="go\n")  # the 3 s timeout, not forever
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):  # whatever happened, nothing is left stopped
            try:
                os.kill(worker, sig)
            except ProcessLookupError:
                pass
    assert process.returncode != 0 and "read everything" not in out
    assert "InputWorkerError: no batch from the" in err and "input workers for 3 s (data.timeout 3 s)" in err
    assert f"worker pid {worker} is stopped (state T" in err and "--resume RUN" in err, err[-3000:]
    assert process_group_gone(process.pid)


@pytest.mark.parametrize("backend", BACKENDS)
def test_workers_end_with_their_parent(backend):
    """A main process killed outright shuts nothing down: its workers notice and exit."""
    process = python_process(["-c", _reader(backend)])
    worker = _worker(process)
    process.kill()
    _finish(process, timeout=60)
    assert process_group_gone(process.pid), f"worker {worker} outlived its parent"


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
def test_dali_reads_in_process_for_a_script_on_standard_input():
    """python - < script.py: spawned workers cannot import a main module read from standard input, so the
    pipeline reads in the main process, with a one-line warning."""
    process = python_process(["-"], stdin=subprocess.PIPE)
    out, err = _finish(process, timeout=120, input=_reader("dali"))
    assert process.returncode == 0 and "read everything" in out, err[-3000:]
    warnings = [line for line in err.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "reads its files in the main process" in warnings[0], err[-3000:]
