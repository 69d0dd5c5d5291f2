"""python -m kd.prune: cut students from a cache's teacher and score them on its eval split (kd/prune/__init__.py:
the rules, the importance and what is kept)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kd.cache import TeacherCache
from kd.config import at_least
from kd.errors import KDError, run_cli
from kd.evaluate import score_on_cache
from kd.io import staged_dir
from kd.models import load_tokenizer
from kd.prune import RULES, calibration_batches, check_layers, cut, load_cache_teacher, measure
from kd.train_config import FromTeacherConfig


def main(argv: list[str] | None = None, prog: str = "python -m kd.prune") -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True, help="the teacher's cache: its teacher, calibration text and eval split")
    ap.add_argument("--teacher", help="the teacher model (default: the cache's, its weights checked)")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--layers", type=at_least(1), help="decoder layers to keep, chosen by --rule")
    which.add_argument("--keep", help="explicit teacher layers to keep, comma-separated (0-based)")
    ap.add_argument("--rule", default=FromTeacherConfig.rule, choices=list(RULES))
    ap.add_argument("--intermediate-size", type=at_least(1), help="MLP neurons to keep per layer (default: all)")
    ap.add_argument(
        "--calibration-sequences",
        type=at_least(1),
        default=FromTeacherConfig.calibration_sequences,
        help=f"train windows measured (default {FromTeacherConfig.calibration_sequences})",
    )
    ap.add_argument("--eval-sequences", type=at_least(1), default=None, help="eval windows scored (default: all)")
    ap.add_argument("--out", help="write the pruned model folder here (must not exist)")
    ap.add_argument(
        "--compare", action="store_true", help="also score every other rule's student (--out writes the first)"
    )
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = ap.parse_args(argv)
    if args.out is None and not args.compare:
        ap.error("give --out DIR to write the pruned model (or --compare to only score the rules)")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists():
        raise KDError(f"--out {out} already exists; choose a new folder (a pruned model is never written over one)")
    cache = TeacherCache(args.cache)
    teacher = load_cache_teacher(cache, args.teacher)
    tok = load_tokenizer(args.teacher or cache.info.teacher.name_or_path)
    L = teacher.config.num_hidden_layers
    keep = None
    if args.keep is not None:
        try:
            keep = check_layers([int(v) for v in args.keep.split(",")], L)
        except ValueError:
            raise KDError(f"--keep must be comma-separated layer indices, got {args.keep!r}") from None
    imp = None
    if keep is None or args.intermediate_size is not None or args.compare:
        imp = measure(
            teacher, calibration_batches(cache, args.calibration_sequences), args.intermediate_size is not None
        )
        print(f"importance measured on {imp.tokens} tokens of the cache's first train windows")
    num_layers = len(keep) if keep is not None else args.layers
    first = "explicit" if keep is not None else args.rule  # the student --out writes
    rules = [first] + ([r for r in RULES if r != first] if args.compare else [])
    results = []
    score = score_on_cache(teacher, tok, cache, "eval", args.eval_sequences)
    print(f"teacher: {L} layers, held-out CE {score['eval/ce']:.4f}, bits/char {score['eval/bits_per_char']:.4f}")
    results.append({"model": "teacher", "layers": list(range(L)), **score})
    chosen = None
    for rule in rules:
        if rule != "explicit":
            print(f"rule {rule}: candidates")
            print("\n".join(RULES[rule].candidates(imp, imp.num_layers, imp.num_layers - num_layers)))
        student, layers = cut(
            teacher, imp, rule, num_layers, keep if rule == "explicit" else None, args.intermediate_size
        )
        neurons = args.intermediate_size
        score = score_on_cache(student, tok, cache, "eval", args.eval_sequences)
        params = sum(p.numel() for p in student.parameters())
        print(
            f"{rule}: keeps layers {layers}" + (f", MLP width {args.intermediate_size}" if neurons else "") + f"; "
            f"{params / 1e6:.1f}M parameters; held-out CE {score['eval/ce']:.4f} (ppl {score['eval/ppl']:.1f}), "
            f"bits/char {score['eval/bits_per_char']:.4f}"
        )
        results.append({"model": rule, "layers": layers, "parameters": params, **score})
        if chosen is None:
            chosen = student
    if out is not None:
        with staged_dir(out) as tmp:
            chosen.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        print(f"wrote {out} (student.pretrained={out} trains it; its config.json records kd_pruned_from)")
    if args.json:
        print(json.dumps(results))
    sys.stdout.flush()


if __name__ == "__main__":
    run_cli(main)
