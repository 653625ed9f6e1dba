#!/usr/bin/env bash
# Creates .venv and installs himap with its dev extras (pytest, ruff, import-linter, ...). On a machine without a
# CUDA GPU torch 2.13.0 is installed first (the version the CPU test suite runs on); with a GPU, the newest torch.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        .venv/bin/python -m pip install -q torch
    else
        .venv/bin/python -m pip install -q torch==2.13.0
    fi
fi
.venv/bin/python -m pip install -q -e ".[dev]"
echo "himap installed in .venv: activate with 'source .venv/bin/activate'"
