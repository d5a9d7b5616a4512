"""Nothing lost, nothing silent, engine side: a diverging run at every point of the step / checkpoint /
evaluation cycle never saves a non-finite model; run folders are not overwritten by accident; resuming
the wrong run, a full disk, stale temporaries, bad devices and missing splits are one clear line (exit 2);
best.pt is a model file that loads with weights_only=True."""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch

from fer_train import checkpoint
from fer_train.cli import main
from fer_train.engine import Trainer
from helpers import TINY

RUN = ["--batch-size", "4", *TINY]


def _finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("diverge_at, checkpoint_every, eval_every, stop_after", [
    (3, 4, 4, None),   # between checkpoints: found at the next log step
    (4, 4, 10, None),  # at a checkpoint step
    (4, 10, 4, None),  # at an evaluation step (best.pt must not become the diverged model)
    (3, 10, 10, 3),    # at a stop (stop_after saves at once)
])
def test_a_diverging_run_never_saves_a_non_finite_model(tmp_path, monkeypatch, capsys, diverge_at, checkpoint_every,
                                                         eval_every, stop_after):
    """The loss before the update stays finite while the update makes the weights NaN (as with a huge
    learning rate): the run stops with exit 3, and every checkpoint on disk is finite."""
    original = Trainer._train_step

    def step_then_break(self, batches):
        loss = original(self, batches)
        if self.step == diverge_at:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return loss

    monkeypatch.setattr(Trainer, "_train_step", step_then_break)
    run = tmp_path / "run"
    args = ["--steps", "8", "--out", str(run), *RUN, "--set", f"train.checkpoint_every={checkpoint_every}",
            "--set", f"train.eval_every={eval_every}", "--set", "train.log_every=2"]
    assert main(args + (["--stop-after", str(stop_after)] if stop_after else [])) == 3
    err = capsys.readouterr().err
    # found at the first check after the update that broke the weights: by the weights themselves, or by the
    # loss of the next step if that comes first
    assert "the weights became non-finite between steps" in err or "the loss became nan between steps" in err
    for name in ("last.pt", "best.pt"):
        if (run / name).exists():
            state = checkpoint.load(run / name)
            assert _finite(state) and state["step"] < diverge_at, name
    last = run / "last.pt"
    assert (str(last) in err) if last.exists() else "none (none was written yet)" in err


@pytest.mark.parametrize("ema", [False, True], ids=["model", "ema-copy"])
def test_the_weight_check_finds_one_bad_element_and_passes_huge_finite_weights(tmp_path, ema):
    """The check sums each tensor before it looks at elements: one NaN or inf element is still found (in the
    model, or in the EMA copy that best.pt would hold), and finite weights whose sums overflow are finite."""
    from fer_train.config import build_config, parse_overrides
    from fer_train.engine import NonFiniteLoss

    overrides = parse_overrides(TINY[1::2] + [f"train.ema={0.9 if ema else 0}"])
    overrides["train"].update(steps=1, batch_size=4, out=str(tmp_path))
    trainer = Trainer(build_config("default", overrides=overrides), tmp_path)
    try:
        weights = [p for p in trainer.eval_model.parameters() if p.dim() > 1]
        assert (trainer.eval_model is not trainer.model) == ema
        with torch.no_grad():
            for w in weights[:3]:
                w.fill_(3e38)  # each sum overflows to inf; every element is finite
            trainer._check_finite()
            for bad in (math.nan, math.inf, -math.inf):
                weights[-1].view(-1)[7] = bad
                with pytest.raises(NonFiniteLoss, match="the weights became non-finite"):
                    trainer._check_finite()
                weights[-1].view(-1)[7] = 0.0
            trainer._check_finite()
    finally:
        trainer.log.close()


def test_a_huge_learning_rate_is_stopped_before_it_is_saved(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--steps", "6", "--out", str(run), *RUN, "--lr", "1e300", "--set", "train.checkpoint_every=1",
                 "--set", "train.eval_every=1"]) == 3
    assert "became" in capsys.readouterr().err
    for name in ("last.pt", "best.pt"):
        if (run / name).exists():
            assert _finite(checkpoint.load(run / name)), name


def test_an_existing_run_is_not_overwritten_without_asking(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--steps", "2", "--out", str(run), *RUN]) == 0
    first = checkpoint.load(run / "last.pt")["step"]
    capsys.readouterr()
    assert main(["--steps", "1", "--out", str(run), *RUN]) == 2
    err = capsys.readouterr().err
    assert f"already holds a run" in err and f"--resume {run}" in err and "--overwrite" in err
    assert checkpoint.load(run / "last.pt")["step"] == first
    (run / "notes.txt").write_text("mine")
    assert main(["--steps", "1", "--out", str(run), "--overwrite", *RUN]) == 0
    assert checkpoint.load(run / "last.pt")["step"] == 1 and (run / "notes.txt").read_text() == "mine"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 1  # the old run's records went with it


def test_out_that_is_a_file_or_read_only_fails_before_any_work(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["--steps", "1", "--out", str(target), *RUN]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert main(["--steps", "1", "--out", str(locked / "run"), *RUN]) == 2
        assert "cannot write into" in capsys.readouterr().err
    finally:
        locked.chmod(stat.S_IRWXU)


def test_resume_problems_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--steps", "2", "--out", str(run), *RUN]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--arch", "resnet50"]) == 2
    assert "was trained with model.arch=resnet18; a resumed run keeps it" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--optimizer", "sgd"]) == 2
    assert "optim.name=ranger" in capsys.readouterr().err
    assert main(["train", "--resume", str(run / "best.pt")]) == 2
    assert "is a model file (best.pt), which holds no optimizer state" in capsys.readouterr().err


def test_resume_keeps_metrics_free_of_repeated_steps_and_works_from_elsewhere(tmp_path, monkeypatch):
    """A run killed while writing step 6's record, with last.pt from step 4, resumes from 4: the records of
    step 5 and the cut line go, so every step appears once and every line is whole; data paths are stored
    absolute, so resuming from another folder works."""
    run = tmp_path / "run"
    assert main(["--steps", "4", "--out", str(run), *RUN, "--set", "train.checkpoint_every=4"]) == 0
    with open(run / "metrics.jsonl", "a") as f:  # what a run killed at step 6 leaves behind
        f.write(json.dumps({"step": 5, "loss": 1.0}) + '\n{"step": 6, "lo')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", str(run), "--steps", "6"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "eval" not in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_checkpoints_have_the_runs_permissions_and_stale_temporaries_go(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    old = os.umask(0o022)
    try:
        assert main(["--steps", "2", "--out", str(run), *RUN]) == 2  # a stale temporary is a run file ...
        assert main(["--steps", "2", "--out", str(run), "--overwrite", *RUN]) == 0  # ... which --overwrite removes
    finally:
        os.umask(old)
    assert not stale.exists()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.iterdir() if p.is_file()}
    assert modes["last.pt"] == modes["best.pt"] == modes["metrics.jsonl"] == 0o644


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["--steps", "2", "--out", str(run), *RUN]) == 0
    before = (run / "last.pt").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "no space left on the device holding" in err and str(run) in err and "Traceback" not in err
    assert (run / "last.pt").read_bytes() == before and not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("device, message", [("gpu", "is not a device"), ("mps", "runs on the CPU or CUDA"),
                                             ("cpu:3", "one CPU device")])
def test_bad_devices_are_refused(tmp_path, capsys, device, message):
    assert main(["--steps", "1", "--out", str(tmp_path / "run"), "--device", device, *RUN]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_validation_split_is_said(tmp_path, capsys):
    from helpers import FERPLUS_ROWS, ferplus_line, make_ferplus

    make_ferplus(tmp_path / "ferplus", [ferplus_line(f"{n}.png", v) for n, v, *_ in FERPLUS_ROWS] * 1)
    assert main(["--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "run"), "--ferplus",
                 str(tmp_path / "ferplus"), "--set", "data.image_size=32", "--set", "data.workers=0",
                 "--set", "data.backend=torch"]) == 0
    out = capsys.readouterr().out
    assert "not on disk, so not evaluated: ferplus valid (no FER2013Valid/label.csv" in out


def test_best_pt_is_a_small_model_file_that_loads_with_weights_only(tmp_path):
    run = tmp_path / "run"
    assert main(["--steps", "2", "--out", str(run), *RUN]) == 0
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["format"] == checkpoint.MODEL_FORMAT and "optimizer" not in best and "rng" not in best
    assert best["classes"][0] == "neutral" and best["input"]["size"] == 32 and math.isfinite(best["temperature"])
    assert (run / "best.pt").stat().st_size < 0.5 * (run / "last.pt").stat().st_size
    loaded = checkpoint.load_model(run)
    assert loaded.path.endswith("best.pt") and not loaded.model.training and loaded.temperature == best["temperature"]
