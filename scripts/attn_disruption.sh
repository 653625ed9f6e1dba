#!/usr/bin/env bash
# Attention disruption: block img2img / img2txt / img2rnd and measure label and score consistency on the
# vanilla-correct questions, swept over the first blocked layer, as the original src/HiMAP/validate/attn_disruption.sh
# (which runs one flow and one layer per call).
#
#   bash scripts/attn_disruption.sh                  # the embedded demo (the trained organism, the questions it answers right)
#   MODEL_PATH=llava-hf/llava-1.5-13b-hf DATA_DIR=data/scienceqa bash scripts/attn_disruption.sh
#   ... bash scripts/attn_disruption.sh --isolate-modality img2txt --isolate-layer 5   # one run of the original
#
# NOTE: the original edits a mask shared by all later layers in place, so --isolate-layer k blocks layers k..LAST.
# That is the default here; pass --isolate-window 1 to block one layer at a time.
# DATA_DIR holds himap-inference-MCQ-VC-13B.json (VC_FILE to change it) and images/test. OUT_DIR (default
# runs/disrupt/<model>). Extra arguments go to `himap disrupt` (e.g. --limit 50 --layers 0,5,10). Re-running resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

if [ -z "${MODEL_PATH:-}" ]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # a model this small gains nothing from intra-op threads
    source_args=()
    out_dir=${OUT_DIR:-runs/disrupt/demo}
else
    : "${DATA_DIR:?set DATA_DIR to the folder holding the VC question file and images/test}"
    source_args=(--model-path "$MODEL_PATH" --question-file "$DATA_DIR/${VC_FILE:-himap-inference-MCQ-VC-13B.json}"
                 --image-folder "$DATA_DIR/images/test")
    out_dir=${OUT_DIR:-runs/disrupt/$(basename "$MODEL_PATH")}
fi

"$PY" -m himap disrupt "${source_args[@]}" --single-pred-prompt --conv-mode vicuna_v1 --max-new-tokens 8 \
    --output-dir "$out_dir" "$@"
