"""Caching overhead: the real SmolLM2-135M teacher on real Shakespeare, bare forward vs cache_teacher.py.

    python bench/bench_cache.py [--sequences 64] [--repeats 2] [--set cache.sample_n=0 ...]

(a) bare: load the model and run a plain forward (no hidden states, no top-k) over the same packed windows,
    same batch size. (b) cache: `cache_teacher.main` end to end on those windows (config, tokenizer, data,
    model load, forward with hidden states, fp32 top-k log-probs, HDF5 writes, sha256, manifest).
An untimed warm-up run comes first (one-time imports), then a and b alternate `--repeats` times at
`--sequences` windows and the fastest of each is kept (the machine is shared and noisy). Printed:
  - end-to-end throughput ratio (b)/(a), start-up included (Accelerator, tokenizer, datasets, model load);
  - per-batch ratio: in one process, the same batch through a plain forward and through `teacher_targets`
    (forward with hidden states + fp32 top-k log-probs + sampled targets), alternating, fastest of each: the
    steady-state compute overhead of caching, without I/O and start-up.
Goal: >= 0.85. Also prints cache bytes per token.
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
from kd.models import load_causal_lm, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bare_forward(cfg: CacheConfig) -> tuple[float, int]:
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.teacher.model)
    texts = [Path(f).read_text() for f in data.expand_files(cfg.data.files)]  # the training plays, in order
    sep = tok.get_vocab()[cfg.data.separator_token]
    packer = data.Packer(cfg.data.seq_len, sep, sep, with_text=False)
    for ids in data.tokenize(tok, texts)[0]:
        packer.add(ids)
    windows = packer.take(final=True)
    n = cfg.data.max_train_sequences
    model = load_causal_lm(cfg.teacher.model, None, cfg.teacher.dtype, cfg.teacher.attn_implementation).eval()
    ids = torch.from_numpy(windows.input_ids[:n].astype("int64"))
    with torch.inference_mode():
        for s in range(0, len(ids), cfg.teacher.batch_size):
            model(input_ids=ids[s : s + cfg.teacher.batch_size]).logits.sum()
    return time.perf_counter() - t0, int(windows.lengths[:n].sum())


def per_batch_ratio(cfg: CacheConfig, repeats: int = 5) -> tuple[float, float]:
    from kd.teacher import teacher_targets

    model = load_causal_lm(cfg.teacher.model, None, cfg.teacher.dtype, cfg.teacher.attn_implementation).eval()
    ids = torch.randint(
        0,
        model.config.vocab_size,
        (cfg.teacher.batch_size, cfg.data.seq_len),
        generator=torch.Generator().manual_seed(0),
    )
    mask = torch.ones_like(ids)
    bare, full = [], []
    with torch.inference_mode():
        model(input_ids=ids)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask).logits.sum()
            bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            gens = [torch.Generator().manual_seed(i) for i in range(len(ids))]
            teacher_targets(
                model,
                ids,
                mask,
                cfg.cache.top_k,
                cfg.cache.hidden_layers,
                sample_n=cfg.cache.sample_n,
                sample_generators=gens,
            )
            full.append(time.perf_counter() - t0)
    return min(bare), min(full)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="extra dotted overrides, e.g. cache.sample_n=0")
    args = ap.parse_args()
    fetch(["smollm2-135m-instruct", "shakespeare"])
    work = Path(tempfile.mkdtemp(prefix="kd-bench-cache-"))

    def config(n: int, out: str) -> CacheConfig:
        return load_config(
            CacheConfig,
            ROOT / "configs/shakespeare_smollm2.yaml",
            [f"data.max_train_sequences={n}", "data.max_eval_sequences=1", f"cache.output_dir={work}/{out}", *args.set],
        )

    bare_forward(config(8, "warmup"))  # one-time imports and file-cache warm-up, untimed
    bare_t, cache_t = [], []
    for r in range(args.repeats):
        cfg = config(args.sequences, f"c{r}")
        t, n_tokens = bare_forward(cfg)
        bare_t.append(t)
        t0 = time.perf_counter()
        out = cache_teacher.main(cfg)
        cache_t.append(time.perf_counter() - t0)
    manifest = json.loads((out / "manifest.json").read_text())
    # the cache run also forwards the 1 eval window; count its tokens too
    cache_tokens = sum(s["num_tokens"] for s in manifest["splits"].values())
    bare_tps, cache_tps = n_tokens / min(bare_t), cache_tokens / min(cache_t)
    batch_bare, batch_full = per_batch_ratio(cfg)
    print(f"\n{'':34}{'tokens':>8}{'best s':>9}{'tokens/s':>10}")
    print(f"{'(a) bare teacher forward':34}{n_tokens:>8}{min(bare_t):>9.1f}{bare_tps:>10.0f}")
    print(f"{'(b) cache_teacher.py end to end':34}{cache_tokens:>8}{min(cache_t):>9.1f}{cache_tps:>10.0f}")
    print(f"ratio (b)/(a) throughput, end to end:  {cache_tps / bare_tps:.3f}   (goal >= 0.85)")
    print(
        f"per batch of {cfg.teacher.batch_size}x{cfg.data.seq_len}: plain forward {batch_bare:.2f} s, "
        f"teacher_targets {batch_full:.2f} s, ratio {batch_bare / batch_full:.3f}"
    )
    print(
        f"cache bytes per token: {manifest['bytes_per_token']:.0f} (top-{manifest['top_k']}, sampled n = "
        f"{manifest['sample_n']}, {len(manifest['hidden_layers'])} hidden layers x {manifest['teacher']['hidden_size']}; "
        f"codecs {manifest['codecs']})"
    )
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
