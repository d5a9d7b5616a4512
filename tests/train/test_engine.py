"""fer_train's engine and command line, end to end on the CPU: the default command, learning, resume
equivalence, evaluation files, DDP with gloo, signals, a diverging loss and the promised errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fer_train import checkpoint
from fer_train.cli import main
from fer_train.config import PRESETS, ConfigError, build_config, parse_overrides
from fer_train.data import build_loader, open_dataset
from fer_train.engine import Trainer
from fer_train.factories import amp_dtype
from fer_train.recipe.schedule import lr_factor
from helpers import TINY, read_confusion

ROOT = Path(__file__).resolve().parents[2]

def _tiny_config(tmp_path: Path, **train) -> object:
    overrides = parse_overrides(TINY[1::2])
    overrides["train"].update({"steps": 6, "batch_size": 4, "eval_every": 100, "checkpoint_every": 100,
                               "out": str(tmp_path), **train})
    return build_config("default", overrides=overrides)


def _same_parameters(a: dict, b: dict, atol: float = 0.0) -> None:
    for key in a:
        if "running" in key or "num_batches" in key:
            continue
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def test_default_command_on_a_tiny_budget(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--steps", "4", "--batch-size", "8", "--eval-every", "2", "--out", str(run), *TINY]) == 0
    out = capsys.readouterr().out
    assert "step 4/4" in out and "test results of best.pt" in out and f"run files: {run}" in out
    for name in ("last.pt", "best.pt", "metrics.jsonl", "summary.md", "confusion-synthetic-test.csv",
                 "confusion-synthetic-test.png", "model-card.md", "training-curves.png"):
        assert (run / name).is_file(), name
    assert "![training curves](training-curves.png)" in (run / "model-card.md").read_text()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r and "eval" not in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r.get("eval") == "synthetic val"] == [2, 4]
    assert checkpoint.load(run / "last.pt")["step"] == 4


def test_training_on_the_synthetic_set_beats_chance(tmp_path):
    """The paper's recipe (Ranger + GC, FMix on every batch, flat-then-cosine) on 32 x 32 drawn faces, 8
    classes, 300 steps of 32 at lr 3e-3. Measured: 0.345 test accuracy (chance 0.125), 51 s on 2 quiet
    cores; 150 steps gave 0.20 with FMix and 0.37 without it (FMix slows early learning); 48 x 48 faces
    reach 0.81 in 300 steps (the default command) but take 1.7 times as long."""
    overrides = parse_overrides(TINY[1::2] + ["data.synthetic_length=4000", "data.synthetic_eval_length=400",
                                              "train.eval_batch_size=200", "train.log_every=50", "optim.lr=3e-3"])
    overrides["train"].update(steps=300, batch_size=32, eval_every=300, checkpoint_every=300, out=str(tmp_path))
    outcome = Trainer(build_config("default", overrides=overrides), tmp_path).fit()
    accuracy = outcome["results"][0].accuracy
    assert accuracy > 0.25, f"synthetic test accuracy {accuracy:.3f}"


def test_run_data_pools_the_mixed_evaluation_and_keeps_each_sets_splits(tmp_path):
    """FERPlus (train, valid, test) and RAF-DB (train, test): mixed-val / mixed-test pool FERPlus valid +
    test and RAF-DB test 50/50 and pick the best model; FERPlus valid is watched too; the end reports
    every test split; facial_expressions is training data only."""
    from helpers import FERPLUS_ROWS, ferplus_line, make_ferplus, make_rafdb
    from fer_train.run_data import open_run_data

    lines = [ferplus_line(f"{n}.png", v) for n, v, *_ in FERPLUS_ROWS]
    for folder in ("FER2013Train", "FER2013Valid", "FER2013Test"):
        make_ferplus(tmp_path / "ferplus", lines, folder)
    make_rafdb(tmp_path / "rafdb", [f"train_{k:05d}.jpg {k}" for k in range(1, 8)] +
               [f"test_{k:04d}.jpg {k % 7 + 1}" for k in range(1, 10)])
    config = build_config(overrides={"data": {"ferplus": str(tmp_path / "ferplus"), "rafdb": str(tmp_path / "rafdb")}})
    data = open_run_data(config)
    assert len(data.train) == 8 + 7 and data.selection[0] == "mixed val"
    assert list(data.validation) == ["mixed val", "ferplus valid"]
    assert list(data.test) == ["mixed test", "ferplus valid", "ferplus test", "rafdb test"]
    pooled = 2 * 8 + 9
    assert len(data.validation["mixed val"]) + len(data.test["mixed test"]) == pooled
    assert abs(len(data.validation["mixed val"]) - len(data.test["mixed test"])) <= 1


def test_resume_gives_the_same_run(tmp_path):
    """6 steps straight = 3 steps + resume + 3 steps: parameters, Lookahead state, the weights' moving
    average and data position (with gradient accumulation, FMix and a schedule that depends on the step)."""
    straight = Trainer(_tiny_config(tmp_path / "a", micro_batch=2, ema=0.9), tmp_path / "a")
    straight.fit()
    first = Trainer(_tiny_config(tmp_path / "b", micro_batch=2, ema=0.9), tmp_path / "b", stop_after=3)
    assert first.fit()["stopped"] == "stop_after=3"
    state = checkpoint.load(tmp_path / "b" / "last.pt")
    assert state["step"] == 3 and state["data"]["position"] == 6
    second = Trainer(_tiny_config(tmp_path / "b", micro_batch=2, ema=0.9), tmp_path / "b", resume=state)
    second.fit()
    for a, b in ((straight.model.state_dict(), second.model.state_dict()),
                 (straight.ema.state_dict(), second.ema.state_dict())):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert int(second.ema.n_averaged) == 6
    state_a, state_b = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys() and all("slow_buffer" in s for s in state_a.values())
    for index, entries in state_a.items():  # moments, step counts and Lookahead's slow weights
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(state_b[index][k])) for k, v in entries.items())


def test_bfloat16_weight_copies_train_as_autocast_does_and_resume_exactly(tmp_path):
    """On the CPU under bf16 autocast the steps go through bfloat16 weight copies (train.bf16_weights): 6 steps
    equal 6 steps with autocast rounding the float32 weights, and 3 + resume + 3, bit for bit (weights, batch-norm
    statistics, the weights' moving average)."""
    runs = {}
    for name, copies, stop in (("copies", True, None), ("autocast", False, None), ("resumed", True, 3)):
        config = lambda: _tiny_config(tmp_path / name, amp="bf16", ema=0.9, bf16_weights=copies)  # noqa: E731
        trainer = Trainer(config(), tmp_path / name, stop_after=stop)
        assert (type(trainer.net).__name__ == "BFloat16Weights") == copies
        trainer.fit()
        if stop:
            trainer = Trainer(config(), tmp_path / name, resume=checkpoint.load(tmp_path / name / "last.pt"))
            trainer.fit()
        runs[name] = {**trainer.model.state_dict(), **{f"ema.{k}": v for k, v in trainer.ema.state_dict().items()}}
    for name in ("autocast", "resumed"):
        assert runs[name].keys() == runs["copies"].keys()
        assert all(torch.equal(runs[name][k], v) for k, v in runs["copies"].items()), name


def test_resume_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--steps", "4", "--batch-size", "4", "--stop-after", "2", "--out", str(run), *TINY]) == 0
    assert "resume with" in capsys.readouterr().out
    assert main(["train", "--resume", str(run)]) == 0
    assert checkpoint.load(run / "last.pt")["step"] == 4


def test_evaluation_files_agree_with_a_hand_computed_confusion_matrix(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--steps", "3", "--batch-size", "8", "--out", str(run), *TINY]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--synthetic", "--out", str(out), "--backend", "torch"]) == 0
    assert "synthetic test" in capsys.readouterr().out
    model = checkpoint.load_model(run / "best.pt").model
    test = open_dataset("synthetic", None, "test", size=32, length=40)
    counts = torch.zeros(8, 8, dtype=torch.int64)
    dtype = amp_dtype("auto", torch.device("cpu"))  # the run's train.amp, which evaluate uses; one batch as there
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        for images, labels in build_loader(test, 40, False, 32, "cpu", "torch", num_workers=0):
            logits = model(images.contiguous(memory_format=torch.channels_last))
            for truth, predicted in zip(labels.tolist(), logits.argmax(1).tolist()):
                counts[truth, predicted] += 1
    percent, images = read_confusion(out / "confusion-synthetic-test.csv")
    assert images.tolist() == counts.sum(1).tolist()
    torch.testing.assert_close(percent, 100 * counts.double() / counts.sum(1, keepdim=True), rtol=0, atol=1e-4)
    assert (out / "confusion-synthetic-test.png").read_bytes().startswith(b"\x89PNG")
    assert f"{100 * counts.trace().item() / 40:.2f}" in (out / "summary.md").read_text()


def test_evaluate_uses_the_runs_autocast_and_batch_unless_told(tmp_path, monkeypatch):
    import fer_train.reports as reports

    run = tmp_path / "run"
    assert main(["--steps", "2", "--batch-size", "4", "--amp", "bf16", "--out", str(run), *TINY]) == 0
    seen, real = [], reports.evaluate

    def evaluate(model, loader, *args, **options):  # records each split's autocast and batch size
        seen.append((options.get("amp_dtype"), loader.pipeline.batch_size))
        return real(model, loader, *args, **options)

    monkeypatch.setattr(reports, "evaluate", evaluate)
    assert main(["evaluate", str(run), "--synthetic", "--out", str(tmp_path / "same"), "--backend", "torch"]) == 0
    assert seen == [(torch.bfloat16, 40)]  # TINY's train.eval_batch_size

    def row(folder):  # the run's own report of best.pt (evaluated at its end) against evaluate's
        line = next(line for line in (folder / "summary.md").read_text().splitlines() if "| synthetic test " in line)
        return [cell.strip() for cell in line.split("|")]

    assert row(run) == row(tmp_path / "same")
    assert main(["evaluate", str(run), "--synthetic", "--out", str(tmp_path / "fp32"), "--backend", "torch",
                 "--amp", "none", "--batch-size", "16"]) == 0
    assert seen[1:] == [(None, 16)]
    assert main(["evaluate", str(run), "--synthetic", "--batch-size", "0"]) == 2


def test_predict_command(tmp_path, capsys):
    from torchvision.io import encode_png
    from fer_train.data.readers.synthetic import draw_face

    run = tmp_path / "run"
    assert main(["--steps", "2", "--batch-size", "4", "--out", str(run), *TINY]) == 0
    folder = tmp_path / "faces"
    folder.mkdir()
    for k in range(3):
        (folder / f"face{k}.png").write_bytes(encode_png(draw_face(k, torch.Generator().manual_seed(k), 40)).numpy())
    assert main(["predict", str(run), str(folder), "--whole-image", "-o", str(tmp_path / "p.json")]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [Path(r["path"]).name for r in rows] == ["face0.png", "face1.png", "face2.png"]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)


def _run_cli(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kw)


def test_ddp_with_two_gloo_processes_equals_one_process(tmp_path):
    """Two processes of micro-batch 4 read the micro-batches one process reads with 2-fold accumulation,
    with the same FMix draws, so the parameters agree to the last bit when both run one thread per process
    (batch-norm running statistics differ by design: DDP keeps rank 0's)."""
    common = ["--steps", "3", "--batch-size", "8", "--set", "train.micro_batch=4", *TINY]
    ddp = _run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fer_train", "train",
                    "--out", str(tmp_path / "ddp"), *common])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "x 2 processes" in ddp.stdout and ddp.stdout.count("test results") == 1  # rank 0 alone prints
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DDP process: convolutions split their sums by the thread count
    try:
        assert main(["train", "--out", str(tmp_path / "one"), *common]) == 0
    finally:
        torch.set_num_threads(threads)
    _same_parameters(checkpoint.load(tmp_path / "ddp" / "last.pt")["model"],
                     checkpoint.load(tmp_path / "one" / "last.pt")["model"])


def test_the_process_group_is_ended_before_the_process(tmp_path, monkeypatch):
    """The train command ends the process group it joined (gloo's threads, left to the interpreter's end, can
    abort a run that succeeded), after a barrier when the ranks ended normally; with none, ending is a no-op."""
    import torch.distributed as dist

    from fer_train.distributed import end_distributed

    barriers = []
    monkeypatch.setattr(dist, "barrier", lambda barrier=dist.barrier: barriers.append(barrier()))
    for barrier in (False, True):
        dist.init_process_group("gloo", init_method=(tmp_path / f"store-{barrier}").as_uri(), rank=0, world_size=1)
        end_distributed(barrier=barrier)
        assert not dist.is_initialized() and len(barriers) == barrier
        end_distributed(barrier=barrier)
    assert len(barriers) == 1


def test_a_ddp_model_left_in_a_reference_cycle_is_freed_before_the_group(tmp_path, monkeypatch):
    """A DDP model that only a reference cycle still holds (the Trainer after fit) goes while the process group
    lives: freed after it, its reducer would destroy the group with the GIL held and can hang the process."""
    import gc
    import weakref

    import torch.distributed as dist

    from fer_train.distributed import end_distributed

    dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    holder = {"model": torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))}
    holder["self"] = holder  # a cycle: only the garbage collector frees it
    model = weakref.ref(holder["model"])
    del holder
    alive_at_destroy = []
    destroy = dist.destroy_process_group
    monkeypatch.setattr(dist, "destroy_process_group", lambda: (alive_at_destroy.append(model() is not None),
                                                                 destroy()))
    enabled = gc.isenabled()
    gc.disable()  # no automatic collection may free it first
    try:
        end_distributed()
    finally:
        if enabled:
            gc.enable()
    assert alive_at_destroy == [False] and not dist.is_initialized()


def test_ddp_ranks_agree_on_the_length_a_time_budget_sets(tmp_path):
    """Each rank times its own steps; the planned length and the early stop are rank 0's on every rank, so
    no rank waits at a collective for a step the others do not take."""
    ddp = _run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fer_train", "train",
                    "--out", str(tmp_path / "ddp"), "--steps", "100000", "--time-budget", "40s", "--batch-size", "8",
                    "--set", "train.micro_batch=4", "--set", "train.log_every=2", "--set", "train.eval_every=1000000",
                    "--set", "train.checkpoint_every=1000000", *TINY])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "steps (was 100000)" in ddp.stdout
    state = checkpoint.load(tmp_path / "ddp" / "last.pt")
    assert 20 < state["step"] < 100000 and state["config"]["train"]["steps"] == state["step"]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "fer_train", "--steps", "1000", "--batch-size", "4",
                                "--out", str(run), *TINY], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in process.stdout:
        if line.startswith("step"):  # training has started
            process.send_signal(signal.SIGTERM)
            break
    out, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "stopped (SIGTERM)" in out
    assert 0 < checkpoint.load(run / "last.pt")["step"] < 1000


def test_a_non_finite_loss_stops_the_run(tmp_path, monkeypatch, capsys):
    original = Trainer._loss

    def diverging(self, logits, targets):
        loss = original(self, logits, targets)
        return loss * float("nan") if self.step >= 2 else loss

    monkeypatch.setattr(Trainer, "_loss", diverging)
    run = tmp_path / "run"
    args = ["--steps", "6", "--batch-size", "4", "--out", str(run), *TINY, "--set", "train.checkpoint_every=2"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "the loss became nan between steps 3 and 3" in err and str(run / "last.pt") in err
    assert checkpoint.load(run / "last.pt")["step"] == 2  # the diverged model was not saved


def test_a_run_that_fails_ends_its_input_workers_and_closes_its_log(tmp_path, monkeypatch):
    """An error mid-run (here from the loss at step 3) leaves no input worker process behind in a program
    that goes on and keeps the traceback (as an interactive session does), and the run's log files are
    closed."""
    import multiprocessing

    original = Trainer._loss

    def failing(self, logits, targets):
        if self.step >= 2:
            raise ValueError("a bug in the loss")
        return original(self, logits, targets)

    monkeypatch.setattr(Trainer, "_loss", failing)
    overrides = parse_overrides(TINY[1::2] + ["data.workers=1"])
    overrides["train"].update(steps=6, batch_size=4, out=str(tmp_path))
    before = set(multiprocessing.active_children())  # of earlier tests in this process, such as compile workers
    trainer = Trainer(build_config("default", overrides=overrides), tmp_path)
    with pytest.raises(ValueError, match="a bug in the loss") as failure:
        trainer.fit()
    assert failure.tb is not None and set(multiprocessing.active_children()) <= before
    assert trainer.log._metrics.closed


@pytest.mark.parametrize("args, message", [
    (["--ferplus", "/no/such/folder"], "data.ferplus: /no/such/folder is not a folder"),
    (["--set", "optim.lr=fast"], "optim.lr: 'fast' is not a valid float"),
    (["--set", "optim.learning_rate=0.1"], "unknown key optim.learning_rate"),
    (["--set", "lr=0.1"], "expected section.key=value"),
    (["--preset", "table9"], "unknown preset 'table9'"),
    (["--set", "train.batch_size=10", "--set", "train.micro_batch=4"], "must be positive and divide"),
    (["--set", "model.booster=squeeze"], "model.booster must be one of"),
    (["--config", "/no/such.toml"], "config file /no/such.toml does not exist"),
    (["--resume", "/no/such/run"], "checkpoint /no/such/run does not exist"),
    (["--set", "data.class_balance=1.5", "--set", "data.class_weights=none"], "data.class_balance must be in [0, 1]"),
    (["--set", "data.class_balance=0.5"], "would count them twice; set data.class_weights=none"),
    (["--set", "optim.name=sgd", "--set", "optim.decoupled_weight_decay=true"], "SGD's optim.weight_decay is L2"),
    (["--set", "data.crop=0"], "data.crop must be in (0, 1]"),
    (["--set", "data.crop=1.2"], "data.crop must be in (0, 1]"),
    (["--set", "data.zoom=1"], "data.zoom must be in [0, 1)"),
    (["--set", "data.translate=-0.1"], "data.translate must be in [0, 0.5]"),
    (["--set", "data.decoded_cache_mb=-1"], "data.decoded_cache_mb must be >= 0"),
])
def test_bad_configs_and_paths_fail_before_any_work(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_bug_keeps_its_traceback_and_exit_status_1(tmp_path, monkeypatch, capsys):
    """Only bad settings, paths and data are one-line errors (exit 2); a ValueError from a bug in a step
    propagates with its traceback (the interpreter exits with status 1)."""
    def broken(self, logits, targets):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(Trainer, "_loss", broken)
    with pytest.raises(ValueError, match="could not be broadcast"):
        main(["--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "run"), *TINY])
    result = _run_cli(["-c", "import sys; from fer_train.cli import main; import fer_train.engine as e; "
                             "e.Trainer._loss = lambda *a: 1 / 0; sys.exit(main(sys.argv[1:]))",
                       "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "run2"), *TINY])
    assert result.returncode == 1 and "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr


def test_evaluate_without_evaluation_data_says_so(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["--steps", "2", "--batch-size", "4", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    import fer_train.run_data as run_data
    monkeypatch.setattr(run_data, "TEST", {})  # a run whose sets have no test split
    assert main(["evaluate", str(run)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_a_missing_plotting_library_stops_the_run_before_training(tmp_path, monkeypatch, capsys):
    import fer_train.engine as engine
    monkeypatch.setattr(engine, "installed", lambda module: module != "matplotlib")
    assert main(["--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "run"), *TINY]) == 2
    assert "needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_one_version():
    import importlib.metadata

    import fer_kernels
    import fer_train
    assert fer_train.__version__ == fer_kernels.__version__ == importlib.metadata.version("fer-kernels")


def test_config_files_and_their_errors(tmp_path):
    good = tmp_path / "run.toml"
    good.write_text(f'preset = "table3-sgd-0.01"\n[data]\nferplus = "{tmp_path}"\n[train]\nsteps = 10\n'
                    '[optim]\nbetas = [0.9, 0.98]\n')
    config = build_config(file=good, overrides={"train": {"steps": "20"}})
    assert (config.preset, config.optim.name, config.optim.lr, config.optim.betas) == ("table3-sgd-0.01", "sgd",
                                                                                        0.01, (0.9, 0.98))
    assert config.train.steps == 20  # the command line wins over the file
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nsteps = 10\n")
    with pytest.raises(ConfigError, match="broken.toml"):
        build_config(file=broken)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[trian]\nsteps = 10\n")
    with pytest.raises(ConfigError, match=r"unknown.toml: unknown section 'trian'"):
        build_config(file=unknown)
    yaml = pytest.importorskip("yaml")
    as_yaml = tmp_path / "run.yaml"
    as_yaml.write_text(yaml.safe_dump({"model": {"arch": "resnet50", "booster": None}}))
    config = build_config(file=as_yaml)
    assert (config.model.arch, config.model.booster) == ("resnet50", None)


def test_every_preset_builds_and_the_paper_presets_follow_the_spec():
    for name in PRESETS:
        build_config(name, check_paths=False)
    with pytest.raises(ConfigError, match="preset table7-resnet18-rafdb trains on real data: give it with --rafdb"):
        build_config("table7-resnet18-rafdb", overrides={"data": {"ferplus": str(ROOT)}})
    best = build_config("table3-ranger-gc", check_paths=False)
    assert (best.train.steps, best.train.batch_size, best.train.eval_every) == (60_000, 256, 500)
    assert (best.optim.name, best.optim.lr, best.optim.betas, best.optim.gc) == ("ranger", 1e-3, (0.9, 0.999), True)
    assert build_config("table3-ranger", check_paths=False).optim.gc is False
    assert build_config("table7-resnet50-mish-abp-affectnet", check_paths=False).data.class_weights == "eq4"
    assert build_config("table7-resnet18-ferplus", check_paths=False).data.class_weights == "none"
    with pytest.raises(ConfigError, match="preset ferplus-cpu-1h trains on real data: give it with --ferplus"):
        build_config("ferplus-cpu-1h")
    hour = build_config("ferplus-cpu-1h", check_paths=False)
    assert (hour.train.time_budget, hour.data.ferplus_label_mode, hour.data.image_size) == ("60m", "soft", 48)
    assert (hour.data.class_weights, hour.data.class_balance, hour.data.fmix) == ("none", 0.5, False)
    assert (hour.data.zoom, hour.data.translate) == (0.1, 0.1)


def test_a_saved_run_keeps_the_settings_it_predates_off():
    """A checkpoint saved before a setting existed resumes (and loads) with that setting's dataclass default,
    the behaviour it trained with, not with the value its preset has gained since (ferplus-cpu-1h took random
    crops after its first runs); the settings it saved stay as saved."""
    saved = build_config("ferplus-cpu-1h", check_paths=False).to_dict()
    saved["optim"]["lr"] = 5e-3
    del saved["data"]["zoom"], saved["data"]["translate"]
    resumed = build_config("ferplus-cpu-1h", overrides=checkpoint.saved_settings(saved), check_paths=False)
    assert (resumed.data.zoom, resumed.data.translate) == (0.0, 0.0)
    assert (resumed.optim.lr, resumed.data.class_balance, resumed.train.time_budget) == (5e-3, 0.5, "60m")
    current = build_config("ferplus-cpu-1h", check_paths=False).to_dict()
    assert checkpoint.saved_settings(current)["data"]["zoom"] == 0.1


def test_learning_rate_is_flat_then_cosine():
    factors = [lr_factor(step, 10, "flat_cosine", 0.5) for step in range(10)]
    assert factors[:5] == [1.0] * 5 and factors[5] == 1.0 and factors[-1] > 0
    assert all(a > b for a, b in zip(factors[5:], factors[6:]))
    assert lr_factor(7, 10, "flat_cosine", 0.5) == pytest.approx(0.5 * (1 + math.cos(0.4 * math.pi)))
    assert lr_factor(3, 10, "cosine", 0.5) == pytest.approx(0.5 * (1 + math.cos(0.3 * math.pi)))
    assert lr_factor(9, 10, "constant", 0.5) == 1.0
