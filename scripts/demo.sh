#!/usr/bin/env bash
# The main job on the embedded default, offline: set-up, fetch the real assets (SmolLM2-135M-Instruct teacher,
# Shakespeare), cache the teacher once, verify the cache, train a small student against it, draw the curves.
# About 10 minutes on 2 CPU cores. Re-running reuses the cache (complete shards are skipped) and starts a new run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
KD=.venv/bin/kd   # the installed command (kd --help); from a clone, cache_teacher.py and train_student.py run the same
$KD assets fetch smollm2-135m-instruct shakespeare
$KD cache --config shakespeare_smollm2
$KD verify caches/shakespeare_smollm2 | tail -n 1
RUN=shakespeare_demo-$(date +%Y%m%d-%H%M%S)
$KD train --config train_shakespeare train.run_name="$RUN"
$KD report "runs/$RUN"
$PY - "$RUN" <<'PYEOF'
import json, sys
evals = [r for r in map(json.loads, open(f"runs/{sys.argv[1]}/metrics.jsonl")) if "eval/ce" in r]
print(f"eval/ppl: {evals[0]['eval/ppl']:.0f} (untrained) -> {evals[-1]['eval/ppl']:.1f} after {evals[-1]['step']} steps "
      f"(vocabulary 49,152); curves in runs/{sys.argv[1]}/report.png")
PYEOF
