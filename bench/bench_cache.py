"""Caching overhead: the real SmolLM2-135M teacher on real Shakespeare, bare forward vs cache_teacher.py.

    python bench/bench_cache.py [--small 16] [--sequences 64]

(a) bare: load the model and run a plain forward (no hidden states, no top-k) over the same packed windows,
    same batch size. (b) cache: `cache_teacher.main` end to end on those windows (config, tokenizer, data,
    model load, forward with hidden states, fp32 top-k log-probs, HDF5 writes, sha256, manifest).
Each is run at two sizes (--small and --sequences windows), alternating a, b, a, b. Two ratios are printed:
end to end at the larger size (includes fixed start-up: Accelerator, tokenizer, datasets, model load), and the
marginal one, (time(large) - time(small)) per token, i.e. the steady-state cost of caching one more token,
which is what a real multi-hour cache run pays. Goal: >= 0.85. Also prints cache bytes per token.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cache_teacher  # noqa: E402
from kd import data  # noqa: E402
from kd.assets import fetch  # noqa: E402
from kd.cache_config import CacheConfig  # noqa: E402
from kd.config import load_config  # noqa: E402
from kd.teacher import load_causal_lm, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bare_forward(cfg: CacheConfig) -> tuple[float, int]:
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.teacher.model)
    texts = data.load_documents(cfg.data.files, None, None, "train", "text")
    train_docs, _ = data.split_documents(len(texts), cfg.data.eval_documents, 0.1, cfg.data.split_seed)
    sep = tok.get_vocab()[cfg.data.separator_token]
    packed = data.pack(data.tokenize(tok, [texts[i] for i in train_docs]), train_docs, cfg.data.seq_len, sep, sep,
                       cfg.data.max_train_sequences)
    model = load_causal_lm(cfg.teacher.model, None, cfg.teacher.dtype, cfg.teacher.attn_implementation).eval()
    ids = torch.from_numpy(packed.input_ids)
    with torch.inference_mode():
        for s in range(0, len(ids), cfg.teacher.batch_size):
            model(input_ids=ids[s:s + cfg.teacher.batch_size]).logits.sum()
    return time.perf_counter() - t0, packed.num_tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=16)
    ap.add_argument("--sequences", type=int, default=64)
    args = ap.parse_args()
    fetch(["smollm2-135m-instruct", "shakespeare"])
    work = Path(tempfile.mkdtemp(prefix="kd-bench-cache-"))
    results = {}
    for n in (args.small, args.sequences):
        cfg = load_config(CacheConfig, ROOT / "configs/shakespeare_smollm2.yaml",
                          ["data.eval_documents=1", f"data.max_train_sequences={n}", "data.max_eval_sequences=1",
                           f"cache.output_dir={work}/c{n}"])
        bare_s, bare_tokens = bare_forward(cfg)
        t0 = time.perf_counter()
        out = cache_teacher.main(cfg)
        cache_s = time.perf_counter() - t0
        manifest = json.loads((out / "manifest.json").read_text())
        # the cache run also forwards the 1 eval window; count its tokens too
        cache_tokens = sum(s["num_tokens"] for s in manifest["splits"].values())
        results[n] = (bare_s, bare_tokens, cache_s, cache_tokens)
    print(f"\n{'':34}{'tokens':>8}{'s':>8}{'tokens/s':>10}")
    for n, (bare_s, bare_tokens, cache_s, cache_tokens) in results.items():
        print(f"{f'(a) bare forward, {n} windows':34}{bare_tokens:>8}{bare_s:>8.1f}{bare_tokens / bare_s:>10.0f}")
        print(f"{f'(b) cache_teacher.py, {n} windows':34}{cache_tokens:>8}{cache_s:>8.1f}{cache_tokens / cache_s:>10.0f}")
    (a1, n1, b1, m1), (a2, n2, b2, m2) = results[args.small], results[args.sequences]
    end_to_end = (m2 / b2) / (n2 / a2)
    marginal = ((m2 - m1) / (b2 - b1)) / ((n2 - n1) / (a2 - a1))
    print(f"ratio (b)/(a) throughput, end to end at {args.sequences} windows: {end_to_end:.3f}")
    print(f"ratio (b)/(a) throughput, marginal (steady state):    {marginal:.3f}   (goal >= 0.85)")
    print(f"cache bytes per token: {manifest['bytes_per_token']:.0f} (top-{manifest['top_k']} fp16 + ids, "
          f"{len(manifest['hidden_layers'])} hidden layers x {manifest['teacher']['hidden_size']} fp16)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
