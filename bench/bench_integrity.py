"""Cost of integrity checking on read: the same shards read with and without their per-sequence checksums, and the
format-4 scheme (HDF5 fletcher32 per chunk) beside them.

    python bench/bench_integrity.py [--cache caches/shakespeare_smollm2] [--shards 4] [--rounds 9] [--min-reads 2000]

Rewrites `--shards` train shards of an existing cache (any format) with kd.cache.ShardWriter, i.e. exactly as
cache_teacher.py writes them now (format 5: a checksum per sequence and dataset), and a second copy in format 4's
layout (no checksum table, a fletcher32 checksum per HDF5 chunk). Then reads every sequence through
kd.cache.CacheSplit (`--fields`: by default every field the demo's training step reads, plus the shard-vs-manifest check on open), in a
shuffled order, warm page cache, with three readers taking turns (per sequence or batch, in a random order each turn)
for `--rounds` rounds: format 5 checked, format 5 with `check=False` (what `train.trust_cache=true` does), format 4. Twice: one sequence at a time (`split[i]`), and in
batches of 8 through the training loop's loader (kd.train.data.make_loader in-process, so the collate's copy into
a batch is included: what a training step actually waits for). Torch on one thread, as in a DataLoader worker; each
round reads at least `--min-reads` sequences per reader (the shuffled order repeated). Prints the median
sequences/s and the median (and quartiles) of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.cache import (  # noqa: E402
    BASIS_FILE,
    FORMAT_VERSION,
    MANIFEST,
    META_ATTR,
    WINDOW_SCORES_SINCE,
    CacheSplit,
    HiddenBasis,
    ShardWriter,
    TeacherCache,
    shard_records,
)
from kd.teacher import TeacherOutputs  # noqa: E402

FIELDS = "input_ids,sample_ids,sample_counts,hidden_states"  # the demo's step (sampled targets + feature loss)


def rewrite(src: Path, dst: Path, shards: int) -> dict:
    """The first `shards` train shards of src, decoded and written again by ShardWriter (current format)."""
    dst.mkdir(parents=True)
    cache = TeacherCache(src)
    m = json.loads(json.dumps(cache.manifest))
    # records listed in the JSON; the split's teacher score is left out (these are its first shards only)
    train = {k: v for k, v in m["splits"]["train"].items() if k not in ("shard_index", "teacher_score")}
    m["splits"] = {"train": dict(train, shards=shard_records(src, cache.manifest, "train")[:shards])}
    m["splits"]["train"]["num_sequences"] = sum(s["num_sequences"] for s in m["splits"]["train"]["shards"])
    m["format_version"], m["store_text"] = FORMAT_VERSION, False  # text: not read by the training step
    reader = cache.split("train", CacheSplit.TENSOR_FIELDS)
    # the teacher's per-window scores travel where the source has them (format 8 on); else NaN rows, "not recorded"
    scores = (
        reader.teacher_scores(m["splits"]["train"]["num_sequences"])
        if cache.info.format_version >= WINDOW_SCORES_SINCE
        else None
    )
    basis = None
    if m["codecs"]["hidden_states"]["name"] == "lowrank" and m["hidden_layers"]:  # re-encoded on the same basis
        shutil.copy(src / BASIS_FILE, dst / BASIS_FILE)
        basis = HiddenBasis.load(dst / BASIS_FILE)
    for rec in m["splits"]["train"]["shards"]:
        with h5py.File(src / rec["file"], "r") as f:
            meta = dict(json.loads(f.attrs[META_ATTR]), format_version=FORMAT_VERSION, store_text=False)
        a, n = rec["first_sequence"], rec["num_sequences"]
        w = ShardWriter(dst / rec["file"], meta, n, basis=basis)
        for i in range(a, a + n):
            it = {k: v.numpy()[None] for k, v in reader[i].items()}
            w.append(
                TeacherOutputs(
                    it["input_ids"],
                    it["length"],
                    it["sequence_index"],
                    it["topk_ids"],
                    it["topk_logprobs"],
                    it.get("hidden_states"),
                    it.get("sample_ids"),
                    it.get("sample_counts"),
                    teacher_score=None if scores is None else scores[i : i + 1],
                )
            )
        rec.update(w.commit())
    (dst / MANIFEST).write_text(json.dumps(m))
    return m


def as_format_4(src: Path, dst: Path, manifest: dict) -> dict:
    """The same shards in format 4's layout: every chunked dataset with HDF5's fletcher32, no checksum table."""
    dst.mkdir(parents=True)
    if (src / BASIS_FILE).exists():
        shutil.copy(src / BASIS_FILE, dst / BASIS_FILE)
    for rec in manifest["splits"]["train"]["shards"]:
        with h5py.File(src / rec["file"], "r") as fi, h5py.File(dst / rec["file"], "w") as fo:
            fo.attrs[META_ATTR] = json.dumps(dict(json.loads(fi.attrs[META_ATTR]), format_version=4))
            for name, ds in fi.items():
                if name != "checksums":
                    kw = {"chunks": ds.chunks, "maxshape": ds.maxshape, "fletcher32": True} if ds.chunks else {}
                    fo.create_dataset(name, data=ds[()], dtype=ds.dtype, **kw)
    m = dict(manifest, format_version=4)
    (dst / MANIFEST).write_text(json.dumps(m))
    return m


def read_interleaved(readers: dict, order: np.ndarray, batch: int, rng, fields: tuple) -> dict:
    """Sequences/s of each reader over `order`: split[i] one by one (batch 0), or batches of `batch` as the training
    loop gets them (kd.train.data.make_loader, in-process: the collate's copy into one batch tensor included). The
    readers take turns per sequence or batch, in a random order each turn, so that drift on a shared machine (a
    neighbour's job, frequency changes) falls on all of them alike instead of on whichever pass it coincides with."""
    from kd.train.data import make_loader

    splits = {name: CacheSplit(root, m, "train", fields, check) for name, (root, m, check) in readers.items()}
    if batch:
        steps = {name: iter(make_loader(sp, order, batch, 0, False)) for name, sp in splits.items()}
        turns = -(-len(order) // batch)
    else:
        turns = len(order)
    spent = dict.fromkeys(readers, 0.0)
    names = list(readers)
    for t in range(turns):
        for name in rng.permutation(names):
            t0 = time.perf_counter()
            if batch:
                next(steps[name])
            else:
                splits[name][int(order[t])]
            spent[name] += time.perf_counter() - t0
    return {name: len(order) / spent[name] for name in names}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="caches/shakespeare_smollm2")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument(
        "--fields",
        default=FIELDS,
        help="fields read, comma-separated (top-k targets: input_ids,topk_ids,topk_logprobs)",
    )
    ap.add_argument("--min-reads", type=int, default=2000, help="sequences read per measurement (the order repeated)")
    args = ap.parse_args()
    # The training loop reads in DataLoader workers (train.num_workers=1 by default), where torch runs one thread:
    # measured the same way, and without a second thread's scheduling noise in a ratio of ~3%.
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="kd-bench-integrity-"))
    v5 = rewrite(Path(args.cache), work / "v5", args.shards)
    v4 = as_format_4(work / "v5", work / "v4", v5)
    n = v5["splits"]["train"]["num_sequences"]
    rng, fields = np.random.default_rng(0), tuple(args.fields.split(","))
    order = np.concatenate([rng.permutation(n) for _ in range(-(-args.min_reads // n))])
    readers = {  # name -> (root, manifest, check)
        "format 5, unchecked (trust)": (work / "v5", v5, False),
        "format 5, checked": (work / "v5", v5, True),
        "format 4, fletcher32": (work / "v4", v4, True),
    }
    print(
        f"{n} sequences in {len(v5['splits']['train']['shards'])} shards, all read in a shuffled order; {args.rounds} rounds of "
        f"{len(order)} reads each, the three readers taking turns per read: the median of the per-round ratios; "
        f"fields read: {', '.join(fields)}"
    )
    for batch, what in ((0, "one sequence at a time (split[i])"), (8, "batches of 8 through the training loader")):
        read_interleaved(readers, order[:16], batch, rng, fields)  # warm the page cache and imports
        rates = {name: [] for name in readers}
        for _ in range(args.rounds):
            for name, rate in read_interleaved(readers, order, batch, rng, fields).items():
                rates[name].append(rate)
        base = np.array(rates["format 5, unchecked (trust)"])
        print(f" {what}:")
        for name, values in rates.items():
            ratios = np.array(values) / base
            print(
                f"  {name:<28} {np.median(values):8.1f} sequences/s   ratio to unchecked: median "
                f"{np.median(ratios):.3f} (quartiles {np.quantile(ratios, 0.25):.3f}-{np.quantile(ratios, 0.75):.3f})"
            )
    print("  goal: checked / unchecked >= 0.95")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
