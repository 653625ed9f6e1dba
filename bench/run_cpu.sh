#!/usr/bin/env bash
# The CPU benchmark we publish: LLaVA-1.5-7B shape (random weights), decoder truncated to 9 layers (HiMAP's
# K2=8 needs a 9th), real ScienceQA layout measured with the LLaMA tokenizer when ../shared/data has it.
# float32: on CPUs without AVX-512 BF16 (like the AMD EPYC we ran on) bf16 linears run ~6x slower than fp32
# (bench/matmul_dtypes.py);
# pass DTYPE=bfloat16 on a CPU that has it. Writes bench/results/cpu-llava-1.5-7b-<layers>L-<dtype><suffix>.{json,md}.
# The defaults (7 prefill rounds, 3 of each generation block, no-cache 2 and 8 tokens) take ~1 h on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DTYPE=${DTYPE:-float32}
LAYERS=${LAYERS:-9}
REPEATS=${REPEATS:-7}
GEN_REPEATS=${GEN_REPEATS:-3}
NEW_TOKENS=${NEW_TOKENS:-1 64}
NOCACHE_TOKENS=${NOCACHE_TOKENS-2 8}   # empty: skip the (slow) no-cache generation
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
.venv/bin/himap bench --model llava-1.5-7b --layers "$LAYERS" --dtype "$DTYPE" --device cpu \
  --repeats "$REPEATS" --warmup 1 --gen-repeats "$GEN_REPEATS" --profile-repeats "${PROFILE_REPEATS:-1}" \
  --new-tokens $NEW_TOKENS --nocache-tokens $NOCACHE_TOKENS "${layout[@]}" \
  --out "$OUT.json" --markdown "$OUT.md"
{
  echo
  echo "Machine: $machine (CPU flags: ${flags:-no AVX-512}); wall time $(( $(date +%s) - start )) s;"
  echo "command: DTYPE=$DTYPE LAYERS=$LAYERS REPEATS=$REPEATS GEN_REPEATS=$GEN_REPEATS PROFILE_REPEATS=${PROFILE_REPEATS:-1} NEW_TOKENS=\"$NEW_TOKENS\" NOCACHE_TOKENS=\"$NOCACHE_TOKENS\" SUFFIX=${SUFFIX:-} bash bench/run_cpu.sh"
} >> "$OUT.md"
