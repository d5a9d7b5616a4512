#!/usr/bin/env bash
# Build, test and benchmark fer-kernels on a CUDA machine in one call.
#
#   bash benchmarks/run_gpu.sh                      all stages: build test mish recalibrate memory optim train pipeline
#   bash benchmarks/run_gpu.sh mish recalibrate     some stages (a warm machine keeps the build)
#
# The extension is built there, against that machine's torch: one built elsewhere will not load.
# Results: benchmarks/results/<gpu>-{mish,recalibrate,memory,optim,train,pipeline}.json, copied with this log to $OUT if set.
# Every stage runs under a time limit that keeps the whole call inside BUDGET seconds (default 570; the
# device tool stops a call at 600); the benchmarks write their JSON after every row, so a stage that runs
# out of time still leaves what it measured, marked "complete": false.
# Environment: PYTHON (default python3), BUDGET, MAX_JOBS (default: all cores).

set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAGES=${*:-build test mish recalibrate memory optim train pipeline}
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

stage_build() {
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
    run $PY -c "import json, fer_kernels, fer_kernels._C as C
assert C.with_cuda, 'fer_kernels._C was built without its CUDA kernels'
print(json.dumps(fer_kernels.backends(), indent=1))"
}

stage_test() { run timeout "$(limit 150)" $PY -m pytest -q -p no:cacheprovider --durations=5 tests; }
stage_mish() { run timeout "$(limit 120)" $PY benchmarks/bench_mish.py --device cuda; }
stage_recalibrate() { run timeout "$(limit 180)" $PY benchmarks/bench_recalibrate.py --device cuda; }
stage_memory() { run timeout "$(limit 90)" $PY benchmarks/bench_memory.py --device cuda; }
stage_optim() { run timeout "$(limit 90)" $PY benchmarks/bench_optim.py --device cuda; }
stage_train() { run timeout "$(limit 240)" $PY benchmarks/bench_train.py --device cuda; }
# no DALI on the GPU image: the PyTorch pipeline against the torchvision baseline, on the synthetic JPEGs
# (real data sets are not carried to the GPU machine), with the machine's cores as workers
stage_pipeline() { run timeout "$(limit 120)" $PY benchmarks/bench_pipeline.py --device cuda --sets synthetic256 \
    --pipelines dali,torch,torchvision --workers "$(nproc)" --repeats 2; }

for stage in $STAGES; do
    if ! declare -F "stage_$stage" >/dev/null; then
        echo "unknown stage $stage (stages: build test mish recalibrate memory optim train pipeline)"
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

    mapfile -t WRITTEN < <(find benchmarks/results -name '*.json' -newer "$mark" | sort)
    if [ -n "${OUT:-}" ] && [ "${#WRITTEN[@]}" -gt 0 ]; then
        cp "${WRITTEN[@]}" "$OUT/"
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
