#!/usr/bin/env bash
# The test command: set-up if needed, then the default (fast, CPU-only, no downloads) suite.
# Slow real-model checks: `bash scripts/test.sh -m slow` (they fetch the offline assets first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
