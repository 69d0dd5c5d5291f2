"""Cost of each divergence kind: the demo student's training step with CE + that kind, against CE + forward KL on
its fused analytic-gradient path, side by side in one run; and the loss's peak memory against the batch size.

    python bench/bench_losses.py [--steps 5] [--rounds 3] [--cache caches/shakespeare_smollm2] [--memory]

Step: the demo's student (6-layer 256-wide Llama, SmolLM tokenizer, V = 49,152), micro-batch 4 x 256 from the demo
cache (which must exist: run the README's first command or cache_teacher.py first), the cached top-256 with the
tail bucket at T = 2, `kd.train.accumulate_window` (forward + loss + backward; the optimizer step is the same for
every kind and left out); chunks of 128 positions, and for two kinds also the plain autograd reference (one chunk =
the whole micro-batch, so every [positions, V] temporary of the pure function exists at once). Variants alternate
within each round, the median of `--steps` timed steps (after one warm-up) is kept per round, the best round wins;
printed as ratios to the fused forward-KL step.
Memory (`--memory`): each kind's loss alone (kd.losses.terms.logit_term_sums + backward) on random logits
[N, 49,152] in a fresh process per (kind, N), N = 1,024 and 4,096: the peak RSS growth beyond the two logits-sized
buffers every path holds (the gradient buffer and its scaled copy), which should not grow with N.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = [
    ("forward_kl (fused)", {"kind": "forward_kl"}, True),
    ("forward_kl (chunked)", {"kind": "forward_kl"}, False),
    ("reverse_kl", {"kind": "reverse_kl"}, False),
    ("jsd beta=0.5", {"kind": "jsd", "beta": 0.5}, False),
    ("tvd", {"kind": "tvd"}, False),
    ("skew_kl alpha=0.1", {"kind": "skew_kl", "alpha": 0.1}, False),
    ("skew_reverse_kl alpha=0.1", {"kind": "skew_reverse_kl", "alpha": 0.1}, False),
    # the plain autograd references: the same pure functions over the whole micro-batch in one chunk
    ("reverse_kl (unchunked ref)", {"kind": "reverse_kl"}, False),
    ("jsd beta=0.5 (unchunked ref)", {"kind": "jsd", "beta": 0.5}, False),
]
UNCHUNKED = 4 * 256  # every position of the micro-batch


def step_times(cache_dir: str, steps: int, rounds: int) -> dict[str, float]:
    import torch
    from accelerate import Accelerator

    import kd.losses.terms as terms_mod
    from kd.cache import TeacherCache
    from kd.config import load_config
    from kd.models import load_tokenizer
    from kd.train import DistillModel, LossPlan, accumulate_window
    from kd.train.model import build_student
    from kd.train_config import LossConfig, TrainConfig

    torch.manual_seed(0)
    cache = TeacherCache(cache_dir)
    tok = load_tokenizer(cache.manifest["teacher"]["name_or_path"])
    split = cache.split("train", ("input_ids", "topk_ids", "topk_logprobs"))
    batches = [torch.utils.data.default_collate([split[i * 4 + j] for j in range(4)]) for i in range(steps + 1)]
    accelerator = Accelerator()
    plans = {
        label: (
            LossPlan.build(
                LossConfig(
                    terms=[{"kind": "ce", "weight": 0.5}, dict(spec, weight=0.5)],
                    target="topk",
                    temperature=2.0,
                    tail="bucket",
                    position_chunk=UNCHUNKED if "unchunked" in label else 128,
                )
            ),
            fused,
        )
        for label, spec, fused in KINDS
    }
    cfg = load_config(TrainConfig, ROOT / "configs/train_shakespeare.yaml", [f"train.cache_dir={cache_dir}"])
    lm = build_student(cfg, tok, cache.manifest["teacher"]["vocab_size"])
    model = DistillModel(lm, [], cache.manifest["teacher"]["hidden_size"])
    best = {label: float("inf") for label in plans}
    original = terms_mod.fused_eligible
    for _ in range(rounds):
        for label, (plan, fused) in plans.items():
            terms_mod.fused_eligible = original if fused else (lambda *a: False)
            times = []
            for i, batch in enumerate(batches):
                t0 = time.perf_counter()
                accumulate_window(model, [batch], plan, accelerator)
                model.zero_grad(set_to_none=True)
                if i:
                    times.append(time.perf_counter() - t0)
            best[label] = min(best[label], statistics.median(times))
    terms_mod.fused_eligible = original
    return best


def memory_child(kind: str, n: int) -> None:
    import resource

    import torch

    from kd.losses.terms import Term, logit_term_sums
    from kd.signals import TopK

    V, k = 49_152, 256
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, V, generator=g).requires_grad_(True)
    # teacher top-k made in small chunks, so that nothing before the loss reaches the loss's own peak
    tops = [torch.log_softmax(torch.randn(64, V, generator=g), -1).topk(k, -1) for _ in range(n // 64)]
    lp, ids = torch.cat([t.values for t in tops]), torch.cat([t.indices for t in tops])
    sig = TopK(ids, lp, "bucket")
    mask = torch.ones(n, dtype=torch.bool)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    terms = [Term("ce", "ce", 0.5), Term("kd", kind, 0.5)]
    total, _ = logit_term_sums(
        z, torch.zeros(n, dtype=torch.long), mask, mask, sig, terms, [0.5, 0.5], 2.0, 128, fused=kind == "forward_kl"
    )
    total.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"extra_mb": (peak - before - 2 * n * V * 4) / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", default="caches/shakespeare_smollm2")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        memory_child(args.child[0], int(args.child[1]))
        return
    best = step_times(args.cache, args.steps, args.rounds)
    ref = best["forward_kl (fused)"]
    print(
        f"\nstep = forward + CE + KD + backward, micro-batch 4 x 256, V = 49,152, T = 2, top-256 bucket "
        f"(median of {args.steps}, best of {args.rounds} rounds)"
    )
    print(f"{'kind':28}{'s/step':>9}{'ratio to fused forward_kl':>28}")
    for label, t in best.items():
        print(f"{label:28}{t:>9.3f}{t / ref:>28.3f}")
    if args.memory:
        print("\nloss alone, peak RSS growth beyond 2 logits-sized buffers (MB), chunk 128:")
        print(f"{'kind':28}{'N = 1,024':>12}{'N = 4,096':>12}")
        for kind in ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"):
            row = []
            for n in (1024, 4096):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", kind, str(n)], capture_output=True, text=True, check=True
                ).stdout
                row.append(json.loads(out.strip().splitlines()[-1])["extra_mb"])
            print(f"{kind:28}{row[0]:>12.0f}{row[1]:>12.0f}")


if __name__ == "__main__":
    main()
