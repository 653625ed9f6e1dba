#!/usr/bin/env bash
# One prepared check for a machine with a CUDA GPU (about 10 minutes on one H100/H200):
#   1. the gpu and slow test tiers (fp16 SDPA pruning == masking; a real LLaVA-1.5 checkpoint when one is cached),
#   2. `himap bench` at the full LLaVA-1.5-7B shape (32 layers) in float16, then the Qwen2.5-VL-7B shape,
# writing the tables to bench/results/gpu-<GPU name>-<preset>-float16.{json,md} (the GPU named by nvidia-smi in
# the file name and the header). Uses .venv (bash setup.sh creates it where a package index is reachable).
# Each step has its own time limit, so one slow step cannot take the whole budget.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || bash setup.sh
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
tag=$(echo "$gpu" | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//')
mkdir -p bench/results
status=0
echo "== $gpu: gpu and slow tests"
timeout 180 "$PY" -m pytest -q -m "gpu or slow" -rs tests/test_gpu.py tests/test_real_checkpoint.py || status=1

bench() {   # preset, then extra flags
  local preset=$1; shift
  local out="bench/results/gpu-${tag}-${preset}-float16"
  echo "== $gpu: himap bench --model $preset"
  timeout "${BENCH_LIMIT:-240}" "$PY" -m himap bench --model "$preset" --dtype float16 --device cuda \
    --repeats 10 --warmup 2 --gen-repeats 3 --profile-repeats 3 --new-tokens 1 64 --nocache-tokens 1 16 "$@" \
    --out "$out.json" --markdown "$out.md" || { status=1; return; }
  printf '\nGPU: %s (nvidia-smi); driver %s; command: bash bench/gpu_check.sh\n' "$gpu" \
    "$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)" >> "$out.md"
}
bench llava-1.5-7b
bench qwen2.5-vl-7b
exit $status
