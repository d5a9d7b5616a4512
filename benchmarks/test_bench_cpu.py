"""pytest-benchmark versions of the CPU comparisons: forward + backward of the fused op ("cpu" backend)
against PyTorch eager, float32, 2 threads, at one ResNet-50 shape each (batch 8, 224 x 224 images).

    pytest benchmarks/test_bench_cpu.py --benchmark-only

Not part of the test suite: pytest's testpaths is tests/, and run without --benchmark-only these skip.
One input set is enough: every case moves well over 100 MB, beyond any CPU's last-level cache.

    pytest benchmarks/test_bench_cpu.py       # without --benchmark-only: the smoke run of bench_pipeline.py

That one times nothing (a toy configuration, its figures unchecked): it shows the script runs end to end and
writes a results file that the README's table is printed from.
"""

import json
import subprocess
import sys

import pytest
import torch

import bench_batch_norm_act
import bench_mish
import bench_recalibrate
import common
from fer_train.data import dali_available

CASES = [(bench_batch_norm_act, (8, 64, 112, 112), "channels_last"),
         (bench_mish, (8, 64, 112, 112), "nchw"),
         (bench_recalibrate, (8, 256, 56, 56), "nchw"),
         (bench_recalibrate, (8, 256, 56, 56), "channels_last")]


@pytest.fixture(autouse=True)
def _benchmark_only(request):
    if "benchmark" in request.fixturenames and not request.config.getoption("benchmark_only", False):
        pytest.skip("a timing, not a test: run pytest benchmarks/test_bench_cpu.py --benchmark-only")
    threads = torch.get_num_threads()
    torch.set_num_threads(common.CPU_THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", ["fused-cpu", "eager"])
@pytest.mark.parametrize("module, shape, layout", CASES,
                         ids=[f"{m.__name__.removeprefix('bench_')}-{'x'.join(map(str, s))}-{l}" for m, s, l in CASES])
def test_fwd_bwd(benchmark, module, shape, layout, variant):
    torch.manual_seed(0)
    inputs, grad = module.make_inputs(shape, torch.float32, layout, torch.device("cpu"))
    forward = module.make_variants("cpu")[variant].forward
    benchmark.group = f"{module.__name__.removeprefix('bench_')} fwd+bwd {'x'.join(map(str, shape))} {layout} float32"
    benchmark.extra_info.update(threads=torch.get_num_threads(), device=common.device_name(torch.device("cpu")),
                                bytes_moved=module.byte_floor(shape, torch.float32, "fwd+bwd"))

    def step():
        for t in inputs:
            t.grad = None  # so backward writes fresh gradients instead of adding to the last ones
        forward(*inputs).backward(grad)

    benchmark(step)


def test_bench_pipeline_smoke(tmp_path, capsys):
    out = tmp_path / "pipeline.json"
    command = [sys.executable, str(common.ROOT / "benchmarks" / "bench_pipeline.py"), "--device", "cpu", "--quick",
               "--sets", "synthetic256", "--images", "16", "--batch-size", "8", "--warmup-batches", "1",
               "--image-size", "32", "--workers", "1", "--cache", str(tmp_path / "cache"), "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    assert doc["what"] == "pipeline" and doc["complete"] and doc["cpu_cores"] >= 1
    rows = {row["pipeline"]: row for row in doc["rows"]}
    assert set(rows) == {"dali", "torch", "torchvision"}
    assert bool(rows["dali"].get("skipped")) != dali_available()
    for row in (r for r in rows.values() if not r.get("skipped")):
        assert row["images"] == 16 and len(row["repeats_images_per_s"]) == 1 and row["images_per_s"] > 0
        assert row["vs_torchvision"] == pytest.approx(row["images_per_s"] / rows["torchvision"]["images_per_s"])
    capsys.readouterr()
    common.markdown_pipeline([str(out)])
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + 3 and all(line.startswith("| synthetic256 |") for line in table[2:])
