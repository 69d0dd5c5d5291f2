#!/usr/bin/env bash
# One-time set-up, idempotent: a virtual environment in .venv with the CPU build of torch and the project.
# torch==2.13.0 is installed FIRST: with no torch present, a plain `torch` requirement pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import kd, torch, h5py, accelerate, transformers, pytest, gguf, tiktoken, zstandard, mkdocs, material, importlib.util as u; assert u.find_spec('deepspeed')" 2>/dev/null \
    || ! .venv/bin/ruff --version >/dev/null 2>&1 || [ ! -x .venv/bin/kd ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e ".[dev]"
fi
