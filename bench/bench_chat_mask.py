"""What the chat loss mask costs a training step: the same chat batches with their loss_mask and segments, and
without them (every token counted, one causal stream per window), side by side in one process.

    python bench/bench_chat_mask.py [--cache caches/shakespeare_chat_smollm2] [--rounds 3] [--steps 8]

The demo's chat student (configs/train_shakespeare_chat.yaml: 6 layers, hidden 256) on micro-batches of 4 windows
of the chat cache (configs/shakespeare_chat_smollm2.yaml, which must exist), CE + sampled KD. "masked" is what
training a chat cache runs: the mask built per position, position ids restarting per conversation, and
transformers' block-diagonal attention mask built from them; "unmasked" drops the two fields (so plain causal
attention, every position counted), same windows and shapes. Variants alternate within each round, each with its
own student of the same initialisation, step by step (masked step i, then unmasked step i); the median of --steps
timed steps (after 2 warm-ups) per variant and round, the ratio per round and its median printed (the goal:
masked / unmasked <= 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch
    from accelerate import Accelerator

    from bench.timing import timed_steps
    from kd.cache import TeacherCache
    from kd.config import load_config
    from kd.models import load_tokenizer
    from kd.train import DistillModel
    from kd.train.model import build_student
    from kd.train.step import LossPlan
    from kd.train_config import TrainConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="caches/shakespeare_chat_smollm2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    cfg = load_config(TrainConfig, ROOT / "configs/train_shakespeare_chat.yaml", [f"train.cache_dir={args.cache}"])
    cache = TeacherCache(args.cache)
    if "chat" not in cache.manifest:
        raise SystemExit(f"{args.cache} is not a chat cache (configs/shakespeare_chat_smollm2.yaml makes one)")
    split = cache.split("train", ("input_ids", "sample_ids", "sample_counts", "loss_mask", "segments"))
    mb, n = 4, args.steps + 2
    masked = [torch.utils.data.default_collate([split[i * mb + j] for j in range(mb)]) for i in range(n)]
    unmasked = [{k: v for k, v in b.items() if k not in ("loss_mask", "segments")} for b in masked]
    tok = load_tokenizer(cache.manifest["teacher"]["name_or_path"])
    accelerator = Accelerator()
    plan = LossPlan.build(cfg.loss)
    models = {}
    for name in ("masked", "unmasked"):
        torch.manual_seed(0)
        lm = build_student(cfg, tok, cache.manifest["teacher"]["vocab_size"]).to(accelerator.device)
        model = DistillModel(lm, [], cache.manifest["teacher"]["hidden_size"]).to(accelerator.device)
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    positions = sum(int(b["length"].sum()) for b in masked) / n
    print(
        f"{args.cache}: micro-batch {mb} windows of {cache.seq_len}, {positions:.0f} tokens per step; device {accelerator.device}"
    )
    ratios = []
    for r in range(args.rounds):
        times = {"masked": [], "unmasked": []}
        for i in range(n):  # step by step, alternating, so that a load change on a shared machine hits both
            for name, batches in (("masked", masked), ("unmasked", unmasked)):
                model, opt = models[name]
                t = timed_steps(model, [batches[i]], plan, accelerator, opt, warmup=0)[0]
                if i >= 2:  # warm-up
                    times[name].append(t)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        ratios.append(med["masked"] / med["unmasked"])
        print(
            f"round {r + 1}: masked {med['masked']:.3f} s/step, unmasked {med['unmasked']:.3f} s/step, ratio {ratios[-1]:.3f}",
            flush=True,
        )
    print(
        f"\nmasked / unmasked step time: median {statistics.median(ratios):.3f} over {args.rounds} rounds (goal <= 1.05)"
    )


if __name__ == "__main__":
    main()
