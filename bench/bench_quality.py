"""Does distillation help, and how much of the full teacher does each cached target keep? Held-out CE of students
trained with the project's own trainer at equal optimizer steps and data.

    python bench/bench_quality.py [--steps 80] [--cache caches/shakespeare_smollm2]              # suite "kd"
    python bench/bench_quality.py --suite targets --cache caches/shakespeare_smollm2            # needs sample_n > 0
    python bench/bench_quality.py --suite cross                  # Qwen-vocabulary teacher -> SmolLM2-tokenizer student
    python bench/bench_quality.py --suite kinds --seeds 0,1      # every divergence kind, two data-order seeds
    python bench/bench_quality.py --suite chat                   # the chat set: loss on the assistant's tokens
    python bench/bench_quality.py --suite chat_cross             # the chat set, a Qwen-tokenizer student

Suite kd: CE only vs KD against the cache, with and without the feature loss. Suite targets: CE only vs KD
(alpha 0.5 KD + 0.5 CE, no feature loss) against each target: cached top-256 with either tail policy, cached
sampled targets, and the full vocabulary with the teacher online; the last column is the share of the full-KD
gain over CE only that each target recovers. Suite cross: the Qwen2.5-Coder-0.5B cache (configs/shakespeare_qwen.yaml)
and a student with the SmolLM2 tokenizer (configs/train_cross_tokenizer.yaml): CE only vs each cross-tokenizer KD
loss, with the alignment and mapping figures the trainer logs. Suite kinds: CE only vs 0.5 CE + 0.5 of each
divergence kind (kd/losses/divergences.py) against the cached top-256 with the tail bucket, T = 1, no feature loss.
Suite chat: the Shakespeare chat cache (configs/shakespeare_chat_smollm2.yaml): CE only vs KD + CE against sampled
and top-256 targets, every loss and the held-out CE on the assistant's tokens only. Suite chat_cross: the same
cache (written with cache.store_text: true) and a student with the Qwen tokenizer (configs/train_chat_cross_
tokenizer.yaml): CE only vs mapped KD + CE, aligned on the messages.
`--seeds` (default 0,1,2) runs every variant once per `train.seed` (student init and data order) and prints the mean
and standard deviation of its held-out CE, each seed's CE, its bits per character, and marks with ~ a difference to
CE only that is smaller than twice its standard error (within noise).

Student: the demo's random-init 6-layer 256-wide Llama with the SmolLM tokenizer (configs/train_shakespeare.yaml),
or `--student DIR`, a real model folder (a pretrained model, or one cut from the teacher by `python -m kd.prune`;
bench/bench_prune.py runs that comparison end to end); the cache must exist (scripts/demo.sh or cache_teacher.py).
Each variant is one train_student.py process.
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

KD = ["loss.alpha_ce=0.5", "loss.alpha_kd=0.5", "loss.alpha_feature=0.0"]
# a term list replaces the config's alpha_* fields, which must then be unset
TERMS = ["loss.alpha_ce=null", "loss.alpha_kd=null", "loss.alpha_feature=null"]
SUITES = {
    "kd": {
        "CE only": ["loss.alpha_ce=1.0", "loss.alpha_kd=0.0", "loss.alpha_feature=0.0"],
        "KD + CE (top-256, tail bucket)": KD + ["loss.target=topk"],
        "KD + CE + feature (2 layers)": [
            "loss.alpha_ce=0.5",
            "loss.alpha_kd=0.5",
            "loss.alpha_feature=0.1",
            "loss.target=topk",
        ],
    },
    "targets": {
        "CE only": ["loss.alpha_ce=1.0", "loss.alpha_kd=0.0", "loss.alpha_feature=0.0"],
        "top-256 + tail bucket": KD + ["loss.target=topk", "loss.tail=bucket"],
        "top-256 renormalized": KD + ["loss.target=topk", "loss.tail=renormalize"],
        "sampled (n=50)": KD + ["loss.target=sampled"],
        "full vocabulary, teacher online": KD + ["loss.target=online"],
    },
    "kinds": {
        "CE only": ["loss.alpha_ce=1.0", "loss.alpha_kd=0.0", "loss.alpha_feature=0.0"],
        **{
            name: TERMS + [f"loss.terms=[{{kind: ce, weight: 0.5}}, {kd}]", "loss.target=topk", "loss.tail=bucket"]
            for name, kd in [
                ("forward_kl", "{kind: forward_kl, weight: 0.5}"),
                ("reverse_kl", "{kind: reverse_kl, weight: 0.5}"),
                ("jsd beta=0.5", "{kind: jsd, beta: 0.5, weight: 0.5}"),
                ("tvd", "{kind: tvd, weight: 0.5}"),
                ("skew_kl alpha=0.1", "{kind: skew_kl, alpha: 0.1, weight: 0.5}"),
                ("skew_reverse_kl alpha=0.1", "{kind: skew_reverse_kl, alpha: 0.1, weight: 0.5}"),
                ("symmetric (fwd + rev KL)", "{kind: forward_kl, weight: 0.25}, {kind: reverse_kl, weight: 0.25}"),
            ]
        },
    },
    "cross": {
        # CE only still reads the cache through the alignment (the student's own tokens); KD has weight 0
        "CE only": ["loss.alpha_ce=1.0", "loss.alpha_kd=0.0", "loss.cross_tokenizer=mapped"],
        "mapped KD + CE (tail bucket)": ["loss.cross_tokenizer=mapped"],
        "ULD + CE": ["loss.cross_tokenizer=uld"],
        "hybrid (mapped + 1.0 x ULD) + CE": ["loss.cross_tokenizer=hybrid", "loss.uld_weight=1.0"],
        "hybrid (mapped + 0.1 x ULD) + CE": ["loss.cross_tokenizer=hybrid", "loss.uld_weight=0.1"],
    },
    "chat": {  # the loss and eval on the assistant's tokens only (configs/train_shakespeare_chat.yaml)
        "CE only": ["loss.alpha_ce=1.0", "loss.alpha_kd=0.0"],
        "KD + CE (sampled n=50)": ["loss.target=sampled"],
        "KD + CE (top-256, tail bucket)": ["loss.target=topk", "loss.tail=bucket"],
    },
    "chat_cross": {  # a Qwen-tokenizer student on the SmolLM2 chat cache (configs/train_chat_cross_tokenizer.yaml)
        "CE only": ["loss.alpha_ce=1.0", "loss.alpha_kd=0.0"],
        "mapped KD + CE (tail bucket)": [],
    },
}
CONFIGS = {
    "kd": "configs/train_shakespeare.yaml",
    "targets": "configs/train_shakespeare.yaml",
    "kinds": "configs/train_shakespeare.yaml",
    "cross": "configs/train_cross_tokenizer.yaml",
    "chat": "configs/train_shakespeare_chat.yaml",
    "chat_cross": "configs/train_chat_cross_tokenizer.yaml",
}
CACHES = {
    "kd": "caches/shakespeare_smollm2",
    "targets": "caches/shakespeare_smollm2",
    "kinds": "caches/shakespeare_smollm2",
    "cross": "caches/shakespeare_qwen",
    "chat": "caches/shakespeare_chat_smollm2",
    "chat_cross": "caches/shakespeare_chat_smollm2",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--cache", help="default: the suite's cache (see CACHES)")
    ap.add_argument("--suite", choices=sorted(SUITES), default="kd")
    ap.add_argument("--only", help="comma-separated variant numbers (0-based) to run, e.g. 2,3,4")
    ap.add_argument(
        "--seeds", default="0,1,2", help="comma-separated train.seed values; each variant runs once per seed"
    )
    ap.add_argument(
        "--student",
        help="a real student instead of the config's random-init one: a model folder (e.g. one `python -m kd.prune` "
        "wrote) for student.pretrained; the feature loss is then off (its layer pairs are the demo student's)",
    )
    ap.add_argument("--set", nargs="*", default=[], help="extra dotted overrides for every run (e.g. train.lr=3e-4)")
    args = ap.parse_args()
    variants = [(name, ov + args.set) for name, ov in SUITES[args.suite].items()]
    if args.student:
        real = ["student.config=null", f"student.pretrained={args.student}", "loss.feature_layers=[]"]
        # the feature loss off: a variant's own alpha_feature (0, or null beside a term list) is kept
        variants = [
            (
                name,
                real + ov + ([] if any(o.startswith("loss.alpha_feature") for o in ov) else ["loss.alpha_feature=0"]),
            )
            for name, ov in variants
            if "feature" not in name
        ]
    cache = args.cache or CACHES[args.suite]
    picked = [int(i) for i in args.only.split(",")] if args.only else range(len(variants))
    seeds = [int(x) for x in args.seeds.split(",")]
    out = Path(tempfile.mkdtemp(prefix="kd-bench-quality-"))
    rows = []
    for i, (name, overrides) in [(i, variants[i]) for i in picked]:
        finals = []
        for seed in seeds:
            # the config's own target/tail apply unless a variant overrides them (the suites pin what they compare)
            final, stdout = train_run(
                CONFIGS[args.suite], overrides, cache, out, f"v{i}-s{seed}", args.steps, seed, True
            )
            for line in stdout.splitlines():
                if line.startswith("[cross-tokenizer]") and i == picked[0] and seed == seeds[0]:
                    print(line)
            finals.append(final)
        mean = {k: sum(f[k] for f in finals) / len(finals) for k in ("eval/ce", "eval/ppl", "eval/top1_agreement")}
        mean["eval/bits_per_char"] = sum(f.get("eval/bits_per_char", float("nan")) for f in finals) / len(finals)
        rows.append((name, mean, [f["eval/ce"] for f in finals]))
    per_seed = f"{'per seed':>{8 * len(seeds) + 2}}" if len(seeds) > 1 else ""
    if args.only:  # a partial table: print the raw numbers only
        for name, r, ces in rows:
            print(
                f"{name:34}{r['eval/ce']:>13.3f}{r['eval/ppl']:>9.1f}{r['eval/top1_agreement']:>13.3f}"
                + ("  " + " ".join(f"{c:7.3f}" for c in ces) if len(seeds) > 1 else "")
            )
        return
    base, base_ces = rows[0][1]["eval/ce"], rows[0][2]
    full = rows[-1][1]["eval/ce"] if args.suite == "targets" else None
    print(
        f"\n{len(seeds)} seed(s) {seeds} per variant; CE = mean ± standard deviation over seeds; a difference to CE "
        "only marked ~ is within noise (smaller than twice its standard error)"
    )
    print(
        f"\n{'target':34}{'held-out CE':>17}{'bits/char':>10}{'ppl':>9}{'top-1 agree':>13}{'vs CE only':>13}"
        + (f"{'share of full-KD gain':>24}" if full is not None else "")
        + per_seed
    )
    for name, r, ces in rows:
        share = f"{100 * (base - r['eval/ce']) / (base - full):>23.0f}%" if full is not None else ""
        diff = r["eval/ce"] - base
        mark = " " if len(seeds) < 2 or abs(diff) >= 2 * standard_error(ces, base_ces) else "~"
        print(
            f"{name:34}{r['eval/ce']:>10.3f} ±{stdev(ces):5.3f}{r['eval/bits_per_char']:>10.3f}{r['eval/ppl']:>9.1f}"
            f"{r['eval/top1_agreement']:>13.3f}{diff:>+12.3f}{mark}{share}"
            + ("  " + " ".join(f"{c:7.3f}" for c in ces) if len(seeds) > 1 else "")
        )


def train_run(config: str, overrides: list[str], cache, out: Path, run: str, steps: int, seed: int, stdout=False):
    """One train_student.py process for `steps` optimizer steps; its last eval record (and its stdout)."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train_student.py"),
            "--config",
            str(ROOT / config),
            *overrides,
            f"train.cache_dir={cache}",
            f"train.output_dir={out}",
            f"train.run_name={run}",
            f"train.max_steps={steps}",
            f"train.seed={seed}",
            f"train.eval_every={steps}",
            "train.checkpoint_every=0",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"run {run} ({' '.join(overrides)}) failed:\n{result.stderr[-3000:]}")
    final = [r for r in read_metrics(out / run) if "eval/ce" in r][-1]
    return (final, result.stdout) if stdout else final


def stdev(values: list[float]) -> float:
    """Sample standard deviation (0 for one value)."""
    if len(values) < 2:
        return 0.0
    m = sum(values) / len(values)
    return (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def standard_error(a: list[float], b: list[float]) -> float:
    """Of the difference of two means over independent seeds."""
    return (stdev(a) ** 2 / len(a) + stdev(b) ** 2 / len(b)) ** 0.5


if __name__ == "__main__":
    main()
