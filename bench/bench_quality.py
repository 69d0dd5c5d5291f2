"""Does distillation help? Held-out CE of students trained with the project's own trainer at equal optimizer
steps and data: CE only vs KD against the cache (with and without the feature loss).

    python bench/bench_quality.py [--steps 80] [--cache caches/shakespeare_smollm2]

Student: the demo's random-init 6-layer 256-wide Llama with the SmolLM tokenizer (configs/train_shakespeare.yaml);
the cache must exist (scripts/demo.sh or cache_teacher.py). Each variant is one train_student.py process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.train import read_metrics  # noqa: E402

VARIANTS = {
    "CE only": ["loss.alpha_ce=1.0", "loss.alpha_kd=0.0", "loss.alpha_feature=0.0"],
    "KD + CE (top-256, tail bucket)": ["loss.alpha_ce=0.5", "loss.alpha_kd=0.5", "loss.alpha_feature=0.0"],
    "KD + CE + feature (2 layers)": ["loss.alpha_ce=0.5", "loss.alpha_kd=0.5", "loss.alpha_feature=0.1"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--cache", default="caches/shakespeare_smollm2")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="kd-bench-quality-"))
    rows = []
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        subprocess.run([sys.executable, str(ROOT / "train_student.py"), "--config",
                        str(ROOT / "configs/train_shakespeare.yaml"), *overrides, f"train.cache_dir={args.cache}",
                        f"train.output_dir={out}", f"train.run_name=v{i}", f"train.max_steps={args.steps}",
                        "train.checkpoint_every=0"], check=True, capture_output=True)
        final = [r for r in read_metrics(out / f"v{i}") if "eval/ce" in r][-1]
        rows.append((name, final))
    base = rows[0][1]["eval/ce"]
    print(f"\n{'target':34}{'held-out CE':>13}{'ppl':>9}{'top-1 agree':>13}{'vs CE only':>12}")
    for name, r in rows:
        print(f"{name:34}{r['eval/ce']:>13.3f}{r['eval/ppl']:>9.1f}{r['eval/top1_agreement']:>13.3f}"
              f"{r['eval/ce'] - base:>+12.3f}")
    print(f"({args.steps} optimizer steps of 4 x 2 x 256 tokens each, same data order; run dirs under {out})")


if __name__ == "__main__":
    main()
