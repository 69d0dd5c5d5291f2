#!/usr/bin/env bash
# Cross-tokenizer distillation offline: the real Qwen2.5-Coder-0.5B-Instruct teacher (Qwen vocabulary, 151,936
# tokens) cached once over Shakespeare, then a small student with the SmolLM2 tokenizer (49,152 tokens) trained
# against that cache. About 15 minutes on 2 CPU cores (fetch ~2 min, caching ~7, training ~6).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
$PY -m kd.assets fetch smollm2-135m-instruct shakespeare qwen2.5-coder-0.5b-instruct
$PY cache_teacher.py --config configs/shakespeare_qwen.yaml
$PY -m kd.cache verify caches/shakespeare_qwen | tail -n 1
RUN=cross_tokenizer_demo-$(date +%Y%m%d-%H%M%S)
$PY train_student.py --config configs/train_cross_tokenizer.yaml train.run_name="$RUN"
$PY -m kd.report "runs/$RUN"
