#!/usr/bin/env bash
# The CPU benchmark we publish: LLaVA-1.5-7B shape (random weights), decoder truncated to 9 layers (HiMAP's
# K2=8 needs a 9th), real ScienceQA layout measured with the LLaMA tokenizer when ../shared/data has it.
# float32: on CPUs without AVX-512 BF16 (like the AMD EPYC we ran on) bf16 matmuls are ~7x slower than fp32;
# pass DTYPE=bfloat16 on a CPU that has it. Writes bench/results/cpu-<dtype>.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
DTYPE=${DTYPE:-float32}
LAYERS=${LAYERS:-9}
OUT=bench/results/cpu-llava-1.5-7b-${LAYERS}L-${DTYPE}${SUFFIX:-}
layout=()
if [[ -f ../shared/data/tokenizers/llama-spm.gguf ]]; then
  layout+=(--tokenizer ../shared/data/tokenizers/llama-spm.gguf)
  [[ -f ../shared/data/scienceqa/himap-inference-MCQ.json ]] && \
    layout+=(--questions ../shared/data/scienceqa/himap-inference-MCQ.json)
fi
machine="$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM"
flags=$( (grep -o -w -E 'avx512f|avx512_bf16|amx_bf16' /proc/cpuinfo || true) | sort -u | tr '\n' ' ')
start=$(date +%s)
.venv/bin/himap bench --preset llava-1.5-7b --layers "$LAYERS" --dtype "$DTYPE" --device cpu \
  --repeats "${REPEATS:-7}" --warmup 1 --gen-repeats "${GEN_REPEATS:-1}" \
  --new-tokens 1 64 --nocache-tokens "${NOCACHE_TOKENS:-2}" "${layout[@]}" \
  --out "$OUT.json" --markdown "$OUT.md"
{
  echo
  echo "Machine: $machine (CPU flags: ${flags:-no AVX-512}); wall time $(( $(date +%s) - start )) s;"
  echo "command: DTYPE=$DTYPE LAYERS=$LAYERS REPEATS=${REPEATS:-7} GEN_REPEATS=${GEN_REPEATS:-1} NOCACHE_TOKENS=${NOCACHE_TOKENS:-2} SUFFIX=${SUFFIX:-} bash bench/run_cpu.sh"
} >> "$OUT.md"
