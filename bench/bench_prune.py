"""Students cut from the real teacher (kd/prune.py), then trained against its cache: where each starts, and how
much of the pruned-to-teacher gap CE-only training and KD recover at equal steps and data, over seeds.

    python bench/bench_prune.py [--cache caches/shakespeare_smollm2] [--steps 40] [--seeds 0,1,2]

Cuts, from the cache's teacher (SmolLM2-135M-Instruct for the demo cache; importance measured on the cache's first
256 train windows): half depth (15 of 30 layers) by each rule (kd's default `block`, `influence`, and the
`every_other` baseline), and half MLP width (768 of 1,536 neurons, all 30 layers; beside it the first 768 neurons of
every layer, the unmeasured baseline). Prints each one's held-out CE and
bits per character on the cache's eval split before training. Then trains the block-rule half-depth student and
the half-width student with train_student.py (configs/train_shakespeare.yaml's schedule: micro-batch 4 x 256,
GA 2, cosine, warmup 5%, here lr 3e-4 -> 3e-5, no checkpoints) for `--steps` optimizer steps, once per seed
(`train.seed`: data order), CE only (alpha_ce 1) and KD (0.5 CE + 0.5 forward KL to the cached top-256, tail bucket,
T = 1), and prints the mean and standard deviation of the final held-out CE and the share of the gap
(start CE - final CE) / (start CE - teacher CE) each recovers. KD beats CE only "beyond noise" when the difference of
the means exceeds twice the larger of the two seed standard deviations.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_quality import stdev, train_run  # noqa: E402

from kd import prune  # noqa: E402
from kd.cache import TeacherCache  # noqa: E402
from kd.evaluate import score_on_cache  # noqa: E402
from kd.models import load_tokenizer  # noqa: E402

TRAIN = [
    "student.config=null",
    "train.lr=3e-4",
    "train.min_lr=3e-5",
    "loss.alpha_feature=0.0",
    "loss.feature_layers=[]",
]
VARIANTS = {
    "CE only": ["loss.alpha_ce=1.0", "loss.alpha_kd=0.0"],
    "KD (0.5 CE + 0.5 KL, top-256)": ["loss.alpha_ce=0.5", "loss.alpha_kd=0.5", "loss.target=topk", "loss.tail=bucket"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="caches/shakespeare_smollm2")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--intermediate-size", type=int, default=768)
    ap.add_argument("--out", help="keep the cut students and runs here (default: a temporary folder)")
    ap.add_argument("--no-train", action="store_true", help="only cut and score the students")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.out or tempfile.mkdtemp(prefix="kd-bench-prune-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = TeacherCache(args.cache)
    teacher = prune.load_cache_teacher(cache)
    tok = load_tokenizer(cache.manifest["teacher"]["name_or_path"])
    L, width = teacher.config.num_hidden_layers, teacher.config.intermediate_size
    imp = prune.measure(teacher, prune.calibration_batches(cache, 256), neurons=True)
    start = {"teacher": score_on_cache(teacher, tok, cache, "eval")}
    cuts = {
        f"{rule} ({args.layers} of {L} layers)": (prune.choose_layers(imp, args.layers, rule), None)
        for rule in prune.RULES
    }
    all_layers = list(range(L))
    cuts[f"MLP width {args.intermediate_size} of {width} ({L} layers)"] = (
        all_layers,
        prune.keep_neurons(imp, all_layers, args.intermediate_size),
    )
    # the width rule's baseline: the first neurons of every layer (no measurement)
    first = {i: np.arange(args.intermediate_size) for i in all_layers}
    cuts[f"  baseline: first {args.intermediate_size} neurons"] = (all_layers, first)
    folders = {}
    print(
        f"teacher {cache.manifest['teacher']['name_or_path']}: held-out CE {start['teacher']['eval/ce']:.3f}, "
        f"bits/char {start['teacher']['eval/bits_per_char']:.3f} ({imp.tokens} calibration tokens)"
    )
    print(f"\n{'student (before training)':34}{'params':>8}{'held-out CE':>13}{'bits/char':>11}  kept layers")
    for name, (layers, neurons) in cuts.items():
        student = prune.prune(teacher, layers, neurons)
        start[name] = score_on_cache(student, tok, cache, "eval")
        params = sum(p.numel() for p in student.parameters()) / 1e6
        shown = layers if len(layers) < L else "all"
        print(
            f"{name:34}{params:>7.1f}M{start[name]['eval/ce']:>13.3f}{start[name]['eval/bits_per_char']:>11.3f}  {shown}"
        )
        folders[name] = work / f"student{len(folders)}"
        if not folders[name].exists():
            student.save_pretrained(folders[name])
            tok.save_pretrained(folders[name])
        del student
    del teacher
    if args.no_train:
        return
    trained = [n for n in cuts if n.startswith("block") or n.startswith("MLP")]
    t_ce = start["teacher"]["eval/ce"]
    results = {}
    for name in trained:
        for variant, overrides in VARIANTS.items():
            ces = []
            for seed in seeds:
                run = f"{folders[name].name}-{len(results)}-s{seed}"
                final = train_run(
                    "configs/train_shakespeare.yaml",
                    TRAIN + overrides + [f"student.pretrained={folders[name]}"],
                    args.cache,
                    work / "runs",
                    run,
                    args.steps,
                    seed,
                )
                ces.append(final["eval/ce"])
                print(f"  {name} / {variant} / seed {seed}: held-out CE {final['eval/ce']:.4f}", flush=True)
            results[(name, variant)] = ces
    print(
        f"\n{args.steps} optimizer steps (82k tokens at 4 x 256 x GA 2), seeds {seeds}; gap = start CE - teacher CE "
        f"({t_ce:.3f}); share = (start - final) / gap"
    )
    print(f"{'student':34}{'training':32}{'held-out CE':>18}{'share of gap':>15}  per seed")
    for name in trained:
        s_ce = start[name]["eval/ce"]
        means = {}
        for variant in VARIANTS:
            ces = results[(name, variant)]
            m = sum(ces) / len(ces)
            means[variant] = (m, stdev(ces))
            share = (s_ce - m) / (s_ce - t_ce)
            print(
                f"{name:34}{variant:32}{m:>10.3f} ±{stdev(ces):5.3f}{100 * share:>14.1f}%  "
                + " ".join(f"{c:.3f}" for c in ces)
            )
        (ce_m, ce_s), (kd_m, kd_s) = means.values()
        verdict = "beyond" if ce_m - kd_m > 2 * max(ce_s, kd_s) else "NOT beyond"
        print(f"{'':34}KD - CE only: {kd_m - ce_m:+.3f} nats ({verdict} twice the larger seed spread)")
    (work / "results.json").write_text(
        json.dumps({"start": start, "runs": {f"{n} | {v}": c for (n, v), c in results.items()}}, indent=1)
    )


if __name__ == "__main__":
    main()
