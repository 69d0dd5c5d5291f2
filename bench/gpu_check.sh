#!/usr/bin/env bash
# What only a GPU machine can show: train_student.py end to end under `accelerate launch` on one GPU, 2-process DDP,
# FSDP2, DeepSpeed ZeRO-2 and ZeRO-3, over the same data and steps; their logged losses compared step by step with the
# one-GPU run (GA doubled there, so every optimizer window holds the same sequences), the resumed run against the
# uninterrupted one, and the saved student loaded in transformers. Then, with fp16 and the gradient scaler, peak
# GPU memory and tokens/s of each.
#
#   bash bench/gpu_check.sh CACHE [STEPS]          # CACHE: a kd cache whose teacher tokenizer is on this machine
#
# e.g. `bash bench/gpu_check.sh caches/shakespeare_smollm2 20` after scripts/demo.sh's caching step. Needs 2 GPUs
# for the 2-process rows (they are skipped, saying so, on one) and `pip install -e ".[deepspeed]"`. Prints one
# table; the README's "Back-ends of the trainer" takes its figures with the device named.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${1:?usage: bash bench/gpu_check.sh CACHE [STEPS]}
STEPS=${2:-20}
PY=${PY:-python}
OUT=$(mktemp -d /tmp/kd-gpu-check-XXXX)
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
[ "$GPUS" -ge 1 ] || { echo "error: no CUDA device; this check needs a GPU" >&2; exit 2; }
COMMON=(--config configs/train_shakespeare.yaml "train.cache_dir=$CACHE" "train.output_dir=$OUT"
  "train.max_steps=$STEPS" "train.eval_every=$STEPS" "train.micro_batch_size=2" "train.num_workers=0"
  "loss.alpha_feature=0.0" "train.eval_generations=0")

run() {  # name, launch args..., -- , train overrides...
  local name=$1; shift
  local launch=()
  while [ "$1" != "--" ]; do launch+=("$1"); shift; done; shift
  echo "[gpu_check] $name" >&2
  accelerate launch "${launch[@]}" train_student.py "${COMMON[@]}" "train.run_name=$name" "$@" \
    > "$OUT/$name.log" 2>&1 || { echo "[gpu_check] $name failed: $OUT/$name.log" >&2; tail -5 "$OUT/$name.log" >&2; }
}

# precision no: the comparisons are exact up to reduction order; fp16: the memory and throughput rows
run one --num_processes 1 -- train.gradient_accumulation_steps=4 train.checkpoint_every=$((STEPS / 2))
if [ "$GPUS" -ge 2 ]; then
  run ddp --config_file configs/accelerate/ddp.yaml --num_processes 2 -- train.gradient_accumulation_steps=2
  run fsdp2 --config_file configs/accelerate/fsdp2.yaml --num_processes 2 -- train.gradient_accumulation_steps=2
  run zero2 --config_file configs/accelerate/zero2.yaml --num_processes 2 -- train.gradient_accumulation_steps=2
  run zero3 --config_file configs/accelerate/zero3.yaml --num_processes 2 -- train.gradient_accumulation_steps=2 \
    train.checkpoint_every=$((STEPS / 2))
  # resume: the zero3 run killed (SIGKILL, every process) as step STEPS/2+1 starts, just after its checkpoint of
  # step STEPS/2, then resumed; its losses must equal the uninterrupted zero3 run's
  echo "[gpu_check] zero3_resumed (killed after step $((STEPS / 2)), then resumed)" >&2
  accelerate launch --config_file configs/accelerate/zero3.yaml --num_processes 2 bench/killed_at.py $((STEPS / 2)) \
    train_student.py "${COMMON[@]}" train.run_name=zero3_resumed train.gradient_accumulation_steps=2 \
    train.checkpoint_every=$((STEPS / 2)) > "$OUT/zero3_killed.log" 2>&1 || true
  run zero3_resumed --config_file configs/accelerate/zero3.yaml --num_processes 2 -- \
    train.gradient_accumulation_steps=2 train.checkpoint_every=$((STEPS / 2)) train.resume=true
else
  echo "[gpu_check] one GPU: the 2-process DDP / ZeRO rows are skipped" >&2
fi
run one_fp16 --num_processes 1 -- train.gradient_accumulation_steps=16 train.mixed_precision=fp16
if [ "$GPUS" -ge 2 ]; then
  run zero2_fp16 --config_file configs/accelerate/zero2.yaml --num_processes 2 -- \
    train.gradient_accumulation_steps=8 train.mixed_precision=fp16
  run fsdp2_fp16 --config_file configs/accelerate/fsdp2.yaml --num_processes 2 -- \
    train.gradient_accumulation_steps=8 train.mixed_precision=fp16
fi

$PY - "$OUT" "$STEPS" <<'EOF'
import sys
from pathlib import Path

import torch

from kd.train import read_metrics

out, steps = Path(sys.argv[1]), int(sys.argv[2])
print(f"device: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}; {steps} steps; runs in {out}")


def losses(name):
    d = out / name
    return [r["loss"] for r in read_metrics(d) if "loss" in r] if (d / "metrics.jsonl").exists() else None


ref = losses("one")
a, b = losses("zero3_resumed"), losses("zero3")
print(f"zero3 killed after step {steps // 2} and resumed vs uninterrupted: ", end="")
print(f"max |loss diff| {max(abs(x - y) for x, y in zip(a, b)):.2e} over {len(a)} steps" if a and b else "not run")
print(f"{'run':<16}{'max |loss - one GPU|':>22}{'rel':>10}{'peak MB':>10}{'tok/s':>10}  saved student loads")
for name in ("one", "ddp", "fsdp2", "zero2", "zero3", "zero3_resumed", "one_fp16", "zero2_fp16", "fsdp2_fp16"):
    got = losses(name)
    if got is None:
        print(f"{name:<16}{'(not run or failed: see ' + name + '.log)':>40}")
        continue
    recs = [r for r in read_metrics(out / name) if "loss" in r]
    diff = max(abs(a - b) for a, b in zip(got, ref)) if ref and not name.endswith("fp16") else float("nan")
    rel = diff / max(abs(x) for x in ref) if ref else float("nan")
    peak = max(r.get("peak_mem_mb") or 0 for r in recs)
    tps = sorted(r["tokens_per_s"] for r in recs[1:])[len(recs[1:]) // 2] if len(recs) > 1 else float("nan")
    try:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out / name / "final")
        loads = "yes"
    except Exception as e:  # the figure to report, not a crash of the check
        loads = f"no ({type(e).__name__})"
    print(f"{name:<16}{diff:>22.2e}{rel:>10.1e}{peak:>10.0f}{tps:>10.0f}  {loads}")
EOF
