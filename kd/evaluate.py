"""Evaluate any causal LM folder (a teacher, a student, a run's final/) with the metrics training logs.

    python -m kd.evaluate MODEL --cache DIR [--split eval]      # on a cache split: + KD and top-1 agreement
    python -m kd.evaluate MODEL --text FILE [FILE ...]           # on text files (.txt, .jsonl, ...: as data.files)

Prints CE per token and perplexity, bits per character and per UTF-8 byte (kd/textscore.py: comparable across
tokenizers and with the teacher's score the cache keeps), and with a cache the forward KL to the cached teacher and
top-1 agreement, exactly as the trainer's eval computes them (a run's final/ on its cache reproduces the run's final
eval). On text, documents are packed into windows of --seq-len tokens with the model tokenizer's EOS between them,
as the caching pass packs them. `--json` prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from accelerate import Accelerator

from kd.cache import TeacherCache
from kd.config import at_least
from kd.errors import KDError, run_cli
from kd.models import check_context, load_causal_lm, load_tokenizer, tokenizer_fingerprint
from kd.textscore import batch_text_units, score_record, score_windows, text_windows
from kd.train import DistillModel, LossPlan, evaluate, make_loader
from kd.train_config import LossConfig


def _load(model_dir: str, dtype: str):
    return load_causal_lm(model_dir, None, dtype, "sdpa").eval(), load_tokenizer(model_dir)


def on_cache(model_dir: str, cache_dir: str, split: str, max_sequences: int | None, batch_size: int, dtype: str):
    """(metrics as the trainer logs them, eval/*, the teacher's score on the same windows kept in the cache, or None
    where it kept none: before format 8 a score per shard only, so none for the first `max_sequences` windows)."""
    cache = TeacherCache(cache_dir)
    lm, tok = _load(model_dir, dtype)
    check_context(model_dir, lm.config, cache.seq_len, "it cannot score this cache's windows")
    metrics = score_on_cache(lm, tok, cache, split, max_sequences, batch_size, where=model_dir)
    ref = cache.teacher_reference(split, max_sequences)
    return metrics, ref.score if ref is not None and not ref.note else None


def score_on_cache(lm, tok, cache, split: str, max_sequences: int | None = None, batch_size: int = 8, where="model"):
    """The trainer's eval metrics (eval/*) of an in-memory causal LM on the first `max_sequences` (or all) windows
    of a cache split: CE, ppl, bits per character and byte, forward KL to the cached teacher, top-1 agreement."""
    if tokenizer_fingerprint(tok) != cache.info.tokenizer.fingerprint:
        raise KDError(
            f"{where} has another tokenizer than the cache {cache.root}: KD metrics compare token ids, so "
            "evaluate it on the text instead (--text with the files the cache was made from)"
        )
    reader = cache.split(split, ("input_ids", "topk_ids", "topk_logprobs", "loss_mask", "segments"))
    n = len(reader) if max_sequences is None else min(max_sequences, len(reader))
    accelerator = Accelerator()
    model = accelerator.prepare(DistillModel(lm, [], cache.info.teacher.hidden_size))
    sep = cache.info.tokenizer.separator_id

    def units(batch):
        return batch_text_units(tok, batch, sep)

    loader = make_loader(reader, range(n), batch_size, 0, False)
    return evaluate(model, loader, LossPlan.for_eval(LossConfig()), accelerator, units)


def on_text(
    model_dir: str, files: list[str], seq_len: int, batch_size: int, dtype: str, text_field: str, max_sequences=None
) -> dict:
    """CE and bits per character of the model on text files."""
    lm, tok = _load(model_dir, dtype)
    check_context(model_dir, lm.config, seq_len, "lower --seq-len")
    windows, sep = text_windows(tok, files, seq_len, text_field, max_sequences)
    nats, tokens, chars, nbytes = score_windows(lm, tok, windows, sep, batch_size)
    return score_record(nats, int(tokens), int(chars), int(nbytes))


def main(argv: list[str] | None = None, prog: str = "python -m kd.evaluate") -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a causal LM folder (save_pretrained), an asset: path or a hub id")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--cache", help="a teacher cache: evaluate on one of its splits")
    source.add_argument("--text", nargs="+", help="text files or globs (.txt, .jsonl, .json, .csv, .parquet)")
    ap.add_argument("--split", default="eval", help="the cache split (default eval)")
    ap.add_argument("--max-sequences", type=at_least(1), default=None, help="evaluate the first N windows only")
    ap.add_argument("--seq-len", type=at_least(2), default=256, help="window length for --text (default 256)")
    ap.add_argument("--text-field", default="text", help="record field of the text in .jsonl/.csv/... files")
    ap.add_argument("--batch-size", type=at_least(1), default=8)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.cache:
        metrics, teacher = on_cache(args.model, args.cache, args.split, args.max_sequences, args.batch_size, args.dtype)
        result = {"model": args.model, "on": f"cache {args.cache} split {args.split}", **metrics}
        if teacher:
            result["teacher/bits_per_char"], result["teacher/ce"] = teacher["bits_per_char"], teacher["ce_per_token"]
    else:
        score = on_text(
            args.model, args.text, args.seq_len, args.batch_size, args.dtype, args.text_field, args.max_sequences
        )
        result = {
            "model": args.model,
            "on": f"text {' '.join(args.text)}",
            "eval/ce": score["ce_per_token"],
            "eval/ppl": math.exp(score["ce_per_token"]),
            "eval/bits_per_char": score["bits_per_char"],
            "eval/bits_per_byte": score["bits_per_byte"],
            "eval/tokens": score["tokens"],
            "eval/chars": score["chars"],
        }
    if args.json:
        print(json.dumps(result))
        return
    print(f"model        {result['model']}\non           {result['on']} ({result['eval/tokens']} target tokens)")
    print(f"CE           {result['eval/ce']:.4f} nats/token (ppl {result['eval/ppl']:.2f})")
    print(f"bits/char    {result['eval/bits_per_char']:.4f}   bits/byte {result['eval/bits_per_byte']:.4f}")
    if "eval/kd" in result:
        print(f"vs teacher   KD {result['eval/kd']:.4f}, top-1 agreement {result['eval/top1_agreement']:.4f}")
    if "teacher/bits_per_char" in result:
        print(f"teacher      {result['teacher/bits_per_char']:.4f} bits/char (its own score, kept in the cache)")
    sys.stdout.flush()


if __name__ == "__main__":
    run_cli(main)
