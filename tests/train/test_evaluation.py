"""fer_train.evaluation: confusion counts, accuracy and loss against hand-computed values, the same global
result under 2 gloo ranks, the CSV / PNG / Markdown outputs and the training curves (prediction on files:
test_inference.py)."""

import csv
import json
import math
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchvision.io import decode_png

from fer_train.data import CLASSES, build_loader, open_dataset
from fer_train.distributed import end_distributed
from fer_train.evaluation import EvalResult, confusion_matrix, evaluate
from fer_train.cli import main
from fer_train.errors import DataError
from fer_train.reports import summary_table, training_curves, write_confusion
from fer_train.runlog import read_metrics
from helpers import read_confusion

BIAS = torch.tensor([0.0, 0.5, -1.0, 2.0, 0.25, -0.5, 1.0, 0.0])  # argmax: class 3


class Constant(nn.Module):
    """The same logits for every image: predictions and loss follow from BIAS alone."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(BIAS.clone())

    def forward(self, images):
        return self.bias.expand(images.shape[0], -1) + 0 * images.sum()


class Strips(nn.Module):
    """Logit k = mean of channel 0 over the k-th vertical strip of the image, times a scale: a fixed
    function of the input, so the expected predictions can be computed without the module."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(3.0))

    def forward(self, images):
        return self.scale * strips(images)


def strips(images):
    n, _, h, w = images.shape
    return images[:, 0].reshape(n, h, len(CLASSES), w // len(CLASSES)).mean((1, 3))


def synthetic_loader(length=24, batch_size=5, **kw):
    dataset = open_dataset("synthetic", None, "val", length=length, size=32)
    return build_loader(dataset, batch_size, train=False, device="cpu", backend="torch", num_workers=0,
                        image_size=32, **kw)


def test_confusion_matrix_by_hand():
    target = torch.tensor([0, 1, 2, 2, 2, 0, 7, 7])
    predicted = torch.tensor([0, 1, 1, 2, 2, 2, 7, 0])
    expected = torch.zeros(8, 8, dtype=torch.int64)
    for t, p, n in [(0, 0, 1), (1, 1, 1), (2, 1, 1), (2, 2, 2), (0, 2, 1), (7, 7, 1), (7, 0, 1)]:
        expected[t, p] = n
    got = confusion_matrix(predicted, target)
    assert got.dtype == torch.int64 and torch.equal(got, expected)
    assert torch.equal(confusion_matrix(predicted[:3], target[:3], classes=3),
                       torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0]]))


def test_result_accuracy_rows_and_dict():
    confusion = torch.zeros(8, 8, dtype=torch.int64)
    confusion[0, 0], confusion[0, 1] = 3, 1   # neutral: 3 of 4 right
    confusion[1, 1] = 2                       # happy: 2 of 2
    confusion[2, 0] = 4                       # surprise: 0 of 4; no other class has images
    result = EvalResult("FERPlus valid", confusion, 0.5, present_classes=tuple(range(7)))
    assert result.count == 10 and result.accuracy == pytest.approx(0.5)
    rows = result.normalised()
    assert rows.dtype == torch.float64
    torch.testing.assert_close(rows[0, :2], torch.tensor([75.0, 25.0], dtype=torch.float64))
    assert rows[1, 1] == 100 and rows[2, 0] == 100 and torch.isnan(rows[3:]).all()
    torch.testing.assert_close(result.per_class_accuracy[:3], torch.tensor([0.75, 1.0, 0.0], dtype=torch.float64))
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))  # JSON-ready: no NaN left
    assert data["images"] == 10 and data["accuracy"] == 0.5 and data["per_class_accuracy"]["sad"] is None
    assert data["present_classes"] == list(CLASSES[:7])
    assert data["confusion"] == confusion.tolist()


def test_evaluate_constant_model_by_hand():
    model = Constant().train()
    calls = []
    result = evaluate(model, synthetic_loader(), "synthetic val",
                      progress=lambda done, total: calls.append((done, total)))
    # sample i shows class i % 8: 3 images per class, all predicted as argmax(BIAS) = 3
    expected = torch.zeros(8, 8, dtype=torch.int64)
    expected[:, 3] = 3
    assert torch.equal(result.confusion, expected)
    assert result.accuracy == pytest.approx(1 / 8) and result.count == 24
    log_probs = BIAS.double().log_softmax(0)
    assert result.loss == pytest.approx(-log_probs.mean().item(), rel=1e-6)  # every class equally often
    assert calls == [(k, 5) for k in range(1, 6)]  # 24 images in batches of 5
    assert model.training and model.bias.grad is None  # mode restored, no graph built
    assert result.present_classes == tuple(range(8))


def test_evaluate_input_dependent_model():
    loader = synthetic_loader(length=20, batch_size=6)
    logits, targets = [], []
    for images, target in loader:  # the evaluation order is fixed: a second pass reads the same batches
        logits.append(3.0 * strips(images))
        targets.append(target)
    logits, targets = torch.cat(logits), torch.cat(targets)
    expected = torch.zeros(8, 8, dtype=torch.int64)
    for t, p in zip(targets.tolist(), logits.argmax(1).tolist()):
        expected[t, p] += 1
    model = Strips().eval()
    for channels_last in (False, True):
        result = evaluate(model, loader, "synthetic val", channels_last=channels_last)
        assert torch.equal(result.confusion, expected)
        assert result.loss == pytest.approx(nn.functional.cross_entropy(logits.double(), targets).item(), rel=1e-5)
    assert not model.training
    amp = evaluate(model, loader, "synthetic val", amp_dtype=torch.bfloat16)  # autocast runs on the CPU too
    assert amp.count == 20 and math.isfinite(amp.loss)


def test_evaluate_soft_targets():
    generator = torch.Generator().manual_seed(0)
    soft = torch.rand(10, 8, generator=generator).softmax(1)
    batches = [(torch.zeros(4, 3, 8, 8), soft[:4]), (torch.zeros(6, 3, 8, 8), soft[4:])]
    result = evaluate(Constant(), batches, "ferplus valid")
    expected_loss = -(soft.double() * BIAS.double().log_softmax(0)).sum(1).mean().item()
    assert result.loss == pytest.approx(expected_loss, rel=1e-6)
    assert torch.equal(result.confusion, confusion_matrix(torch.full((10,), 3), soft.argmax(1)))


def _distributed_worker(rank, world, init_file, out_file):
    sys.path.insert(0, os.path.dirname(__file__))
    from datetime import timedelta
    # a short timeout: a rank left waiting on a collective fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        model = nn.parallel.DistributedDataParallel(Strips())
        # 17 images in batches of 4: rank 0 reads 9 (3 batches), rank 1 reads 8 (2 batches); uneven
        # shards must neither hang nor count an image twice
        result = evaluate(model, synthetic_loader(length=17, batch_size=4, rank=rank, world=world), "mixed val")
        torch.save(result.to_dict(), f"{out_file}.{rank}")
        del model  # the engine's teardown frees the DDP model before the group (end_distributed says why)
    finally:
        end_distributed()


def test_evaluate_distributed_matches_single_process(tmp_path):
    out = tmp_path / "result"
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    single = evaluate(Strips(), synthetic_loader(length=17, batch_size=4), "mixed val")
    for rank in range(2):  # every rank holds the global result
        result = torch.load(f"{out}.{rank}")
        assert result["confusion"] == single.confusion.tolist()
        assert result["loss"] == pytest.approx(single.loss, rel=1e-6)


def _sample_result():
    confusion = torch.tensor([[50, 3, 0, 0, 0, 0, 1, 0], [2, 40, 0, 0, 0, 0, 0, 0], [0, 0, 7, 1, 0, 0, 2, 0],
                              [3, 0, 0, 9, 1, 0, 0, 0], [0, 0, 0, 2, 11, 1, 0, 0], [0, 0, 0, 0, 1, 2, 0, 0],
                              [0, 0, 2, 0, 0, 0, 5, 0], [0, 0, 0, 0, 0, 0, 0, 0]])
    return EvalResult("RAF-DB test", confusion, 0.61234, present_classes=tuple(range(7)))


def test_write_confusion_csv_and_png(tmp_path):
    result = _sample_result()
    csv_path, png_path = write_confusion(result, tmp_path / "run")
    assert csv_path.name == "confusion-raf-db-test.csv" and png_path.name == "confusion-raf-db-test.png"
    percent, images = read_confusion(csv_path)
    torch.testing.assert_close(percent, result.normalised(), equal_nan=True, rtol=0, atol=1e-4)
    assert torch.equal(images, result.confusion.sum(1))
    rebuilt = (percent.nan_to_num() * images[:, None] / 100).round().long()
    assert torch.equal(rebuilt, result.confusion)
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:9] == list(CLASSES) and [r[0] for r in rows[1:9]] == list(CLASSES)
    assert rows[-1] == ["predicted", *map(str, result.confusion.sum(0).tolist()), str(result.count)]
    png = decode_png(torch.frombuffer(bytearray(png_path.read_bytes()), dtype=torch.uint8))
    assert png.shape[0] in (3, 4) and 300 <= png.shape[1] <= 2000 and 300 <= png.shape[2] <= 2000


def test_summary_table_is_markdown_with_the_numbers():
    results = [_sample_result(), EvalResult("synthetic val", torch.eye(8, dtype=torch.int64) * 5, 0.125)]
    table = summary_table(results)
    lines = table.splitlines()
    assert len(lines) == 4 and all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert set(lines[1]) <= set("|-: ")  # the Markdown delimiter row
    assert "RAF-DB test" in lines[2] and " 143 " in lines[2] and "86.71" in lines[2] and "0.6123" in lines[2]
    assert "92.59" in lines[2]  # neutral 50 / 54
    assert lines[2].rstrip(" |").endswith("-")  # contempt is not in RAF-DB
    assert "100.00" in lines[3] and "0.1250" in lines[3]
    assert [c.strip() for c in lines[0].strip("|").split("|")][:6] == ["set", "images", "accuracy %", "macro-F1 %",
                                                                     "loss", "ECE %"]


def test_macro_f1_and_recall_by_hand():
    """Macro-F1 averages the F1 of the classes with images; a class never predicted scores 0, one never
    present does not count."""
    confusion = torch.zeros(8, 8, dtype=torch.int64)
    confusion[0, 0], confusion[0, 1], confusion[1, 1], confusion[2, 0] = 6, 2, 4, 2  # class 2 is never predicted
    result = EvalResult("hand", confusion, 0.0)
    f1 = [2 * 6 / (8 + 8), 2 * 4 / (4 + 6), 0.0]  # 2 TP / (true + predicted) per class
    assert result.macro_f1 == pytest.approx(sum(f1) / 3)
    torch.testing.assert_close(result.per_class_accuracy[:3], torch.tensor([0.75, 1.0, 0.0], dtype=torch.float64))
    with_temperature = EvalResult("hand", confusion, 0.0, ece=0.2, temperature=1.5, ece_calibrated=0.05)
    assert "5.00 (T=1.50)" in summary_table([with_temperature])


# --------------------------------------------------------------------------------------------------- calibration

def test_fit_temperature_recovers_the_temperature_of_the_data():
    """Labels drawn from softmax(z / 2.5): the fitted temperature of the logits z is close to 2.5, and it
    lowers the expected calibration error."""
    from fer_train.calibration import CalibrationBins, fit_temperature

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 8, generator=g) * 4
    labels = torch.multinomial((logits / 2.5).softmax(1), 1, generator=g).squeeze(1)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(2.5, rel=0.05)
    raw, fitted = CalibrationBins("cpu"), CalibrationBins("cpu")
    raw.add(logits, labels)
    fitted.add(logits / temperature, labels)
    assert fitted.ece() < 0.02 < raw.ece()


def test_ece_by_hand():
    """Two images in the bin [13/15, 14/15) (confidence 0.9 and 0.92, one right) and one at 0.5 (right):
    ECE = (|1 - 1.82| + |1 - 0.5|) / 3."""
    from fer_train.calibration import CalibrationBins

    def logits_for(p):  # two classes: top probability p on class 0
        return torch.tensor([[math.log(p / (1 - p)), 0.0]])

    bins = CalibrationBins("cpu")
    bins.add(torch.cat([logits_for(0.9), logits_for(0.92), logits_for(0.5 + 1e-9)]), torch.tensor([0, 1, 0]))
    assert bins.ece() == pytest.approx((abs(1 - 1.82) + abs(1 - 0.5)) / 3, abs=1e-6)


def test_tta_is_the_mean_of_the_two_passes_and_absent_classes_are_never_predicted():
    """With test-time augmentation the probabilities are the mean of the image's and the flipped image's;
    a split without contempt (RAF-DB) never predicts it, even where its logit is the largest."""
    from fer_train.evaluation import split_logits

    model = Strips()
    loader = lambda: synthetic_loader(length=12, batch_size=12)  # noqa: E731 - a fresh epoch each time
    (plain, targets), = split_logits(model, loader())
    (both, _), = split_logits(model, loader(), tta=True)
    images = next(iter(loader()))[0]
    expected = (model(images).softmax(1) + model(images.flip(-1)).softmax(1)) / 2
    torch.testing.assert_close(both.exp(), expected.detach())
    assert torch.equal(plain, model(images).detach())

    seven = tuple(range(7))
    (masked, _), = split_logits(Constant(), loader(), present_classes=seven)
    assert torch.isinf(masked[:, 7]).all() and (masked[:, 7] < 0).all()
    biased = Constant()
    with torch.no_grad():
        biased.bias[7] = 10.0  # contempt would win everywhere
    result = evaluate(biased, loader(), "rafdb-like", present_classes=seven)
    assert result.confusion[:, 7].sum() == 0 and result.confusion[:, 3].sum() == 12


def _records(loss_scale=1.0):
    progress = [{"step": s, "loss": loss_scale * 2.0 / s, "lr": 1e-3 * (1 - s / 400), "images_per_s": 90.0 + s}
                for s in (100, 200, 300)]
    evaluations = [{"step": s, "eval": split, "accuracy": a, "macro_f1": a - 0.2, "loss": 1 - a}
                   for split, rows in (("ferplus valid", ((10, 0.3), (200, 0.82), (300, 0.81))),
                                       ("mixed val", ((200, 0.7), (300, float("nan")))))
                   for s, a in rows]
    return progress + evaluations


def _line(ax, label):
    """The line of `label` (an accuracy line's label goes on with its best, in brackets)."""
    return next(line for line in ax.lines if line.get_label().split(" (best")[0] == label)


def test_training_curves_plot_the_records():
    """One run: the training loss, each split's accuracy and macro-F1 (percent) and loss, the rate and the
    speed, each against its steps; the best accuracy starred; a non-finite value is a gap; the untrained
    first evaluation (in the first 5 % of the steps) falls below a range that shows the rest."""
    records = _records()
    fig = training_curves({"run": records})
    loss_ax, score_ax, lr_ax, speed_ax = fig.axes
    training = _line(loss_ax, "training")
    assert list(training.get_xdata()) == [100, 200, 300] and list(training.get_ydata()) == [0.02, 0.01, 2.0 / 300]
    valid = _line(score_ax, "ferplus valid accuracy")
    assert list(valid.get_xdata()) == [10, 200, 300]
    assert valid.get_label() == "ferplus valid accuracy (best 82.00 % at step 200)"
    assert list(valid.get_ydata()) == pytest.approx([30.0, 82.0, 81.0])
    assert list(_line(score_ax, "ferplus valid macro-F1").get_ydata()) == pytest.approx([10.0, 62.0, 61.0])
    mixed_loss, mixed_accuracy = _line(loss_ax, "mixed val").get_ydata(), _line(score_ax, "mixed val accuracy")
    assert mixed_loss[0] == pytest.approx(0.3) and math.isnan(mixed_loss[1])
    assert math.isnan(mixed_accuracy.get_ydata()[1])
    stars = [(line.get_xdata()[0], line.get_ydata()[0]) for line in score_ax.lines if line.get_marker() == "*"]
    assert stars == [(200, pytest.approx(82.0)), (200, pytest.approx(70.0))]
    assert list(lr_ax.lines[0].get_ydata()) == pytest.approx([7.5e-4, 5e-4, 2.5e-4])
    assert list(speed_ax.lines[0].get_ydata()) == [190.0, 290.0, 390.0]
    low, high = score_ax.get_ylim()
    assert 30.0 < low < 50.0 and high > 82.0  # the later scores: 50 (mixed val's F1) to 82, room for the legend
    assert score_ax.get_legend().get_title().get_text() == "evaluations in the first 5 % of the steps: below the axis"
    assert training_curves({"run": records[:3] + records[4:]}).axes[1].get_legend().get_title().get_text() == ""


def test_training_curves_of_several_runs_and_of_a_run_without_records():
    fig = training_curves({"a": _records(), "b": _records(loss_scale=2.0)})
    loss_ax, score_ax = fig.axes[:2]
    assert list(_line(loss_ax, "b: training").get_ydata()) == [0.04, 0.02, 4.0 / 300]
    assert _line(score_ax, "a: ferplus valid accuracy").get_color() != _line(score_ax, "b: ferplus valid accuracy")\
        .get_color()
    empty = training_curves({"nothing": []})
    assert any(text.get_text() == "no evaluation during training" for text in empty.axes[1].texts)


def test_read_metrics_names_a_broken_line_and_skips_a_cut_last_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2, "lo')  # killed while writing
    assert read_metrics(path) == [{"step": 1, "loss": 2.0, "lr": 0.1}]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(DataError, match="metrics.jsonl, line 2: not a JSON record"):
        read_metrics(path)
    path.write_text('{"loss": 1}\n')
    with pytest.raises(DataError, match="line 1: not a metrics record"):
        read_metrics(path)


def test_curves_command_draws_one_run_into_its_folder_and_several_where_told(tmp_path, capsys):
    for name, scale in (("one", 1.0), ("two", 2.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(scale)))
    assert main(["curves", str(tmp_path / "one")]) == 0
    assert decode_png(torch.frombuffer(bytearray((tmp_path / "one" / "training-curves.png").read_bytes()),
                                       dtype=torch.uint8)).shape[0] in (3, 4)
    assert main(["curves", str(tmp_path / "one"), str(tmp_path / "two" / "metrics.jsonl"), "-o",
                 str(tmp_path / "both.png")]) == 0 and (tmp_path / "both.png").is_file()
    assert main(["curves", str(tmp_path / "one"), str(tmp_path / "two")]) == 2
    assert "several runs need --output" in capsys.readouterr().err
    assert main(["curves", str(tmp_path / "three")]) == 2
    assert f"{tmp_path / 'three'}: no metrics.jsonl there" in capsys.readouterr().err
    assert main(["curves", str(tmp_path / "one"), "-o", str(tmp_path / "one.txt")]) == 2
    assert "give a file name ending in .png" in capsys.readouterr().err
