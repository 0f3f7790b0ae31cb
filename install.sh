#!/usr/bin/env bash
# Installs catneuron and its test tools into ./.venv. Idempotent: a second run is quick.
# Where no NVIDIA GPU is present, the CPU build of torch goes in first, so that the
# project's `torch` requirement is already met and pip never pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1 && ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0" \
        || python -m pip install -q --index-url https://download.pytorch.org/whl/cpu torch
fi
python -m pip install -q -e '.[dev]'
