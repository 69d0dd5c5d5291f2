#!/usr/bin/env bash
# Behaviour unchanged between two git revisions: the demo config (configs/shakespeare_smollm2.yaml, then
# configs/train_shakespeare.yaml) cached and trained at each revision from a `git worktree` snapshot, at the same
# seeds, then compared by bench/equivalence.py (every decoded field of every cached sequence; every numeric field of
# metrics.jsonl but timings, and final/ weights). About 10 minutes per revision on 2 CPU cores (run it at nice -n 19).
#
#     bash bench/equivalence.sh REV_A REV_B        # e.g. 16424de HEAD
#     bash bench/equivalence.sh --only REV         # run one revision (its outputs are reused by a later comparison)
#
# Outputs: bench/out/equivalence/<commit>/{cache,runs/demo}; a revision whose outputs exist is not run again.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
OUT=$ROOT/bench/out/equivalence
mkdir -p "$OUT"

run_rev() {  # $1: a git revision -> bench/out/equivalence/<commit>
  local sha dir tree
  sha=$(git rev-parse --short=12 "$1^{commit}")
  dir=$OUT/$sha
  if [ -f "$dir/runs/demo/final/kd_meta.json" ]; then echo "$dir"; return; fi
  tree=$(mktemp -d /tmp/kd-equivalence-XXXX)
  git worktree add -q --detach "$tree" "$sha" >&2
  rm -rf "$dir"; mkdir -p "$dir"
  # the script's own directory comes first on sys.path, so `import kd` is that revision's kd
  (cd "$tree" && "$PY" cache_teacher.py --config configs/shakespeare_smollm2.yaml cache.output_dir="$dir/cache" \
    && "$PY" train_student.py --config configs/train_shakespeare.yaml train.cache_dir="$dir/cache" \
       train.output_dir="$dir/runs" train.run_name=demo) > "$dir/log.txt" 2>&1 \
    || { echo "revision $sha failed: see $dir/log.txt" >&2; git worktree remove --force "$tree"; exit 1; }
  git worktree remove --force "$tree"
  echo "$dir"
}

if [ "${1:-}" = "--only" ]; then run_rev "$2"; exit 0; fi
A=$(run_rev "$1")
B=$(run_rev "$2")
status=0
"$PY" bench/equivalence.py caches "$A/cache" "$B/cache" || status=1
"$PY" bench/equivalence.py runs "$A/runs/demo" "$B/runs/demo" || status=1
exit $status
