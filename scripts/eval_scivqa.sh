#!/usr/bin/env bash
# ScienceQA: vanilla, HiMAP, FastV and random pruning at one matched budget, as the original
# src/HiMAP/inference/eval_scivqa.sh runs vanilla and HiMAP.
#
#   bash scripts/eval_scivqa.sh                     # the embedded demo: the trained organism, synthetic questions, CPU
#   MODEL_PATH=path/to/llava-1.5-13b-hf DATA_DIR=data/scienceqa bash scripts/eval_scivqa.sh
#                                                   # the paper's setting: HiMAP K1=2 R1=288 K2=8 R2=72
#
# Matched budget: every pruned run keeps the same average number of image tokens per decoder layer,
# T = sum_i (L_i - L_{i-1}) * T_i / L (docs/budgets.md), solved by `himap budget`. TOKENS sets T; by default it is
# what the paper's HiMAP setting keeps on the model (144 of 576 on LLaVA-1.5, where HiMAP runs exactly 2/288/8/72).
# MODEL_PATH must then be a local folder or config (BUDGET_MODEL=llava-1.5-13b names a preset instead).
# DATA_DIR holds himap-inference-MCQ.json and images/test/<id>/image.png (make it with `himap data scienceqa`).
# POLICIES (default "none himap fastv random"; any method `himap budget` matches, e.g. "none himap dart divprune"),
# OUT_DIR (default runs/scivqa).
# Extra arguments go to every `himap eval` (e.g. --limit 100 --batch-size 8 --num-chunks 4 --chunk-idx 0).
# Re-running resumes: finished questions are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
POLICIES=${POLICIES:-none himap fastv random}
OUT_DIR=${OUT_DIR:-runs/scivqa}

if [ -z "${MODEL_PATH:-}" ]; then
    # a model this small gains nothing from intra-op threads, and they stall badly on a busy machine
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    common=(--single-pred-prompt --conv-mode vicuna_v1 --max-new-tokens 4)
    budget_model=()
    run_dir="$OUT_DIR/demo"
    "$PY" -m himap demo >&2
else
    : "${DATA_DIR:?set DATA_DIR to the folder holding himap-inference-MCQ.json and images/test}"
    common=(--model-path "$MODEL_PATH" --question-file "$DATA_DIR/himap-inference-MCQ.json"
            --image-folder "$DATA_DIR/images/test" --single-pred-prompt --conv-mode vicuna_v1)
    budget_model=(--model-path "${BUDGET_MODEL:-$MODEL_PATH}")
    run_dir="$OUT_DIR/$(basename "$MODEL_PATH")"
fi
target=()
[ -n "${TOKENS:-}" ] && target=(--tokens "$TOKENS")
"$PY" -m himap budget "${budget_model[@]}" "${target[@]}"

dirs=()
for policy in $POLICIES; do
    case "$policy" in
        none)   flags=(--policy none) ;;
        *)      given=$("$PY" -m himap budget "${budget_model[@]}" "${target[@]}" --eval-flags "$policy") || exit 2
                read -r -a flags <<< "$given" ;;
    esac
    name=$([ "$policy" = none ] && echo vanilla || echo "$policy")
    echo "== $name ${flags[*]}" >&2
    "$PY" -m himap eval "${common[@]}" "${flags[@]}" --output-dir "$run_dir/$name" "$@" >&2
    dirs+=("$run_dir/$name")
done
echo
"$PY" -m himap table "${dirs[@]}"
[ -n "${MODEL_PATH:-}" ] || echo "(the demo model is the tiny organism trained on synthetic questions" \
    "(output_example/organism.md); every pruned run keeps the same average image tokens per layer, shown as" \
    "'img work kept')"
