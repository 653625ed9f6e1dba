#!/usr/bin/env bash
# ScienceQA, vanilla vs HiMAP, as the original src/HiMAP/inference/eval_scivqa.sh runs it.
#
#   bash scripts/eval_scivqa.sh                     # the embedded demo: the tiny trained organism, synthetic questions, CPU
#   MODEL_PATH=llava-hf/llava-1.5-13b-hf DATA_DIR=data/scienceqa bash scripts/eval_scivqa.sh
#                                                   # the paper's setting: K1=2 R1=288 K2=8 R2=72
#
# DATA_DIR holds himap-inference-MCQ.json and images/test/<id>/image.png (make it with `himap data scienceqa`).
# POLICIES (default "none himap") picks the runs: none, himap, fastv, random. OUT_DIR (default runs/scivqa).
# Extra arguments go to every `himap eval` (e.g. --limit 100 --batch-size 8 --num-chunks 4 --chunk-idx 0).
# Re-running resumes: finished questions are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
POLICIES=${POLICIES:-none himap}
OUT_DIR=${OUT_DIR:-runs/scivqa}

if [ -z "${MODEL_PATH:-}" ]; then
    # a 128-wide model gains nothing from intra-op threads, and they stall badly on a busy machine
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    common=(--single-pred-prompt --conv-mode vicuna_v1)
    run_dir="$OUT_DIR/demo"
    "$PY" -m himap demo
else
    : "${DATA_DIR:?set DATA_DIR to the folder holding himap-inference-MCQ.json and images/test}"
    common=(--model-path "$MODEL_PATH" --question-file "$DATA_DIR/himap-inference-MCQ.json"
            --image-folder "$DATA_DIR/images/test" --single-pred-prompt --conv-mode vicuna_v1)
    run_dir="$OUT_DIR/$(basename "$MODEL_PATH")"
fi

dirs=()
for policy in $POLICIES; do
    case "$policy" in
        none)   flags=() ;;
        himap)  flags=(--use-hmap-v)
                # the shipped LLaVA-1.5-13B setting; the demo takes the same ratios scaled to its size
                [ -n "${MODEL_PATH:-}" ] && flags+=(--sys-length 35 --img-length 576
                    --hmap-v-attn-txt-layer 2 --hmap-v-attn-img-layer 8
                    --hmap-v-attn-txt-rank 288 --hmap-v-attn-img-rank 72) ;;
        fastv|random) flags=(--policy "$policy") ;;
        *) echo "unknown policy '$policy' in POLICIES" >&2; exit 2 ;;
    esac
    name=$([ "$policy" = none ] && echo vanilla || echo "$policy")
    echo "== $name" >&2
    "$PY" -m himap eval "${common[@]}" "${flags[@]}" --output-dir "$run_dir/$name" "$@"
    dirs+=("$run_dir/$name")
done
echo
"$PY" -m himap table "${dirs[@]}"
[ -n "${MODEL_PATH:-}" ] || echo "(the demo model is the tiny organism trained on synthetic questions" \
    "(output_example/organism.md); the run shows accuracy, the kept image tokens, the FLOPs ratios and the prefill time)"
