"""The recipe options that buy accuracy per CPU-hour: a time budget that still evaluates and writes the model
card, the soft-label loss, label smoothing, the weight EMA saved as best.pt, class-balanced sampling, the CIFAR
stem."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

from fer_train import budget, checkpoint
from fer_train.cli import main
from fer_train.factories import build_ema
from fer_train.recipe.fmix import fmix_loss
from fer_train.recipe.schedule import lr_factor, stretch_decay
from helpers import TINY

RUN = ["--batch-size", "4", *TINY]


def test_budget_plan_leaves_time_for_evaluations_and_the_end():
    plan = budget.Budget(seconds=1000.0, start=time.perf_counter() - 100.0)  # 100 s already spent
    total = plan.plan(step=20, step_seconds=0.5, eval_seconds=10.0, eval_every=100, final_seconds=50.0, upper=10**6)
    left = budget.SAFETY * (1000 - 100 - (50.0 + budget.FINAL_FIXED_S))
    assert abs((total - 20) - left / (0.5 + 10.0 / 100)) <= 1  # the clock moves on a little meanwhile
    assert plan.plan(step=20, step_seconds=0.5, eval_seconds=10.0, eval_every=100, final_seconds=50.0, upper=500) == 500
    assert not plan.exhausted()
    plan.start -= 10_000  # far past the budget
    assert plan.exhausted()


def test_a_time_budget_stops_training_and_still_evaluates_and_writes_the_card(tmp_path, monkeypatch):
    from fer_train import engine

    monkeypatch.setattr(engine, "MEASURE_STEPS", 3)
    monkeypatch.setattr(budget, "FINAL_FIXED_S", 3.0)  # the tiny run's reports take about 1 s, not 20
    run = tmp_path / "run"
    started = time.perf_counter()
    assert main(["--steps", "100000", "--time-budget", "15s", "--out", str(run), *RUN,
                 "--set", "train.eval_every=1000000", "--set", "train.checkpoint_every=1000000"]) == 0
    elapsed = time.perf_counter() - started
    state = checkpoint.load(run / "last.pt")
    assert 3 < state["step"] < 100000 and state["config"]["train"]["steps"] == state["step"]
    assert elapsed < 15 * 1.5, f"the run took {elapsed:.0f} s of a 15 s budget"
    card = (run / "model-card.md").read_text()
    assert "synthetic test" in card and "time budget 15s" in card and (run / "summary.md").is_file()


def test_a_resumed_run_counts_its_earlier_sessions_against_the_budget(tmp_path, monkeypatch):
    """The first session used (as its checkpoint says) all but a second of a 10-minute budget: the resumed
    one times a few steps, ends training and still evaluates and writes the card, instead of taking 10
    minutes of its own."""
    from fer_train import engine

    monkeypatch.setattr(engine, "MEASURE_STEPS", 3)
    run = tmp_path / "run"
    assert main(["--steps", "100000", "--time-budget", "10m", "--out", str(run), *RUN, "--stop-after", "2",
                 "--set", "train.eval_every=1000000", "--set", "train.checkpoint_every=1000000"]) == 0
    state = checkpoint.load(run / "last.pt")
    state["elapsed"] = 599.0
    del state["path"]  # added by load
    torch.save(state, run / "last.pt")
    assert main(["train", "--resume", str(run)]) == 0
    assert checkpoint.load(run / "last.pt")["step"] <= 2 + (engine.MEASURE_STEPS + 1) + 1
    assert (run / "model-card.md").is_file()


def test_the_budget_counts_the_commands_start_up(tmp_path, monkeypatch):
    """python -m fer_train passes the time it began: a command whose start-up (here, as if) used all but a
    second of its budget times a few steps, then evaluates and writes the card."""
    from fer_train import engine

    monkeypatch.setattr(engine, "MEASURE_STEPS", 3)
    run = tmp_path / "run"
    assert main(["--steps", "100000", "--time-budget", "10m", "--out", str(run), *RUN, "--set",
                 "train.eval_every=1000000", "--set", "train.checkpoint_every=1000000"],
                started=time.perf_counter() - 599.0) == 0
    assert checkpoint.load(run / "last.pt")["step"] <= engine.MEASURE_STEPS + 2
    assert (run / "model-card.md").is_file()


def _slow_first_steps(monkeypatch):
    """The length is set after 3 timed steps and again from the last 3 at every log step; 1 s is added to the
    time of each of the first four steps, so the first length is too short whatever the machine's load."""
    from fer_train import engine

    monkeypatch.setattr(engine, "MEASURE_STEPS", 3)
    monkeypatch.setattr(engine, "REPLAN_WINDOW", 3)
    monkeypatch.setattr(budget, "FINAL_FIXED_S", 2.0)
    follow_budget = engine.Trainer._follow_budget

    def slow_at_first(self, plan, step_seconds, session_start):
        if len(step_seconds) <= 4:
            step_seconds[-1] += 1.0
        return follow_budget(self, plan, step_seconds, session_start)

    monkeypatch.setattr(engine.Trainer, "_follow_budget", slow_at_first)


def test_a_budget_set_from_slow_first_steps_is_set_again_while_the_rate_is_flat(tmp_path, monkeypatch, capsys):
    """The first steps seem slow (here: 1 s is added to the time of each of the first four, so the test does
    not depend on how busy the machine is); the length they give is set again from the recent steps at a
    later log step while the learning rate is flat, so the run uses its budget."""
    _slow_first_steps(monkeypatch)
    run = tmp_path / "run"
    assert main(["--steps", "100000", "--time-budget", "20s", "--out", str(run), *RUN, "--set", "train.log_every=1",
                 "--set", "optim.schedule=constant",  # flat throughout: set again at every log step
                 "--set", "train.eval_every=1000000", "--set", "train.checkpoint_every=1000000"]) == 0
    out = capsys.readouterr().out
    first = int(out.split("steps (was 100000)")[0].rsplit(" ", 2)[-2])
    again = [int(line.split(" steps (set again")[0].rsplit(" ", 1)[-1]) for line in out.splitlines()
             if "(set again from the recent steps)" in line]
    assert again and again[0] > first, out[-2000:]
    assert checkpoint.load(run / "last.pt")["step"] > first


def test_a_length_set_again_while_the_rate_falls_keeps_the_rates_and_still_ends_at_zero():
    rate = lambda step, total, start=None: lr_factor(step, total, "flat_cosine", 0.5, start)  # noqa: E731
    start = stretch_decay(700, 1000, 1200, "flat_cosine", 0.5)  # 200 steps into a fall of 500, now 1200 long
    assert rate(700, 1200, start) == pytest.approx(rate(700, 1000), rel=1e-12)
    stretched = [rate(step, 1200, start) for step in range(700, 1200)]
    assert all(a > b for a, b in zip(stretched, stretched[1:])) and stretched[-1] < 1e-4
    shorter = stretch_decay(900, 1200, 1000, "flat_cosine", 0.5, start)  # and again, shorter
    assert rate(900, 1000, shorter) == pytest.approx(rate(900, 1200, start), rel=1e-12)
    assert rate(999, 1000, shorter) < 1e-4 < rate(999, 1200, start)
    # while flat, the fall moves with the length; a fall the shorter run would have begun begins now
    assert stretch_decay(300, 1000, 900, "flat_cosine", 0.5) is None
    assert stretch_decay(300, 1000, 500, "flat_cosine", 0.5) == 300 and rate(300, 500, 300.0) == 1.0
    assert stretch_decay(300, 1000, 500, "constant", 0.5) is None


def test_a_time_budget_sets_the_length_again_while_the_rate_falls(tmp_path, monkeypatch, capsys):
    """With a cosine schedule the rate falls from the first step; the length is set again from the recent
    (here: faster than the first) steps all the same, the logged rate never rises, and it ends near 0."""
    _slow_first_steps(monkeypatch)
    run = tmp_path / "run"
    assert main(["--steps", "100000", "--time-budget", "20s", "--out", str(run), *RUN, "--set", "train.log_every=1",
                 "--set", "optim.schedule=cosine", "--set", "train.eval_every=1000000",
                 "--set", "train.checkpoint_every=1000000"]) == 0
    assert "(set again from the recent steps)" in capsys.readouterr().out
    rates = [row["lr"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in row]
    assert all(a >= b for a, b in zip(rates, rates[1:])), rates
    state = checkpoint.load(run / "last.pt")
    assert state["decay_from"] is not None and rates[-1] < 0.2 * rates[0]


def test_soft_label_loss_is_the_cross_entropy_on_the_distributions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 8, generator=g, dtype=torch.float64)
    votes = torch.rand(6, 8, generator=g, dtype=torch.float64)
    target = votes / votes.sum(1, keepdim=True)
    by_hand = -(target * logits.log_softmax(1)).sum(1).mean()
    assert fmix_loss(logits, target, target, 1.0).item() == pytest.approx(by_hand.item(), rel=1e-12)
    perm = target[[1, 0, 3, 2, 5, 4]]
    mixed = 0.3 * by_hand + 0.7 * -(perm * logits.log_softmax(1)).sum(1).mean()
    assert fmix_loss(logits, target, perm, 0.3).item() == pytest.approx(mixed.item(), rel=1e-12)
    smoothed = 0.9 * target + 0.1 / 8
    assert fmix_loss(logits, target, target, 1.0, label_smoothing=0.1).item() == pytest.approx(
        -(smoothed * logits.log_softmax(1)).sum(1).mean().item(), rel=1e-12)
    hard = torch.tensor([0, 1, 2, 3, 4, 5])
    assert fmix_loss(logits, hard, hard, 1.0, label_smoothing=0.1).item() == pytest.approx(
        F.cross_entropy(logits, hard, label_smoothing=0.1).item(), rel=1e-12)


def test_with_ema_best_pt_holds_the_averaged_weights(tmp_path):
    run = tmp_path / "run"
    assert main(["--steps", "4", "--out", str(run), *RUN, "--set", "train.ema=0.9", "--set", "train.eval_every=4",
                 "--set", "train.tta_report=false"]) == 0
    last, best = checkpoint.load(run / "last.pt"), checkpoint.load(run / "best.pt")
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert best["model"].keys() == last["model"].keys() == averaged.keys()
    assert all(torch.equal(best["model"][k], averaged[k]) for k in averaged)
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in averaged)


def test_the_ema_decay_warms_up_from_a_count_the_host_already_has():
    """The decay after n updates is min(decay, (1 + n) / (10 + n)), from the average's count on the CPU: the
    copy on the parameters' device that AveragedModel hands over would make the host wait for a GPU at every
    step. Parameters on the meta device stand in for a GPU's: reading one to the host raises."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = build_ema(model, 0.9)
    with torch.no_grad():
        for n in range(4):  # n updates so far: the first copies, then decay (1 + n') / (10 + n') for n' = 1, 2, 3
            before = average.module[0].weight.clone()
            model[0].weight.add_(1.0)
            average.update_parameters(model)
            if n:
                step = min(0.9, (1 + n) / (10 + n))
                torch.testing.assert_close(average.module[0].weight, step * before + (1 - step) * model[0].weight)
    on_meta = build_ema(model.to("meta"), 0.9)
    on_meta.update_parameters(model)
    on_meta.update_parameters(model)  # the first update that averages
    assert int(on_meta.n_averaged) == 2 and on_meta.n_averaged.device.type == "cpu"


def test_class_balanced_sampling_and_weight_decay_run_and_are_recorded(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--steps", "3", "--out", str(run), *RUN, "--set", "data.class_balance=0.5", "--set",
                 "data.class_weights=none", "--set", "train.eval_every=3", "--set", "train.tta_report=false",
                 "--set", "optim.weight_decay=0.05", "--set", "optim.decoupled_weight_decay=true"]) == 0
    out, card = capsys.readouterr().out, (run / "model-card.md").read_text()
    assert "class-balanced sampling, power 0.5; class weights (none)" in out
    assert "class-balanced sampling, power 0.5" in card
    assert ", weight decay 0.05 (decoupled);" in out and "weight decay 0.05 (decoupled), betas" in card
    assert checkpoint.load(run / "last.pt")["config"]["data"]["class_balance"] == 0.5


def test_data_crop_reaches_the_saved_input_transform_and_the_card(tmp_path, capsys):
    """A model trained zoomed in is evaluated, exported and served with the same zoom: the checkpoint's
    input transform (which evaluate, export and predict read) and the card say it."""
    run = tmp_path / "run"
    assert main(["--steps", "2", "--out", str(run), *RUN, "--set", "data.crop=0.8", "--set", "train.eval_every=2",
                 "--set", "train.tta_report=false"]) == 0
    assert "32 px, centre crop 0.8 of the face;" in capsys.readouterr().out
    assert checkpoint.load_model(run / "best.pt").input_transform["resize"] == 40  # 32 / 0.8
    assert "the shorter side resized to 40 and centre-cropped" in (run / "model-card.md").read_text()


def test_random_crops_reach_the_training_pipeline_and_the_card(tmp_path, capsys, monkeypatch):
    """data.zoom and data.translate set the training pipeline's draws (not evaluation's transform), and the
    console, the card and the checkpoint say so."""
    from fer_train import engine

    built = []

    def recording(*args, **kwargs):
        loader = build_loader(*args, **kwargs)
        built.append((loader.pipeline.train, loader.pipeline.config))
        return loader

    build_loader = engine.build_loader
    monkeypatch.setattr(engine, "build_loader", recording)
    run = tmp_path / "run"
    assert main(["--steps", "2", "--out", str(run), *RUN, "--set", "data.zoom=0.1", "--set", "data.translate=0.125",
                 "--set", "train.eval_every=2", "--set", "train.tta_report=false"]) == 0
    assert "centre crop 0.875 of the face, random crops (zoom 0.1, shift 0.125 of the side);" in capsys.readouterr().out
    drawn = {(train, config.zoom, config.translate) for train, config in built}
    assert drawn == {(True, 0.1, 0.125), (False, 0.0, 0.0)}
    assert "FMix on, random crops (zoom 0.1, shift 0.125 of the side);" in (run / "model-card.md").read_text()
    saved = checkpoint.load(run / "last.pt")["config"]["data"]
    assert (saved["zoom"], saved["translate"]) == (0.1, 0.125)
    assert checkpoint.load_model(run / "best.pt").input_transform["resize"] == 37  # 32 / 0.875: no zoom in eval


def test_cifar_stem_keeps_the_blocks_and_the_resolution():
    from fer_kernels.models import resnet18

    imagenet, cifar = resnet18(), resnet18(stem="cifar")
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1) and isinstance(cifar.maxpool,
                                                                                           torch.nn.Identity)
    extra = sum(p.numel() for p in imagenet.parameters()) - sum(p.numel() for p in cifar.parameters())
    assert extra == 64 * 3 * (7 * 7 - 3 * 3)  # only the first convolution differs
    features = {}
    cifar.layer4.register_forward_hook(lambda m, i, o: features.update(layer4=o.shape))
    cifar.eval()(torch.randn(1, 3, 48, 48))
    assert features["layer4"][-2:] == (6, 6)  # the ImageNet stem leaves a 48 px face 2 x 2 here
    with pytest.raises(ValueError, match="stem must be one of"):
        resnet18(stem="tiny")
    assert math.isfinite(cifar(torch.randn(2, 3, 48, 48)).sum().item())


def test_weight_decay_shrinks_weights_of_two_or_more_dimensions_only():
    from fer_train.config import ModelConfig, OptimConfig
    from fer_train.factories import build_model, build_optimizer

    model = build_model(ModelConfig(), pretrained=False)
    optimizer = build_optimizer(model, OptimConfig(lr=0.01, weight_decay=0.5, decoupled_weight_decay=True))
    decayed, kept = optimizer.param_groups
    assert decayed["weight_decay"] == 0.5 and kept["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(p) for p in model.parameters() if p.ndim > 1}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: the decoupled decay alone moves the weights
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.01 * 0.5) if p.ndim > 1 else before[name]
        torch.testing.assert_close(p.detach(), expected, msg=name)
    assert len(build_optimizer(model, OptimConfig()).param_groups) == 1  # without decay: as checkpoints hold
