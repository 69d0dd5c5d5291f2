"""Cache codecs: bytes per token of each field under each codec, the KD-loss error of 8-bit log-probs, and decode speed.

    python bench/bench_codecs.py [--cache caches/shakespeare_smollm2] [--sequences 64] [--trained runs/shakespeare_demo]

(a) Payload bytes per token (encoded arrays, without HDF5 overhead) of every field under every codec, from the real
    teacher outputs of the first --sequences training windows. Ids are also packed at 18 bits, the width the 151,936
    Qwen vocabulary needs, which gives the sampled-target size for that vocabulary from the same draws.
    The stored cache's own bytes per token (HDF5 storage of each dataset) are printed too.
(b) KD-loss error of each log-prob codec against uncompressed fp32 top-k: the teacher is re-run on 4 x 256 tokens for
    exact fp32 top-k; the KD loss of a student (random init, and a trained demo student with --trained) is computed
    with fp32, fp16 and q8 values; the relative difference of the summed loss is printed.
(c) Decode speed: sequences per second of the cache reader per codec, single process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_targets import bytes_per_field  # noqa: E402
from kd.cache import TeacherCache, codecs  # noqa: E402
from kd.config import load_config  # noqa: E402
from kd.losses.terms import sparse_kd_per_position  # noqa: E402
from kd.models import load_causal_lm, load_tokenizer  # noqa: E402
from kd.teacher import teacher_targets  # noqa: E402
from kd.train.model import build_student  # noqa: E402
from kd.train_config import TrainConfig  # noqa: E402

QWEN_BITS = codecs.bits_for(151_936)


def payload_sizes(items: list[dict], vocab: int, sample_n: int) -> list[tuple[str, str, float]]:
    tokens = sum(int(it["length"]) for it in items)
    T = items[0]["input_ids"].shape[0]
    per_tok = lambda nbytes: nbytes / tokens * T / T  # noqa: E731 (all T positions are stored, lengths are counted)
    n_seq, bits = len(items), codecs.bits_for(vocab)
    rows = []
    k = items[0]["topk_ids"].shape[-1]
    rows.append(
        (
            "topk_ids",
            f"plain {'uint16' if vocab <= 65536 else 'int32'}",
            per_tok(n_seq * T * k * (2 if vocab <= 65536 else 4)),
        )
    )
    rows.append(("topk_ids", f"bitpack {bits} bits", per_tok(n_seq * codecs.packed_nbytes(T * k, bits))))
    if bits != QWEN_BITS:
        rows.append(
            (
                "topk_ids",
                f"bitpack {QWEN_BITS} bits (151,936 vocab)",
                per_tok(n_seq * codecs.packed_nbytes(T * k, QWEN_BITS)),
            )
        )
    rows.append(("topk_logprobs", "plain fp16", per_tok(n_seq * T * k * 2)))
    rows.append(("topk_logprobs", "q8 (+ 8 B/position anchor, step)", per_tok(n_seq * T * (k + 8))))
    if "hidden_states" in items[0]:
        L, _, H = items[0]["hidden_states"].shape
        rows.append(("hidden_states", f"plain fp16 ({L} layers)", per_tok(n_seq * L * T * H * 2)))
        rows.append(("hidden_states", f"q8 ({L} layers)", per_tok(n_seq * L * T * (H + 8))))
    if sample_n:
        id_bytes = 2 if vocab <= 65536 else 4
        rows.append(("samples", f"plain padded n={sample_n}", per_tok(n_seq * T * sample_n * (id_bytes + 1))))
        cb = codecs.bits_for(sample_n + 1)
        widths = [(bits, f"ragged {bits}-bit ids")] + (
            [(QWEN_BITS, f"ragged {QWEN_BITS}-bit ids (151,936 vocab)")] if bits != QWEN_BITS else []
        )
        for id_bits, label in widths:
            total = sum(
                codecs.ragged_encode(it["sample_ids"].numpy(), it["sample_counts"].numpy(), id_bits, cb).size
                for it in items
            )
            rows.append(("samples", label, per_tok(total)))
        distinct = np.mean([float((it["sample_counts"] > 0).sum(-1).float().mean()) for it in items])
        rows.append(("samples", f"(mean distinct ids per position: {distinct:.1f})", float("nan")))
    return rows


def kd_error(cache: TeacherCache, items: list[dict], trained: str | None) -> list[tuple[str, str, float, float]]:
    t = cache.manifest["teacher"]
    teacher = load_causal_lm(t["name_or_path"], t["revision"], "fp32", "sdpa").eval()
    batch = torch.stack([it["input_ids"] for it in items[:4]])
    lengths = torch.stack([it["length"] for it in items[:4]])
    mask = (torch.arange(batch.shape[1])[None] < lengths[:, None]).long()
    lp, ids, _, _ = teacher_targets(teacher, batch, mask, cache.top_k, [])
    valid = mask.bool()
    lp, ids = lp[valid], ids[valid]  # fp32 top-k at every real position
    variants = {
        "fp32": lp,
        "fp16": lp.half().float(),
        "q8": torch.from_numpy(codecs.q8_decode(*codecs.q8_encode(lp.numpy(), "mass"))),
    }
    students = {"random init": None}
    if trained:
        students[f"trained ({Path(trained).name})"] = Path(trained) / "final"
    rows = []
    for label, path in students.items():
        over = [f"train.cache_dir={cache.root}"] + (
            [f"student.pretrained={path}", "student.config=null"] if path else []
        )
        cfg = load_config(TrainConfig, ROOT / "configs/train_shakespeare.yaml", over)
        torch.manual_seed(0)
        lm = build_student(cfg, load_tokenizer(t["name_or_path"]), t["vocab_size"]).eval()
        with torch.no_grad():
            logits = lm(input_ids=batch, attention_mask=mask).logits[valid].float()
        for tail in ("bucket", "renormalize"):
            ref = float(sparse_kd_per_position(logits, ids, lp, 1.0, tail).sum())
            for codec in ("fp16", "q8"):
                got = float(sparse_kd_per_position(logits, ids, variants[codec], 1.0, tail).sum())
                rows.append((label, f"{tail} / {codec}", ref / len(lp), abs(got / ref - 1)))
    return rows


def decode_speed(cache: TeacherCache, fields: tuple[str, ...], n: int) -> float:
    split = cache.split("train", fields)
    split[0]  # open the files outside the timing
    t0 = time.perf_counter()
    for i in range(n):
        split[i % len(split)]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="caches/shakespeare_smollm2")
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--trained", help="a run directory whose final/ student is measured too")
    args = ap.parse_args()
    cache = TeacherCache(args.cache)
    split = cache.split("train")
    items = [split[i] for i in range(min(args.sequences, len(split)))]
    vocab, sample_n = cache.manifest["teacher"]["vocab_size"], cache.manifest.get("sample_n", 0)

    print(
        f"(a) payload bytes per token, {len(items)} sequences of {cache.seq_len} tokens, top-{cache.top_k}, vocab {vocab}"
    )
    print(f"{'field':<16}{'codec':<46}{'bytes/token':>12}")
    for field, codec, b in payload_sizes(items, vocab, sample_n):
        print(f"{field:<16}{codec:<46}{'' if b != b else f'{b:.1f}':>12}")
    if cache.manifest.get("store_text"):
        texts = cache.split("train", ("text",))
        chars = sum(len(texts[i]["text"].encode("utf-8")) for i in range(len(items)))
        tokens = sum(int(it["length"]) for it in items)
        print(f"{'text':<16}{'utf-8 (HDF5 keeps it in the heap)':<46}{chars / tokens:>12.1f}")
    print(f"\nstored in {args.cache} (HDF5 storage per dataset, all splits):")
    for name, b in sorted(bytes_per_field(cache).items(), key=lambda kv: -kv[1]):
        print(f"  {name:<22}{b:>10.1f} B/token")

    print(
        f"\n(b) KD loss against fp32 top-{cache.top_k} (4 x {cache.seq_len} tokens, real teacher re-run), relative error"
    )
    print(f"{'student':<34}{'tail / codec':<24}{'KD per token':>14}{'rel. error':>12}")
    for student, variant, ref, err in kd_error(cache, items, args.trained):
        print(f"{student:<34}{variant:<24}{ref:>14.4f}{err * 100:>11.4f}%")

    print("\n(c) reader decode speed, sequences/s (one process)")
    for label, fields in (
        ("top-k ids + log-probs", ("input_ids", "topk_ids", "topk_logprobs")),
        ("sampled targets", ("input_ids", "sample_ids", "sample_counts")),
        ("hidden states", ("hidden_states",)),
    ):
        if fields[-1] in split.fields or (fields[-1] == "sample_counts" and sample_n):
            print(f"  {label:<24}{decode_speed(cache, fields, 200):>10.0f}")
    print({k: codecs.describe(v) for k, v in cache.manifest.get("codecs", {}).items()})


if __name__ == "__main__":
    main()
