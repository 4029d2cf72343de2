#!/usr/bin/env bash
# Every GPU figure of the README's Speed section in one run, for a session with a GPU (device time is short:
# each step has its own time limit, so one that hangs does not eat the others'). From the repository root:
#
#     bash benchmarks/gpu_session.sh [OUT_DIR] [OFFICIAL_CHECKOUT DINOV3_CLONE]
#
# Prints each step's output and writes it to OUT_DIR/<step>.txt (default: $OUT, else ./gpu_session). The
# official comparison runs only when both clones are given (see benchmarks/bench_official.py).
set -u
out=${1:-${OUT:-gpu_session}}
official=${2:-}
dinov3=${3:-}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    echo "=== $name: exit ${PIPESTATUS[0]}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
# golden parity on the GPU, the tile step eager (and compiled unless SKIP_COMPILE=1), copies, confusion matrix
step gpu_check 240 "$python" benchmarks/gpu_check.py ${SKIP_COMPILE:+--skip-compile}
# plumbing (null encoders) against full-size random models: scene, eval in memory, eval from files
step pipeline 150 "$python" benchmarks/bench_pipeline.py --device cuda --models null full-random \
    --paths scene eval eval-files --size 8000
# the whole-scene path with full-size random models, read, stitch and COG write included
step scene 120 "$python" benchmarks/bench_scene.py --device cuda --models full-random --sizes 5000 --batch-size 32
if [ -n "$official" ] && [ -n "$dinov3" ]; then
    step official 150 "$python" benchmarks/bench_official.py --official "$official" --dinov3-repo "$dinov3" \
        --device cuda --tiles 50 --repeat 5
fi
