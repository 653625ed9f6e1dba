#!/usr/bin/env bash
# Creates .venv-lmms: himap with the lmms-eval plugin extra (".[dev,lmms]"), in a venv of its own so that the
# core .venv stays small. lmms-eval needs torchvision, and PyPI's torchvision does not import beside the CPU
# torch wheel of .venv ("operator torchvision::nms does not exist"), so this venv takes a matched pair instead
# (default torch==2.14.1 torchvision==0.29.1: a CUDA build that also runs on CPU, ~7 GB; override with
# TORCH_PAIR="torch==X torchvision==Y"). Then: .venv-lmms/bin/python -m pytest -q tests/lmms
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LMMS_VENV:-.venv-lmms}
read -r -a PAIR <<< "${TORCH_PAIR:-torch==2.14.1 torchvision==0.29.1}"
start=$(date +%s)
[ -d "$VENV" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "${PAIR[@]}" -e ".[dev,lmms]"
"$VENV/bin/python" -c "import torchvision, lmms_eval.models as m; from himap.integrations import LMMS_EVAL_MODELS as h; [m.get_model(n) for n in h]"
echo "lmms-eval plugin installed in $VENV in $(( $(date +%s) - start )) s: $VENV/bin/lmms-eval --model himap_llava|himap_qwen2_vl|himap_qwen2_5_vl|himap_qwen3_vl|himap_internvl|himap_gemma3|himap_mistral3 ..."
