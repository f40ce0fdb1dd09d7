#!/usr/bin/env bash
# `make bench-gpu`: on an NVIDIA machine with the [gpu] extra, SD 1.5-shaped random weights at 512x512:
# TensorRT engines (dynamic and static profiles), `make test-gpu`, and benchmark rows for onnxruntime-cuda,
# onnxruntime-tensorrt and tensorrt beside diffusers/PyTorch on CUDA (25 and 50 steps) in
# benchmarks/results/<device key>.jsonl. The steps and their budget: benchmarks/gpu_plan.py. Arguments go
# to each step, e.g. tools/bench_gpu.sh --steps 25 --runs 5 (see .venv/bin/python -m sdrt.benchmarks.gpu_plan -h).
set -euo pipefail
PY=${PY:-.venv/bin/python}
MAKE=${MAKE:-make}
LOG=build/bench-gpu/test-gpu.log
plan() { "$PY" -m sdrt.benchmarks.gpu_plan "$@"; }
step() { echo "== bench-gpu: $1 ($((SECONDS / 60)) min $((SECONDS % 60)) s so far)"; }

step check
plan check "$@" # stops here, with the reason, without an NVIDIA GPU stack or over the time budget

step "test-gpu (in the background, log in $LOG), sd15-random, export"
mkdir -p "$(dirname "$LOG")"
"$MAKE" --no-print-directory test-gpu >"$LOG" 2>&1 &
tests=$!
trap 'wait' EXIT # nothing of ours outlives the script
"$MAKE" --no-print-directory sd15-random
plan export "$@"
wait "$tests" || { tail -n 30 "$LOG"; echo "bench-gpu: make test-gpu failed (log: $LOG)"; exit 1; }
tail -n 1 "$LOG"

step "engines" # after test-gpu: TensorRT times its kernels on an otherwise idle GPU
plan engines "$@"
step "bench"
plan bench "$@"
step "done"
