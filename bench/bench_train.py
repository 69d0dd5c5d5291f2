"""Training-step cost: plain CE vs KD against the cache vs KD with the teacher online (what the original did).

    python bench/bench_train.py [--steps 6] [--rounds 2] [--cache caches/shakespeare_smollm2]

Same student (the demo's 6-layer 256-wide Llama, SmolLM tokenizer), same batches (micro-batch 4 x 256 tokens from
the demo cache, which must exist: run scripts/demo.sh or cache_teacher.py first), AdamW, fp32:
    (a) plain cross-entropy step: HF forward with labels, backward, step.
    (b) cached KD step: kd.train.accumulate_window with CE + top-256 KD (+ feature loss on 2 layer pairs), step.
    (c) online KD step: the real SmolLM2-135M teacher forward (inference_mode) on the batch, full-vocabulary
        KL + CE, backward, step: the teacher lives in the training process.
    (d) CE only through kd (loss.alpha_kd=0, loss.alpha_feature=0): the weight-0 KD term is not computed; and
    (e) the same with the weight-0 KD term computed every step, as kd did before (`--variants plain ce_only ce_kd0`
        compares the three: goal d/a <= 1.05).
Each variant runs in its own process (so peak memory is its own), variants alternate over `--rounds`, and the
median step time of each round's `--steps` timed steps (after 2 warm-up steps) is kept, best round wins.
Peak memory: CUDA max allocated when on a GPU, else the process's peak RSS. Prints b/a and c/b, and how many
batches per second one DataLoader worker reads from the cache, against the rate the cached step consumes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def reader_rate(cache_dir: str, batches: int = 40) -> dict:
    """Batches/s that the training DataLoader (1 worker, all fields) delivers from the cache, alone."""
    from kd.cache import TeacherCache
    from kd.train import make_loader

    split = TeacherCache(cache_dir).split("train")
    loader = make_loader(split, range(min(len(split), batches * 4)), 4, num_workers=1, pin_memory=False)
    it = iter(loader)
    next(it)  # worker start-up, not steady state
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    return {"batches_per_s": n / (time.perf_counter() - t0)}


def run_variant(variant: str, cache_dir: str, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator

    from kd.cache import TeacherCache
    from kd.config import load_config
    from kd.models import load_causal_lm, load_tokenizer
    from kd.train import DistillModel, accumulate_window, peak_memory_mb, positions
    from kd.train.model import build_student
    from kd.train.step import LossPlan
    from kd.train_config import TrainConfig

    torch.manual_seed(0)
    cfg = load_config(TrainConfig, ROOT / "configs/train_shakespeare.yaml", [f"train.cache_dir={cache_dir}"])
    cache = TeacherCache(cache_dir)
    tok = load_tokenizer(cache.manifest["teacher"]["name_or_path"])
    accelerator = Accelerator()
    dev = accelerator.device
    split = cache.split("train", ("input_ids", "topk_ids", "topk_logprobs", "hidden_states"))
    mb = 4
    batches = [torch.utils.data.default_collate([split[i * mb + j] for j in range(mb)]) for i in range(steps + 2)]
    lm = build_student(cfg, tok, cache.manifest["teacher"]["vocab_size"]).to(dev)
    model = DistillModel(
        lm, cfg.loss.feature_layers if variant == "cached" else [], cache.manifest["teacher"]["hidden_size"]
    ).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    teacher = None
    if variant == "online":
        teacher = load_causal_lm(cache.manifest["teacher"]["name_or_path"], None, "fp32", "sdpa").to(dev).eval()
    slots = [cache.hidden_layers.index(t) for _, t in cfg.loss.feature_layers]
    times = []
    for i, batch in enumerate(batches):
        batch = {k: v.to(dev) for k, v in batch.items()}
        t0 = time.perf_counter()
        if variant == "plain":
            attention, loss_mask, targets = positions(batch)
            logits = model.lm(input_ids=batch["input_ids"], attention_mask=attention).logits
            loss = F.cross_entropy(logits[loss_mask].float(), targets[loss_mask])
            loss.backward()
        elif variant == "cached":
            accumulate_window(model, [batch], cfg.loss, accelerator, slots)
        elif variant in ("ce_only", "ce_kd0"):
            ce_cfg = dataclasses.replace(cfg.loss, alpha_kd=0.0, alpha_feature=0.0, target="topk")
            plan = LossPlan.build(ce_cfg)
            if variant == "ce_kd0":  # the weight-0 KD term computed (and its teacher signal built) every step
                plan = dataclasses.replace(plan, terms=ce_cfg.loss_terms())
            accumulate_window(model, [batch], plan, accelerator)
        else:
            attention, loss_mask, targets = positions(batch)
            with torch.inference_mode():
                t_logits = teacher(input_ids=batch["input_ids"], attention_mask=attention).logits[loss_mask].float()
            logits = model.lm(input_ids=batch["input_ids"], attention_mask=attention).logits[loss_mask].float()
            kd = F.kl_div(
                torch.log_softmax(logits, -1),
                torch.log_softmax(t_logits.clone(), -1),
                log_target=True,
                reduction="batchmean",
            )
            loss = cfg.loss.alpha_ce * F.cross_entropy(logits, targets[loss_mask]) + cfg.loss.alpha_kd * kd
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {
        "step_s": statistics.median(times),
        "peak_mem_mb": peak_memory_mb(dev),
        "tokens_per_step": int(sum(int(b["length"].sum()) for b in batches[:1])),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache", default="caches/shakespeare_smollm2")
    ap.add_argument("--variants", nargs="+", default=["plain", "cached", "online"])
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        result = (
            reader_rate(args.cache) if args.variant == "reader" else run_variant(args.variant, args.cache, args.steps)
        )
        print("RESULT " + json.dumps(result))
        return
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for variant in args.variants:
            out = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--cache", args.cache, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            r = json.loads(out.split("RESULT ", 1)[1])
            if variant not in best or r["step_s"] < best[variant]["step_s"]:
                best[variant] = r
    labels = {
        "plain": "(a) plain CE step",
        "cached": "(b) KD+CE+feature vs cache",
        "online": "(c) KD+CE, teacher online",
        "ce_only": "(d) CE only through kd",
        "ce_kd0": "(e) CE + weight-0 KD computed",
    }
    print(f"\n{'':30}{'s/step':>9}{'tokens/s':>10}{'peak MB':>10}")
    for v, r in best.items():
        print(f"{labels[v]:30}{r['step_s']:>9.3f}{r['tokens_per_step'] / r['step_s']:>10.0f}{r['peak_mem_mb']:>10.0f}")
    for name, a, b, goal in (
        ("b/a", "cached", "plain", "<= 1.10"),
        ("c/b", "online", "cached", ">= 2"),
        ("d/a", "ce_only", "plain", "<= 1.05"),
        ("e/a", "ce_kd0", "plain", "before: a weight-0 KD term computed"),
    ):
        if a in best and b in best:
            print(f"{name} = {best[a]['step_s'] / best[b]['step_s']:.3f}   ({goal})")
    if "cached" not in best:
        return
    out = subprocess.run(
        [sys.executable, __file__, "--variant", "reader", "--cache", args.cache],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = json.loads(out.split("RESULT ", 1)[1])["batches_per_s"]
    print(
        f"cache reader, 1 DataLoader worker: {rate:.1f} batches/s of 4 x 256 tokens = "
        f"{rate * best['cached']['step_s']:.0f}x what the cached step consumes"
    )


if __name__ == "__main__":
    main()
