"""The training engine: the paper's recipe (docs/method.md sections 3-8) as a step-based loop.

Per optimizer step: `accumulation` micro-batches per process, each FMix-mixed by the loader, through the model under
autocast, the class-weighted FMix loss backward (DDP averages the gradients across processes on the last micro-batch
only); then one optimizer step (GradScaler's with fp16) at the learning rate of the flat-then-cosine schedule. Every
eval_every steps: evaluation on the selection set (mixed-val, or the one validation split) and on each set's
validation split, and best.pt when the selection accuracy improves (best.pt is the model file; with train.ema, of
the moving average of the weights); every checkpoint_every steps and at the end: last.pt (the training state). The
loss and the weights are checked finite before anything is saved. At the end the best model's temperature is fitted
on the selection split, and it is evaluated on every test split given (also with flip test-time augmentation), with
confusion matrices (CSV, PNG), a summary table and model-card.md. With train.time_budget the run's length is set
from timed steps so that all of it fits (fer_train.budget).

Resuming restores the model, the optimizer (Lookahead's slow weights included), the scaler, the step, the data
position and the RNG states: the data order and every augmentation and FMix draw depend on (seed, epoch, batch,
sample) only, so a resumed run computes the same steps as one that never stopped.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fer_train import checkpoint
from fer_train.budget import MEASURE_STEPS, REPLAN_WINDOW, Budget
from fer_train.config import RunConfig, installed, parse_duration
from fer_train.data import CLASSES, MixedTargets, build_loader, class_weights
from fer_train.distributed import init_distributed, select_device
from fer_train.errors import ConfigError
from fer_train.evaluation import evaluate, selection_temperature
from fer_train.factories import amp_dtype, build_ema, build_model, build_net, build_optimizer
from fer_train.host import keep_freed_memory
from fer_train.model_card import write_model_card
from fer_train.recipe.fmix import FMix, fmix_loss
from fer_train.recipe.schedule import lr_factor, stretch_decay
from fer_train.reports import evaluate_and_report
from fer_train.run_data import open_run_data
from fer_train.runlog import RunLog, describe
from fer_train.threads import IntraOpThreads, thread_setting

__all__ = ["NonFiniteLoss", "Trainer"]


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    """One run: `Trainer(config, run_dir).fit()`; `resume` is a checkpoint dict (fer_train.checkpoint.load); `started`
    (a time.perf_counter() reading, default now) is when the session began: the command line's own start."""

    def __init__(self, config: RunConfig, run_dir: Path, resume: dict | None = None, stop_after: int | None = None,
                 started: float | None = None):
        self.config, self.run_dir, self.stop_after = config, Path(run_dir), stop_after
        self._session_start = time.perf_counter() if started is None else started
        t = config.train
        self.dist = init_distributed("cuda" if t.device.startswith("cuda") or (
            t.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.device = select_device(t.device, self.dist)
        micro = t.micro_batch or t.batch_size // self.dist.world
        if t.batch_size % (micro * self.dist.world):
            raise ConfigError(f"train.batch_size {t.batch_size} is not a multiple of micro_batch {micro} x "
                              f"{self.dist.world} processes")
        if micro < 2:
            raise ConfigError(f"each process needs at least 2 images per micro-batch (batch norm), got {micro}")
        self.micro_batch, self.accumulation = micro, t.batch_size // (micro * self.dist.world)
        self.amp_dtype = amp_dtype(t.amp, self.device)
        if self.amp_dtype is not None and self.device.type == "cpu" and self.amp_dtype == torch.float16:
            raise ConfigError("train.amp=fp16 needs a GPU; use bf16 or none on the CPU")
        if t.compile and self.dist.world > 1 and self.device.type == "cpu":
            raise ConfigError("train.compile with several CPU processes is not supported; drop one of them")

        self.keeps_freed_memory = t.keep_freed_memory and keep_freed_memory()
        # intra-op threads: a count, 0 to adapt to the load (fer_train.threads), None to leave torch's
        self.threads = thread_setting(t.threads, bool(t.time_budget), self.device, self.dist.world)
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.data = open_run_data(config)
        if self.data.test and not installed("matplotlib"):  # found now, not after hours of training
            raise ConfigError("the run ends by plotting confusion matrices, which needs matplotlib: pip install "
                              "matplotlib (or fer-kernels[train])")
        if len(self.data.train) < micro * self.dist.world:
            raise ConfigError(f"the training set has {len(self.data.train)} images, fewer than one micro-batch of "
                              f"{micro} on each of {self.dist.world} processes: lower train.batch_size")
        self.model = build_model(config.model, pretrained=resume is None).to(self.device)
        self.model = self.model.to(memory_format=torch.channels_last) if t.channels_last else self.model
        self.optimizer = build_optimizer(self.model, config.optim)
        self.ema = build_ema(self.model, t.ema) if t.ema else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.weights = class_weights(self.data.train.class_counts(), config.data.class_weights).to(self.device)
        d = config.data
        fmix = FMix(d.fmix_alpha, d.fmix_decay_power, d.fmix_per_sample) if d.fmix else None
        self.loader = build_loader(self.data.train, micro, True, d.image_size, self.device, d.backend, fmix, t.seed,
                                   rank=self.dist.rank, world=self.dist.world, num_workers=d.workers, crop=d.crop,
                                   channels_last=t.channels_last, timeout=d.timeout, class_balance=d.class_balance,
                                   zoom=d.zoom, translate=d.translate, decoded_cache_mb=d.decoded_cache_mb)
        self.step, self.best = 0, {"accuracy": -1.0, "step": None}
        self.decay_from: float | None = None  # where the rate's fall starts once a time budget moved the end
        self._elapsed_before = 0.0  # wall time of earlier sessions
        self.last_good: str | None = None  # the newest checkpoint, which was checked to hold finite weights
        if resume is not None:
            self._restore(resume)
            self.last_good = resume["path"]
        self._checked_step = self.step  # the last step whose loss and weights were seen finite
        self.net = build_net(self.model, self.optimizer, t, self.device, self.amp_dtype, self.dist.world,
                             self.accumulation)
        if self.dist.world > 1:  # every rank uses rank 0's run folder (a default name holds the start time)
            shared = [str(self.run_dir)]
            dist.broadcast_object_list(shared, src=0)
            self.run_dir = Path(shared[0])
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.remove_stale_temporaries(self.run_dir)  # of saves killed mid-write
        self.log = RunLog(self.run_dir if self.dist.main else None, t.steps, resumed_at=self.step if resume else None)
        self._eval_loaders, self._stop_signal = {}, None  # loaders by split; the stop signal received, if any

    # --- checkpoints ---------------------------------------------------------------------------------

    def _state(self) -> dict:
        return checkpoint.training_state(
            config=self.config.to_dict(), step=self.step, model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), data=self.loader.state_dict(),
            best=dict(self.best), ema=self.ema.state_dict() if self.ema is not None else None,
            elapsed=self.elapsed_seconds(), decay_from=self.decay_from,
            rng={"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})

    def _restore(self, state: dict) -> None:
        if state.get("format") != checkpoint.TRAINING_FORMAT:
            raise ConfigError(f"{state['path']} is a model file (best.pt), which holds no optimizer state: resume "
                              "from the run's last.pt (give the run folder)")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
        except (RuntimeError, ValueError, KeyError) as err:
            first_line = str(err).splitlines()[0]
            raise ConfigError(f"{state['path']} does not fit this run's model or optimizer ({first_line}); resume "
                              "with the settings the run was trained with") from None
        self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["data"])
        self.step, self.best, self.decay_from = int(state["step"]), dict(state["best"]), state.get("decay_from")
        self._elapsed_before = float(state.get("elapsed", 0.0))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def save(self) -> Path | None:
        """last.pt, the training state, after checking that the model is still finite."""
        self._check_finite()
        path = checkpoint.save_atomic(self._state(), self.run_dir / "last.pt") if self.dist.main else None
        self.last_good = str(path) if path else self.last_good
        return path

    def save_model(self, temperature: float = 1.0) -> Path | None:
        """best.pt, the model file (fer_train.checkpoint): the weights and what inference needs."""
        if not self.dist.main:
            return None
        self._check_finite()
        state = checkpoint.model_file(self.eval_model, self.config.to_dict(), step=self.best["step"] or self.step,
                                      classes=CLASSES, input_transform=checkpoint.input_transform(self.config),
                                      temperature=temperature, metrics=dict(self.best))
        return checkpoint.save_atomic(state, self.run_dir / "best.pt")

    @torch.no_grad()
    def _check_finite(self, loss: float = 0.0, first_step: int | None = None) -> None:
        """Stops the run (NonFiniteLoss, exit status 3) when the loss or any weight is not finite: nothing
        non-finite is ever saved or chosen as best."""
        models = {id(m): m for m in (self.model, self.eval_model)}.values()  # one model unless EMA is on
        tensors = [t for m in models for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
        # A sum per tensor, not a check per element (35 ms for ResNet-18 on 2 cores, at every log step): a NaN or
        # an inf makes its sum non-finite; only a sum that is not finite (or overflows) has its elements checked.
        sums_finite = bool(torch.stack([t.sum().float() for t in tensors]).isfinite().all())
        if math.isfinite(loss) and (sums_finite or all(bool(torch.isfinite(t).all()) for t in tensors)):
            self._checked_step = self.step
            return
        first = self._checked_step + 1 if first_step is None else first_step
        what = f"the loss became {loss}" if not math.isfinite(loss) else "the weights became non-finite"
        raise NonFiniteLoss(f"{what} between steps {first} and {self.step}; the last good checkpoint is "
                            f"{self.last_good or 'none (none was written yet)'}. Lower optim.lr, or use "
                            "train.amp=bf16 / none if fp16 overflows.")

    # --- the loop ------------------------------------------------------------------------------------

    def _batches(self):
        while True:  # epoch after epoch; the loader keeps its own (epoch, position)
            yield from self.loader

    def elapsed_seconds(self) -> float:
        """Wall time of the run so far, over all its sessions."""
        return self._elapsed_before + time.perf_counter() - self._session_start

    @property
    def eval_model(self) -> torch.nn.Module:
        """What is evaluated and saved as best.pt: the moving average of the weights when train.ema is on."""
        return self.ema.module if self.ema is not None else self.model

    def _loss(self, logits: torch.Tensor, targets) -> torch.Tensor:
        smoothing = self.config.data.label_smoothing
        if isinstance(targets, MixedTargets):
            return fmix_loss(logits, targets.targets, targets.targets_perm, targets.lam, self.weights, smoothing)
        return F.cross_entropy(logits.float(), targets, weight=self.weights, label_smoothing=smoothing)

    def _train_step(self, batches) -> torch.Tensor:
        """One optimizer step; returns the (detached) mean loss of its micro-batches."""
        self.net.train()
        total = torch.zeros((), device=self.device)
        for micro in range(self.accumulation):
            images, targets = next(batches)
            last = micro == self.accumulation - 1
            sync = contextlib.nullcontext() if last or self.dist.world == 1 else self.net.no_sync()
            with sync, torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss = self._loss(self.net(images), targets) / self.accumulation
            self.scaler.scale(loss).backward() if self.scaler.is_enabled() else loss.backward()
            total += loss.detach()
        o = self.config.optim
        factor = lr_factor(self.step, self.config.train.steps, o.schedule, o.flat_fraction, self.decay_from)
        for group in self.optimizer.param_groups:
            group["lr"] = o.lr * factor
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        return total

    def _handle_signals(self):
        """SIGTERM and the first Ctrl-C ask the loop to stop after the current step with a checkpoint; a
        second Ctrl-C interrupts at once."""
        def ask(signum, _frame):
            if self._stop_signal == "SIGINT" and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name
            self.log.message(f"\n{self._stop_signal}: stopping after this step and saving a checkpoint "
                             f"(Ctrl-C again to interrupt at once)")
        previous = {s: signal.signal(s, ask) for s in (signal.SIGTERM, signal.SIGINT)}
        return lambda: [signal.signal(s, h) for s, h in previous.items()]

    def _stop_requested(self, at_log_step: bool) -> bool:
        if self.dist.world == 1:
            return self._stop_signal is not None
        if not at_log_step:  # ranks agree on stopping at log steps only: one collective per log interval
            return False
        flag = torch.tensor([self._stop_signal is not None], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def fit(self) -> dict:
        """Trains to train.steps (or stop_after steps of this session, or a signal); returns
        {"stopped": None or the reason, "step": ..., "results": final test EvalResults, "best": ...}."""
        t = self.config.train
        threads = IntraOpThreads(self.threads, self.log.message)  # set before the header reports the count
        self.log.message(describe(self))
        in_main = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
        restore_signals = self._handle_signals() if in_main else (lambda: None)
        batches, stopped = self._batches(), None
        session_start, window_start, window_steps = self.step, time.perf_counter(), 0
        loss_sum = torch.zeros((), device=self.device)
        started = self._session_start - self._elapsed_before  # resumed: the whole run, all sessions, fits the budget
        budget = Budget(parse_duration(t.time_budget), started) if t.time_budget else None
        self._upper_steps, step_seconds = t.steps, []  # a time budget sets the length, at most this
        try:
            while self.step < t.steps:
                started = time.perf_counter()
                loss_sum += self._train_step(batches)
                window_steps += 1
                step_seconds.append(time.perf_counter() - started)
                threads.record(step_seconds[-1])
                if budget is not None and self._follow_budget(budget, step_seconds, session_start):
                    window_start = time.perf_counter()
                at_log = self.step % t.log_every == 0 or self.step == t.steps
                if at_log or self.step % t.eval_every == 0 or self.step % t.checkpoint_every == 0:
                    # checked before anything is saved, so a checkpoint never holds a diverged model
                    mean_loss = float(loss_sum) / window_steps
                    self._check_finite(mean_loss, self.step - window_steps + 1)
                    elapsed = time.perf_counter() - window_start
                    images = window_steps * t.batch_size
                    if at_log:
                        self.log.train(self.step, mean_loss, self.optimizer.param_groups[0]["lr"], images / elapsed,
                                       elapsed / window_steps, self.loader.skipped)
                    loss_sum.zero_()
                    window_start, window_steps = time.perf_counter(), 0
                if self.step % t.eval_every == 0 or self.step == t.steps:
                    self._validate()
                    window_start = time.perf_counter()  # images/s counts training only
                if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                    self.save()
                    window_start = time.perf_counter()
                if self._stop_requested(at_log):
                    stopped = self._stop_signal or "a signal to another rank"
                elif self.stop_after is not None and self.step - session_start >= self.stop_after:
                    stopped = f"stop_after={self.stop_after}"
                if stopped:
                    self.save()
                    self.log.message(f"stopped ({stopped}) at step {self.step}; checkpoint {self.last_good}; resume "
                                     f"with `python -m fer_train train --resume {self.run_dir}`")
                    break
            restore_signals()  # the final evaluation stops at a signal as any command does
            threads.settle()  # the count chosen, not one being timed
            results = [] if stopped else self.final_evaluation()
        finally:  # however it ends (an error too), the input workers end now and the log is complete
            restore_signals()
            threads.restore()
            batches.close()
            for loader in (self.loader, *self._eval_loaders.values()):
                loader.close()  # now: at the process's end DALI would wait for each worker in turn
            self.log.close()
        return {"stopped": stopped, "step": self.step, "results": results, "best": self.best}

    def _follow_budget(self, budget: Budget, step_seconds: list, session_start: int) -> bool:
        """Sets the run's length once a step and an evaluation pass have been timed (returns True then: the
        evaluation it ran is not training time), sets it again from the recent steps at every log step (the
        first steps are slower than the run's: caches, the allocator, the input workers filling their queues;
        and the machine's speed drifts), and ends training early when time runs short."""
        t = self.config.train
        if budget.step_seconds is None:
            if len(step_seconds) <= MEASURE_STEPS:  # the first step warms caches up and is not counted
                return False
            started = time.perf_counter()
            self._validate()
            eval_seconds = time.perf_counter() - started
            final_images = (len(self.data.selection[1]) if self.data.selection else 0) + \
                sum(len(d) for d in self.data.test.values()) * (2 if t.tta_report else 1)  # at the end, TTA twice
            per_image = eval_seconds / max(sum(len(d) for d in self.data.validation.values()), 1)
            self._budget_eval = (eval_seconds, per_image * final_images)
            self._set_length(budget, step_seconds[1:], f"(was {t.steps})")
            return True
        if self.step % t.log_every == 0:
            self._set_length(budget, step_seconds[-REPLAN_WINDOW:], "(set again from the recent steps)")
        # with several processes every rank must stop at the same step: rank 0 decides, at log steps
        check = self.dist.world == 1 or self.step % t.log_every == 0
        if check and self.dist.from_rank0(budget.exhausted()) and self.step < t.steps:
            self.log.message(f"time budget {t.time_budget}: ending training at step {self.step} of {t.steps} to "
                             "leave time for the final evaluation")
            t.steps = self.log.total = self.step
        return False

    def _set_length(self, budget: Budget, recent: list, why: str) -> None:
        t, o = self.config.train, self.config.optim
        measured = sorted(recent)[len(recent) // 2]
        eval_seconds, final_seconds = self._budget_eval
        total = self.dist.from_rank0(budget.plan(self.step, measured, eval_seconds, t.eval_every, final_seconds,
                                                  self._upper_steps))  # ranks time their steps a little differently
        if abs(total - t.steps) > 0.01 * t.steps:  # said when it matters, not at every small change
            self.log.message(f"time budget {t.time_budget}: {measured:.3f} s per step, {eval_seconds:.1f} s per "
                             f"evaluation: {total} steps {why}")
        self.decay_from = stretch_decay(self.step, t.steps, total, o.schedule, o.flat_fraction, self.decay_from)
        t.steps = self.log.total = total  # the rates used so far stay, and the next; the fall ends at the new end

    # --- evaluation ----------------------------------------------------------------------------------

    def _eval_loader(self, name: str, dataset):
        c, d = self.config, self.config.data
        if name not in self._eval_loaders:  # built once: a DALI pipeline keeps its worker processes
            self._eval_loaders[name] = build_loader(
                dataset, max(c.train.eval_batch_size // self.dist.world, 1), False, d.image_size, self.device,
                d.backend, rank=self.dist.rank, world=self.dist.world, num_workers=d.workers, crop=d.crop,
                channels_last=c.train.channels_last, timeout=d.timeout, decoded_cache_mb=d.decoded_cache_mb)
        return self._eval_loaders[name]

    def _validate(self) -> None:
        for name, dataset in self.data.validation.items():
            result = evaluate(self.eval_model, self._eval_loader(name, dataset), name, device=self.device,
                              amp_dtype=self.amp_dtype, channels_last=self.config.train.channels_last)
            self.log.evaluation(self.step, result)
            if (self.data.selection and name == self.data.selection[0] and result.accuracy > self.best["accuracy"]
                    and math.isfinite(result.loss)):  # a model with non-finite outputs is never the best
                self.best = {"accuracy": result.accuracy, "step": self.step}
                self.save_model()

    def final_evaluation(self) -> list:
        """The best model (or the last, without a selection set) on every test split, its probabilities
        calibrated on the selection split (the temperature goes into best.pt), with flip test-time
        augmentation as extra rows (train.tta_report); writes the reports and the model card."""
        best = self.run_dir / "best.pt"
        if self.data.selection and self.dist.world > 1:
            dist.barrier()  # rank 0 wrote best.pt
        if self.data.selection and best.is_file():
            self.eval_model.load_state_dict(checkpoint.load(best)["model"])
        temperature = 1.0
        if self.data.selection:
            name, dataset = self.data.selection
            temperature, count = selection_temperature(self.eval_model, self._eval_loader(name, dataset),
                                                       device=self.device, amp_dtype=self.amp_dtype,
                                                       channels_last=self.config.train.channels_last)
            self.log.message(f"calibration: temperature {temperature:.3f} on {name} ({count} images)")
        self.save_model(temperature)  # without a selection split: the last model, so every run has a best.pt
        chosen = f"best.pt (step {self.best['step']})" if self.best["step"] is not None else "the last step"
        results, table = evaluate_and_report(
            self.eval_model, self.data.test, self._eval_loader, self.run_dir,
            f"{self.run_dir.name}: test results of {chosen}", write=self.dist.main,
            tta_rows=self.config.train.tta_report, device=self.device, amp_dtype=self.amp_dtype,
            channels_last=self.config.train.channels_last, temperature=temperature)
        if results:
            self.log.message(f"\ntest results of {chosen}:\n{table}")
        if self.dist.main:
            card = write_model_card(self, results, temperature)
            self.log.message(f"model card: {card}")
        self.log.message(f"run files: {self.run_dir}")
        return results
