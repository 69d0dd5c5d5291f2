"""The LM head fused into the loss (loss.fused_head) against the model's own forward (full logits), side by side.

    python bench/bench_head.py --memory [--tokens 8x1024] [--vocabs 8192,151936]   # peak memory of one KD step
    python bench/bench_head.py --speed [--rounds 3] [--steps 6]                       # step time, demo shapes

--memory: one KD step (forward, backward, AdamW step) of a student with the demo's body (6 layers, hidden 256, the
Llama of configs/train_shakespeare.yaml) and vocabulary V, on a micro-batch of random tokens (default 8 x 1024)
with random cached top-256 targets (CE 0.5 + forward KL 0.5, tail bucket, T = 1), for each V in --vocabs, fused and
not, each in its own process (peak RSS is per process; CUDA max allocated on a GPU). Prints the fused/unfused ratio
at the largest V (goal <= 1/4) and, fused, the growth of the peak from the smallest to the largest V against what
the vocabulary may cost: the head's weights, gradients and AdamW moments (16 bytes per head parameter) plus two
chunks of fp32 [position_chunk, V] temporaries.

--speed: the demo's training step (accumulate_window + AdamW) on the demo cache (caches/shakespeare_smollm2, which
must exist): micro-batch 4 x 256, CE + top-256 KD, fused vs not; and, where caches/shakespeare_qwen exists, the
cross-tokenizer demo's step (configs/train_cross_tokenizer.yaml: the same student shape with the SmolLM2 tokenizer,
mapped KD against the Qwen cache), compared per student token. Variants alternate, one process each, over --rounds;
the median of --steps timed steps (after 2 warm-ups) per process, the best round of each kept. Reading and collating
a batch (data s/batch) is timed apart from the step.
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

BODY = dict(
    model_type="llama",
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


def memory_run(vocab: int, fused: bool, batch: int, seq: int, chunk: int) -> dict:
    import torch
    from accelerate import Accelerator
    from transformers import AutoConfig, AutoModelForCausalLM

    from kd.losses.terms import Term
    from kd.signals import TopK
    from kd.train import DistillModel, accumulate_window, peak_memory_mb
    from kd.train.step import LossPlan

    torch.manual_seed(0)
    fields = dict(BODY)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), vocab_size=vocab, **fields))
    accelerator = Accelerator()
    dev = accelerator.device
    model = DistillModel(lm, [], 256, fused_head=fused).to(dev)
    assert model.fused_head == fused, model.fused_head_reason
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    k = 256
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    # valid top-k targets without a [N, V] teacher tensor: random ids, log-probs of a random top-k with 5% tail
    top_ids = torch.randint(0, vocab, (batch, seq, k), generator=g)
    lp = torch.log_softmax(torch.randn(batch, seq, k, generator=g), -1) + torch.log(torch.tensor(0.95))
    data = {"input_ids": ids, "length": torch.full((batch,), seq), "topk_ids": top_ids, "topk_logprobs": lp}
    data = {n: v.to(dev) for n, v in data.items()}

    def signal(b, attention):
        return TopK(b["topk_ids"].reshape(-1, k), b["topk_logprobs"].reshape(-1, k), "bucket")

    plan = LossPlan([Term("ce", "ce", 0.5), Term("kd", "forward_kl", 0.5)], signal, 1.0, chunk)
    before = peak_memory_mb(dev)
    t0 = time.perf_counter()
    accumulate_window(model, [data], plan, accelerator)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"peak_mb": peak_memory_mb(dev), "before_mb": before, "step_s": time.perf_counter() - t0}


def speed_run(variant: str, cache_dir: str, qwen_cache: str, steps: int) -> dict:
    """variant: same_fused | same_full (the demo: SmolLM2 cache, top-256 KD) | cross_fused | cross_full (the
    cross-tokenizer demo: Qwen cache, SmolLM2-tokenizer student, mapped KD)."""
    import tempfile

    import torch
    from accelerate import Accelerator

    from bench.timing import timed_steps
    from kd.cache import TeacherCache
    from kd.config import load_config
    from kd.models import load_tokenizer
    from kd.train import DistillModel, peak_memory_mb
    from kd.train.model import build_student
    from kd.train.recipe import cross_tokenizer_splits
    from kd.train.step import LossPlan
    from kd.train_config import TrainConfig

    torch.manual_seed(0)
    cross, fused = variant.startswith("cross"), variant.endswith("fused")
    config = "configs/train_cross_tokenizer.yaml" if cross else "configs/train_shakespeare.yaml"
    overrides = [f"train.cache_dir={qwen_cache if cross else cache_dir}", "loss.target=topk", "loss.feature_layers=[]"]
    cfg = load_config(TrainConfig, ROOT / config, overrides + ([] if cross else ["loss.alpha_feature=0"]))
    cache = TeacherCache(cfg.train.cache_dir)
    accelerator = Accelerator()
    dev = accelerator.device
    fields = ("input_ids", "topk_ids", "topk_logprobs")
    split = cache.split("train", fields)
    if cross:
        tok = load_tokenizer(cfg.student.tokenizer)
        with tempfile.TemporaryDirectory() as tmp:
            split, _ = cross_tokenizer_splits(
                cfg, cache, tok, split, cache.split("eval", fields), Path(tmp), accelerator
            )
    else:
        tok = load_tokenizer(cache.manifest["teacher"]["name_or_path"])
    mb = 4
    t0 = time.perf_counter()
    batches = [torch.utils.data.default_collate([split[i * mb + j] for j in range(mb)]) for i in range(steps + 2)]
    data_s = (time.perf_counter() - t0) / len(batches)
    lm = build_student(cfg, tok, 0 if cross else cache.manifest["teacher"]["vocab_size"]).to(dev)
    model = DistillModel(lm, [], cache.manifest["teacher"]["hidden_size"], fused_head=fused).to(dev)
    assert model.fused_head == fused, model.fused_head_reason
    plan = LossPlan.build(cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = timed_steps(model, batches, plan, accelerator, opt)
    tokens = statistics.mean(int(b["length"].sum()) for b in batches)
    return {"step_s": statistics.median(times), "peak_mb": peak_memory_mb(dev), "tokens": tokens, "data_s": data_s}


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.split("RESULT ", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--tokens", default="8x1024", help="micro-batch of the memory runs, BATCHxSEQ")
    ap.add_argument("--vocabs", default="8192,151936")
    ap.add_argument("--chunk", type=int, default=128, help="loss.position_chunk")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--cache", default="caches/shakespeare_smollm2")
    ap.add_argument("--qwen-cache", default="caches/shakespeare_qwen", help="for the cross-tokenizer rows")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "memory":
            vocab, fused, batch, seq = int(rest[0]), rest[1] == "1", *map(int, rest[2].split("x"))
            result = memory_run(vocab, fused, batch, seq, args.chunk)
        else:
            result = speed_run(rest[0], args.cache, args.qwen_cache, args.steps)
        print("RESULT " + json.dumps(result))
        return
    if args.memory:
        vocabs = [int(v) for v in args.vocabs.split(",")]
        res = {}
        for v in vocabs:
            for fused in (True, False):
                res[v, fused] = r = child(
                    ["--chunk", str(args.chunk), "--child", "memory", str(v), str(int(fused)), args.tokens]
                )
                print(
                    f"V = {v:>7,}  {'fused head ' if fused else 'full logits'}  peak {r['peak_mb']:>8,.0f} MB "
                    f"(before the step {r['before_mb']:,.0f} MB)  step {r['step_s']:.1f} s",
                    flush=True,
                )
        lo, hi = vocabs[0], vocabs[-1]
        ratio = res[hi, True]["peak_mb"] / res[hi, False]["peak_mb"]
        print(f"\nV = {hi:,}, micro-batch {args.tokens}: fused / full logits peak = {ratio:.3f}  (goal <= 0.25)")
        growth = res[hi, True]["peak_mb"] - res[lo, True]["peak_mb"]
        allowance = ((hi - lo) * BODY["hidden_size"] * 16 + 2 * args.chunk * hi * 4) / 2**20
        print(
            f"fused, V {lo:,} -> {hi:,}: peak grows {growth:,.0f} MB; the head's weights, gradients and AdamW "
            f"moments plus two fp32 chunks come to {allowance:,.0f} MB  (goal: growth <= that)"
        )
    if args.speed:
        variants = ["same_fused", "same_full"] + (
            ["cross_fused", "cross_full"] if Path(args.qwen_cache).exists() else []
        )
        best = {}
        for _ in range(args.rounds):
            for v in variants:
                r = child(
                    [
                        "--steps",
                        str(args.steps),
                        "--cache",
                        args.cache,
                        "--qwen-cache",
                        args.qwen_cache,
                        "--child",
                        "speed",
                        v,
                    ]
                )
                if v not in best or r["step_s"] < best[v]["step_s"]:
                    best[v] = r
        labels = {
            "same_fused": "same tokenizer, fused head",
            "same_full": "same tokenizer, full logits",
            "cross_fused": "cross-tokenizer, fused head",
            "cross_full": "cross-tokenizer, full logits",
        }
        print(f"\n{'':30}{'s/step':>8}{'student tokens/s':>18}{'peak MB':>9}{'data s/batch':>14}")
        for v, r in best.items():
            print(
                f"{labels[v]:30}{r['step_s']:>8.3f}{r['tokens'] / r['step_s']:>18,.0f}{r['peak_mb']:>9,.0f}"
                f"{r['data_s']:>14.4f}"
            )
        print(
            f"same tokenizer: fused / full logits step time = {best['same_fused']['step_s'] / best['same_full']['step_s']:.3f}  (goal <= 1.0)"
        )
        if "cross_fused" in best:
            per_token = {v: r["step_s"] / r["tokens"] for v, r in best.items()}
            print(
                f"cross / same tokenizer time per student token, fused: "
                f"{per_token['cross_fused'] / per_token['same_fused']:.3f}  (goal <= 1.2); full logits: "
                f"{per_token['cross_full'] / per_token['same_full']:.3f}"
            )
        else:
            print(
                f"(no {args.qwen_cache}: the cross-tokenizer rows need python cache_teacher.py --config configs/shakespeare_qwen.yaml)"
            )


if __name__ == "__main__":
    main()
