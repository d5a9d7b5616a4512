"""What the DALI and PyTorch pipelines share: which samples a rank reads (EpochOrder), the position in the
epoch that a checkpoint holds, how a sample's record and target are found, how each batch's augmentation
parameters are drawn (from (seed, epoch, sample index) alone, with a repeated draw's number under
class-balanced sampling: every pipeline, worker count and resumed run gives a sample the same draws), what
happens to an image that cannot be read, and how input worker processes treat stop signals and are reported
when they die or stall.

An image that passed the opening checks can still fail when it is read (deleted, truncated or overwritten
mid-run). The reading process (a worker, or the main process without workers) does not raise: it returns
its failures, (sample, reason, message), with the batch, and the main process raises one DataError naming
the file (on_error="raise"), or counts the sample once in `skipped` (on_error="skip"), where the next
sample of the data set that reads stands in for it, so that batches keep their size and a resumed run
reads what the first one read.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections import Counter
from pathlib import Path

import torch

from fer_train.config import DataConfig
from fer_train.data.base import CLASSES, FERDataset, Record, unusable
from fer_train.data.images import ImageError
from fer_train.data.order import EpochOrder, sample_weights
from fer_train.errors import DataError
from fer_train.recipe.augmentation import AugmentConfig, AugmentParams, sample_keys, sample_params

__all__ = ["InputWorkerError", "Pipeline", "is_stopped", "shield_worker", "stack_targets", "starting_workers",
           "worker_failure", "worker_state"]

_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_STOPPED = ("T", "t")  # /proc/PID/stat states of a stopped process: by a signal, by a debugger
RESUME = "python -m fer_train train --resume RUN"


class InputWorkerError(RuntimeError):
    """An input worker process died, is stopped, or gave no batch within the pipeline's timeout."""


def stack_targets(targets: list[torch.Tensor], classes: int = len(CLASSES)) -> torch.Tensor:
    """Class indices (int64 N), or N x classes probabilities if any sample has soft targets (a combined
    set of FERPlus vote distributions and hard labels): the hard ones become one-hot."""
    if all(t.dim() == 0 for t in targets):
        return torch.stack(targets).long()
    return torch.stack([t.float() if t.dim() else torch.nn.functional.one_hot(t.long(), classes).float()
                        for t in targets])


class Pipeline:
    """Batches of (normalised images on `device`, targets) for one rank; one epoch per iteration. An
    iteration stopped early resumes at the first batch not handed out; state_dict() holds (epoch, position).
    timeout: seconds without a batch from the worker processes before InputWorkerError. class_balance:
    training samples drawn with weight (their class's count) ** -class_balance (order.sample_weights).
    decoded_cache_mb: decoded images the PyTorch pipeline keeps when it reads in the main process (0: none)."""

    def __init__(self, dataset, batch_size: int, train: bool, device: torch.device, *, config=AugmentConfig(),
                 seed: int = 0, rank: int = 0, world: int = 1, num_workers: int = 2, out_dtype=torch.float32,
                 channels_last: bool = False, timeout: float = DataConfig.timeout, class_balance: float = 0.0,
                 decoded_cache_mb: float = DataConfig.decoded_cache_mb):
        if not timeout > 0:
            raise ValueError(f"the input pipeline's timeout must be a positive number of seconds, got {timeout!r}")
        self.dataset, self.batch_size, self.train, self.device = dataset, batch_size, train, device
        self.config, self.seed, self.out_dtype, self.channels_last = config, seed, out_dtype, channels_last
        self.num_workers, self.timeout, self.decoded_cache_mb = num_workers, timeout, decoded_cache_mb
        weights = sample_weights(dataset.labels(), class_balance) if train and class_balance else None
        self.order = EpochOrder(len(dataset), batch_size, train, seed, rank, world, weights)
        self.epoch, self.position = 0, 0  # the next batch to read
        self.skipped: Counter = Counter()  # samples left out while reading, by reason (each sample once)
        self._left_out: set[int] = set()  # the samples counted in skipped
        self._failed: dict[int, tuple[int, str, str]] = {}  # in the reading process: samples skipped as unreadable

    def __len__(self) -> int:
        return len(self.order)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def close(self) -> None:
        """Ends worker processes kept between iterations now (the DALI pipeline's; the PyTorch pipeline's end
        with each iteration); iterating again starts new ones where it stopped."""

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def sample(self, index: int) -> tuple[FERDataset, int, Record]:
        """(the data set holding sample `index`, its index there, its record)."""
        part, local = self.dataset.locate(int(index))
        return part, local, part.records[local]

    @staticmethod
    def target(record: Record) -> torch.Tensor:
        if record.soft is not None:
            return torch.tensor(record.soft, dtype=torch.float32)
        return torch.tensor(record.label, dtype=torch.int64)

    def params(self, boxes: torch.Tensor, indices, epoch: int, repeats=None) -> AugmentParams:
        """The augmentation parameters of samples `indices` of `epoch` whose faces lie in `boxes`; repeats: how
        often each was drawn before in the epoch (EpochOrder.batch_repeats; None: never)."""
        keys = sample_keys(self.seed, epoch, indices, repeats) if self.train else None
        return sample_params(boxes, self.train, keys, self.config)

    # --- images that cannot be read -----------------------------------------------------------------

    def read(self, index: int, load) -> tuple[object, list[tuple[int, str, str]]]:
        """(load(part, local index, record) of sample `index`, the failures met), in the reading process.

        When the sample does not load (ImageError) and its set skips bad images, the next sample that loads
        stands in (wrapping around); with on_error="raise", or when no sample loads, the search ends at the
        failure: (None, failures). A skipped sample is passed over without another try in this process,
        and reported again (note() counts each sample once)."""
        failures = []
        for step in range(len(self.dataset)):
            j = (index + step) % len(self.dataset)
            part, local, record = self.sample(j)
            failure = self._failed.get(j)
            if failure is None:
                try:
                    return load(part, local, record), failures
                except ImageError as err:
                    failure = j, err.reason, str(err)
                if part.on_error == "skip":
                    self._failed[j] = failure
            failures.append(failure)
            if part.on_error == "raise":
                break
        return None, failures

    def note(self, failures, complete: bool = True) -> None:
        """In the main process, with a batch's failures: raise the first of a set that raises, count the
        others once each. complete: whether the batch came whole (False: no sample of the set loads)."""
        for index, reason, message in failures:
            if self.sample(index)[0].on_error == "raise":
                raise DataError(unusable(reason, message))
            if index not in self._left_out:
                self._left_out.add(index)
                self.skipped[reason] += 1
        if not complete:
            raise DataError(f"none of the {len(self.dataset)} images of {getattr(self.dataset, 'name', 'the set')} "
                            f"loads (the last: {failures[-1][2]}); check its files")


# --- input worker processes ---------------------------------------------------------------------------

@contextlib.contextmanager
def starting_workers():
    """Blocks SIGTERM and SIGINT in this thread while it starts input worker processes, which inherit the
    mask: a worker starts with both blocked, so a stop signal sent to the process group while it starts
    cannot kill it before shield_worker has run. A signal that arrives meanwhile stays pending here and
    is delivered, not lost, when the mask is restored."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def shield_worker(main: int) -> None:
    """Run first in an input worker process (started under starting_workers), in its main thread; `main`:
    the pid of the process the worker reads for.

    `timeout`, `scancel` and `systemctl stop` signal the whole process group: the main process finishes its
    step and saves a checkpoint (fer_train.engine), which needs its input workers alive until then. So a
    worker ignores SIGINT, and SIGTERM from anyone but the main process: SIGTERM stays blocked and a thread
    takes it with sigtimedwait, which tells the sender (a Python handler could not); from the main process
    (how multiprocessing and DataLoader shut workers down) it exits at once. The thread also ends the
    worker within a second of its parent's death (the main process, or a fork server that ends with it),
    as a main process killed by SIGKILL shuts nothing down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # also discards a SIGINT pending since the start
    signal.signal(signal.SIGTERM, _ignore)  # a thread that somehow has SIGTERM unblocked ignores it too
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_guard, args=(main, os.getppid()), name="fer-train-worker-guard", daemon=True).start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _ignore(signum, frame) -> None:
    pass


def _guard(main: int, parent: int) -> None:
    try:
        os.kill(main, 0)
    except ProcessLookupError:  # it died while this worker started: `parent` is already someone else
        os._exit(0)
    while True:
        info = signal.sigtimedwait({signal.SIGTERM}, 1.0)
        if os.getppid() != parent or (info is not None and info.si_pid in (main, parent)):
            os._exit(0)  # as DataLoader's own handler does for its parent's SIGTERM: no error to report


def worker_state(process) -> tuple[bool, str]:
    """(whether it can no longer deliver, how it is) for a worker process (a multiprocessing.Process):
    "pid N was killed by SIGKILL", "pid N is stopped (...)", "pid N is running", ... from its exit status
    or /proc/N/stat."""
    code = process.exitcode
    if code is not None:
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (the out-of-memory killer sends SIGKILL: see `dmesg`)" if -code == signal.SIGKILL else ""
            return True, f"pid {process.pid} was killed by {name}{hint}"
        return True, f"pid {process.pid} exited with status {code}"
    state = _state(process.pid)
    if state is None:
        return True, f"pid {process.pid} has exited"
    if state in _STOPPED:
        return True, f"pid {process.pid} is stopped (state {state}: SIGSTOP, Ctrl-Z or a debugger)"
    if state in ("Z", "X"):
        return True, f"pid {process.pid} has exited"
    what = {"R": "is running", "S": "is waiting (state S)", "D": "is waiting for the disk or network (state D)"}
    return False, f"pid {process.pid} {what.get(state, f'is in state {state}')}"


def is_stopped(process) -> bool:
    """Whether a worker process (a multiprocessing.Process) is stopped: SIGSTOP, Ctrl-Z or a debugger."""
    return process.exitcode is None and _state(process.pid) in _STOPPED


def _state(pid: int) -> str | None:
    """The process's state letter from /proc/PID/stat (R, S, D, T, Z, ...), None when it has gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None


def worker_failure(kind: str, processes, waited: float | None, timeout: float) -> InputWorkerError | None:
    """The error for the `kind` pipeline's input workers (multiprocessing.Process) when one has died or is
    stopped, or, when the main process has waited `timeout` seconds for a batch (waited), whatever their
    states; None when neither holds (an error of another kind)."""
    states = [worker_state(p) for p in processes]
    if waited is not None and waited >= timeout:
        described = "; worker ".join(text for _, text in states) or "none is left"
        return InputWorkerError(f"no batch from the {kind} pipeline's input workers for {waited:.0f} s (data.timeout "
                                f"{timeout:g} s): worker {described}. Resume the run from its last checkpoint "
                                f"({RESUME}); if the workers are only slow (large images, a slow disk), raise "
                                f"data.timeout")
    ended = [text for failed, text in states if failed]
    if ended:
        return InputWorkerError(f"the {kind} pipeline's input worker {'; worker '.join(ended)}, and the run cannot "
                                f"go on without it: resume the run from its last checkpoint ({RESUME})")
    return None
