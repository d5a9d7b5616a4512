#!/usr/bin/env bash
# Build, test and benchmark fer-kernels on a CUDA machine in one call.
#
#   bash benchmarks/run_gpu.sh                      all stages: build test mish recalibrate memory optim train
#                                                   pipeline test_train ferplus
#   FERPLUS=DIR bash benchmarks/run_gpu.sh build ferplus   the paper's FERPlus row for the rest of BUDGET
#   bash benchmarks/run_gpu.sh mish recalibrate     some stages (a warm machine keeps the build)
#
# The extension is built there, against that machine's torch: one built elsewhere will not load. An in-place
# build that imports with its CUDA kernels and is newer than every source is kept (a warm machine's build, or
# one made elsewhere against the same torch and Python); any source edited since rebuilds it.
# test: the kernel tests (tests/kernels, the CUDA and Triton backends against the references on the GPU);
# test_train: the engine's tests, which train on the GPU where there is one. Both run in parallel with
# pytest-xdist and a per-test limit with pytest-timeout where those are installed.
# Results: benchmarks/results/<gpu>-{mish,recalibrate,memory,optim,train,pipeline}.json (and the ferplus stage's
# folder), packed into $OUT/results.tar.gz beside this log if OUT is set.
# Every stage runs under a time limit that keeps the whole call inside BUDGET seconds (default 570: a
# call under ten minutes); the benchmarks write their JSON after every row, so a stage that runs
# out of time still leaves what it measured, marked "complete": false.
# Environment: PYTHON (default python3), BUDGET, MAX_JOBS (default: all cores), FERPLUS (the ferplus stage's data).

set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ALL_STAGES="build test mish recalibrate memory optim train pipeline test_train ferplus"
STAGES=${*:-$ALL_STAGES}
BUDGET=${BUDGET:-570}
START=$SECONDS

# Import the tree's fer_kernels whichever way the build below succeeds (editable install or in place).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset FER_KERNELS_BACKEND  # the benchmarks name their backends; tests choose theirs

run() { echo "+ $*"; "$@"; }

# limit CAP: seconds a stage may take, at most CAP and at most what is left of BUDGET less 20 s for the summary.
limit() {
    local left=$((BUDGET - (SECONDS - START) - 20))
    [ "$left" -lt "$1" ] && echo $((left > 10 ? left : 10)) || echo "$1"
}

# Whether fer_kernels._C is built in place, newer than every source it is built from, and imports with its
# CUDA kernels against this torch.
built_and_current() {
    local so
    so=$(ls fer_kernels/_C*.so 2>/dev/null | head -n 1)
    [ -n "$so" ] || return 1
    [ -z "$(find csrc setup.py -newer "$so" -type f | head -n 1)" ] || return 1
    $PY -c "import sys, fer_kernels._C as C; sys.exit(0 if C.with_cuda else 1)" 2>/dev/null
}

show_backends() {
    run $PY -c "import json, fer_kernels, fer_kernels._C as C
assert C.with_cuda, 'fer_kernels._C was built without its CUDA kernels'
print(json.dumps(fer_kernels.backends(), indent=1))"
}

stage_build() {
    if built_and_current; then
        echo "fer_kernels._C is built, newer than its sources and imports with CUDA kernels: kept"
        show_backends
        return
    fi
    export FER_KERNELS_CUDA=1 FER_KERNELS_EXTENSION=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
    # The image's python3 is a system Python: pip may refuse it as externally managed (PEP 668) unless
    # told otherwise; PIP_BREAK_SYSTEM_PACKAGES does that for pip >= 23.0.1 and is ignored by older pips.
    # If pip cannot do the editable install at all (an old setuptools, no pip), build in place instead:
    # PYTHONPATH above makes the tree importable.
    export PIP_BREAK_SYSTEM_PACKAGES=1
    echo "FER_KERNELS_CUDA=1 FER_KERNELS_EXTENSION=1 MAX_JOBS=$MAX_JOBS PIP_BREAK_SYSTEM_PACKAGES=1"
    if ! run timeout "$(limit 300)" $PY -m pip install --no-build-isolation --no-deps -e .; then
        echo "pip install -e . failed; building the extension in place instead"
        run timeout "$(limit 300)" $PY setup.py build_ext --inplace || return 1
    fi
    show_backends
}

# pytest with one worker per core (pytest-xdist) and a limit per test (pytest-timeout), where installed. At
# the stage's limit pytest gets SIGINT, stops as for Ctrl-C and still writes its JUnit report, from which the
# tests that failed so far are listed (its own summary lists none when interrupted under xdist).
pytest_run() {
    local cap=$1 options=() report status
    shift
    # one intra-op thread per worker: a worker per core, each with a thread per core, would oversubscribe the
    # cores many times over (tests that compare thread counts set their own)
    $PY -c "import xdist" 2>/dev/null && options+=(-n "$(nproc)") && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    $PY -c "import pytest_timeout" 2>/dev/null && options+=(--timeout 120)
    report=$(mktemp --suffix .xml)
    run timeout -s INT -k 20 "$(limit "$cap")" $PY -m pytest -q -p no:cacheprovider -rfE --durations=5 \
        --junitxml "$report" "${options[@]}" "$@"
    status=$?
    $PY -c "import sys, xml.etree.ElementTree as ET
for case in ET.parse(sys.argv[1]).iter('testcase'):
    if case.find('failure') is not None or case.find('error') is not None:
        print('FAILED', case.get('classname', '').replace('.', '/') + '.py::' + case.get('name', ''))" "$report" 2>/dev/null
    rm -f "$report"
    return $status
}

stage_test() { pytest_run 150 tests/kernels; }
stage_test_train() { pytest_run 240 tests/train; }
stage_mish() { run timeout "$(limit 120)" $PY benchmarks/bench_mish.py --device cuda; }
stage_recalibrate() { run timeout "$(limit 180)" $PY benchmarks/bench_recalibrate.py --device cuda; }
stage_memory() { run timeout "$(limit 90)" $PY benchmarks/bench_memory.py --device cuda; }
stage_optim() { run timeout "$(limit 90)" $PY benchmarks/bench_optim.py --device cuda; }
# the step part only: the engine part's settings (threads, glibc's allocator, bf16 where the CPU has it) are
# the CPU's questions; a GPU engine's rate comes from a real run (the README's command)
stage_train() { run timeout "$(limit 240)" $PY benchmarks/bench_train.py --device cuda --parts step; }
# no DALI on the GPU image: the PyTorch pipeline against the torchvision baseline, on the synthetic JPEGs
# (real data sets are not carried to the GPU machine), with the machine's cores as workers
stage_pipeline() { run timeout "$(limit 120)" $PY benchmarks/bench_pipeline.py --device cuda --sets synthetic256 \
    --pipelines dali,torch,torchvision --workers "$(nproc)" --repeats 2; }
# ferplus, with FERPLUS set to a FERPlus folder (docs/method.md section 7; skipped without it): the paper's
# Table 7 FERPlus row (ResNet-50 + Mish + ABP, 224 px, bf16, the paper's recipe) trained for what is left of
# BUDGET, its evaluation included; the run's files, except its weights, are copied to
# benchmarks/results/<gpu>-ferplus-table7/ (the weights stay in runs/)
stage_ferplus() {
    if [ -z "${FERPLUS:-}" ]; then
        echo "ferplus: skipped (set FERPLUS to a FERPlus folder)"
        return 0
    fi
    local seconds=$((BUDGET - (SECONDS - START) - 40)) name status
    if [ "$seconds" -lt 60 ]; then
        echo "ferplus: ${seconds} s left of BUDGET, too little to train"
        return 1
    fi
    name=$($PY -c "import torch, sys; sys.path.insert(0, 'benchmarks'); import common
print(common.slug(torch.cuda.get_device_name()))")-ferplus-table7
    rm -rf "runs/$name"
    run timeout $((seconds + 30)) $PY -m fer_train train --preset table7-resnet50-mish-abp-ferplus --ferplus "$FERPLUS" \
        --time-budget "${seconds}s" --workers "$(nproc)" --out "runs/$name" --set train.log_every=50
    status=$?
    mkdir -p "benchmarks/results/$name"
    find "runs/$name" -maxdepth 1 -type f ! -name '*.pt' -exec cp {} "benchmarks/results/$name/" \;
    return $status
}

for stage in $STAGES; do
    if ! declare -F "stage_$stage" >/dev/null; then
        echo "unknown stage $stage (stages: $ALL_STAGES)"
        exit 2
    fi
done

main() {
    local mark
    mark=$(mktemp)  # results newer than this were written by this run
    echo "== machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null \
        || echo "no nvidia-smi"
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    # setuptools too: the build's first suspect if pip or setup.py rejects pyproject.toml
    $PY -c "import sys, torch, triton, setuptools
print('python', sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda,
      'triton', triton.__version__, 'setuptools', setuptools.__version__)"

    declare -A STATUS
    for stage in $STAGES; do
        echo "== $stage ($((SECONDS - START)) s elapsed)"
        "stage_$stage"
        STATUS[$stage]=$?
        if [ "$stage" = build ] && [ "${STATUS[build]}" -ne 0 ]; then
            echo "build failed: the tests and the benchmarks need the CUDA extension; stopping"
            break
        fi
    done

    mapfile -t WRITTEN < <(find benchmarks/results -maxdepth 1 -name '*.json' -newer "$mark" | sort)
    if [ -n "${OUT:-}" ]; then  # one archive of every file this run wrote under benchmarks/results
        find benchmarks/results -type f -newer "$mark" -print0 | tar czf "$OUT/results.tar.gz" --null -T -
    fi
    echo "== summary ($((SECONDS - START)) s)"
    for stage in $STAGES; do
        [ -z "${STATUS[$stage]+x}" ] && continue
        echo "$stage: exit ${STATUS[$stage]}$([ "${STATUS[$stage]}" = 124 ] && echo ' (out of time)')"
    done
    [ "${#WRITTEN[@]}" -gt 0 ] && $PY benchmarks/common.py "${WRITTEN[@]}"
    rm -f "$mark"
    for stage in $STAGES; do
        [ "${STATUS[$stage]:-1}" -eq 0 ] || return 1  # a stage failed or never ran
    done
}

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    main 2>&1 | tee "$OUT/run_gpu.log"
    exit "${PIPESTATUS[0]}"
fi
main
