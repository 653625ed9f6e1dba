#!/usr/bin/env bash
# Attention x gradient saliency of system / image / instruction tokens per layer, and the paper's two figures
# (token importance, intra-visual vs visual-textual flow), as the original src/HiMAP/analysis/saliency_scivqa.sh.
#
#   bash scripts/saliency_scivqa.sh                  # the embedded demo: the tiny trained organism, synthetic questions, CPU
#   MODEL_PATH=llava-hf/llava-1.5-7b-hf DATA_DIR=data/scienceqa bash scripts/saliency_scivqa.sh
#
# DATA_DIR holds himap-inference-MCQ.json and images/test/<id>/image.png. FORM: attn_grad (|A*dL/dA|, the paper,
# default) or original (A^2*|dL/dA|, what the released code computes). OUT_DIR (default runs/saliency/<model>).
# Extra arguments go to `himap saliency` (e.g. --limit 100 --dtype float16). Re-running resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
FORM=${FORM:-attn_grad}

if [ -z "${MODEL_PATH:-}" ]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # a 128-wide model gains nothing from intra-op threads
    source_args=()
    out_dir=${OUT_DIR:-runs/saliency/demo}
else
    : "${DATA_DIR:?set DATA_DIR to the folder holding himap-inference-MCQ.json and images/test}"
    source_args=(--model-path "$MODEL_PATH" --question-file "$DATA_DIR/himap-inference-MCQ.json"
                 --image-folder "$DATA_DIR/images/test")
    out_dir=${OUT_DIR:-runs/saliency/$(basename "$MODEL_PATH")}
fi

"$PY" -m himap saliency "${source_args[@]}" --single-pred-prompt --conv-mode vicuna_v1 --form "$FORM" \
    --output-dir "$out_dir" "$@"
