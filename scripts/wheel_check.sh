#!/usr/bin/env bash
# The package as a user installs it: build kd's wheel, install it (not editable) into a virtual environment of its
# own, and from a directory outside the clone run `--help` of every entry point and a tiny cache + train pass (a
# random tiny teacher built from a config, seconds). Part of the README's test command (scripts/test.sh), so CI
# catches a wheel that misses a package, a config or an entry point.
# The environment is kept in .wheel-venv (dependencies installed once, the wheel reinstalled on every run).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
VENV=$REPO/.wheel-venv
quietly() { "$@" >"$WORK/log" 2>&1 || { cat "$WORK/log" >&2; echo "wheel check failed: $*" >&2; exit 1; }; }
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

rm -rf build  # a stale build/lib would put deleted modules into the wheel
.venv/bin/python -m pip wheel --quiet --no-deps --no-build-isolation -w "$WORK/dist" . 2>/dev/null
rm -rf build kd.egg-info  # setuptools' build leftovers in the clone
WHEEL=$(ls "$WORK"/dist/kd-*.whl)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  quiet_pip install --quiet "torch==2.13.0"  # the CPU build first, as the README's install says
fi
quiet_pip install --quiet --force-reinstall --no-deps "$WHEEL"
quiet_pip install --quiet "$WHEEL"  # its dependencies, from its own metadata
quiet_pip check >/dev/null

cd "$WORK"  # outside the clone: only the installed package can be found
KD=$VENV/bin/kd
"$VENV/bin/python" - "$REPO" <<'PYEOF'
import sys
from pathlib import Path
import kd
assert not Path(kd.__file__).resolve().is_relative_to(Path(sys.argv[1]) / "kd"), f"kd imported from the clone: {kd.__file__}"
PYEOF
"$KD" --help >/dev/null
"$KD" train --help >/dev/null
"$VENV/bin/python" -m kd cache --help >/dev/null
# every other command's --help in one process (each alone would load torch again: seconds apiece)
quietly "$VENV/bin/python" - <<'PYEOF'
from kd.cli import COMMANDS, main
for name in COMMANDS:
    try:
        main([name, "--help"])
    except SystemExit as e:
        assert e.code in (0, None), f"kd {name} --help exited {e.code}"
    else:
        raise AssertionError(f"kd {name} --help did not exit")
PYEOF
"$VENV/bin/accelerate" launch --help >/dev/null
test -f "$("$KD" configs accelerate/fsdp2)"

# a tiny random teacher with a tokenizer trained on the corpus, then the two passes by shipped config name
quietly "$VENV/bin/python" "$REPO/scripts/tiny_teacher.py" "$WORK"
quietly "$KD" cache --config shakespeare_smollm2 teacher.model="$WORK/teacher" teacher.batch_size=4 \
  "data.files=[$WORK/corpus/*.txt]" "data.eval_files=[$WORK/corpus/heldout/*.txt]" data.seq_len=32 \
  data.max_train_sequences=32 data.max_eval_sequences=8 cache.output_dir="$WORK/cache" cache.top_k=16 \
  cache.hidden_layers="[1, 2]" cache.hidden_codec=fp16 cache.id_codec=plain cache.sample_n=8
"$KD" verify "$WORK/cache" | tail -n 1
quietly "$VENV/bin/accelerate" launch --cpu --num_processes 1 -m kd train --config train_shakespeare \
  train.cache_dir="$WORK/cache" student.config.num_hidden_layers=2 student.config.hidden_size=32 \
  student.config.intermediate_size=64 loss.feature_layers="[[1, 1], [2, 2]]" train.max_steps=4 train.eval_every=2 \
  train.output_dir="$WORK/runs" train.run_name=wheel
test -f "$WORK/runs/wheel/final/config.json"
echo "wheel check ok: $(basename "$WHEEL") installed in $VENV; every command's --help, kd cache + kd train from $WORK"
