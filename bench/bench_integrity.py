"""Cost of integrity checking on read: the same shards with and without HDF5's per-chunk fletcher32 checksums.

    python bench/bench_integrity.py [--cache caches/shakespeare_smollm2] [--shards 4] [--rounds 3]

Copies `--shards` train shards of an existing cache twice, dataset by dataset with the same chunking: once with a
fletcher32 checksum per chunk (what cache_teacher.py writes from format version 4 on; HDF5 checks it on every
read) and once without. Then reads every sequence of the copies through kd.cache.CacheSplit (all fields the
demo's training step reads, plus the shard-vs-manifest check on open), in a shuffled order, warm page cache,
alternating the two copies for `--rounds` rounds; the best round of each is kept. Prints sequences/s and the ratio.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.cache import MANIFEST, CacheSplit  # noqa: E402


def copy_cache(src: Path, dst: Path, shards: int, checksum: bool) -> dict:
    dst.mkdir(parents=True)
    m = json.loads((src / MANIFEST).read_text())
    m["splits"]["train"]["shards"] = m["splits"]["train"]["shards"][:shards]
    m["splits"]["train"]["num_sequences"] = sum(s["num_sequences"] for s in m["splits"]["train"]["shards"])
    for rec in m["splits"]["train"]["shards"]:
        with h5py.File(src / rec["file"], "r") as fi, h5py.File(dst / rec["file"], "w") as fo:
            for k, v in fi.attrs.items():
                fo.attrs[k] = v
            for name, ds in fi.items():
                chunks = ds.chunks or (ds.shape if ds.shape else None)
                kw = {"chunks": chunks, "maxshape": ds.maxshape} if chunks else {}
                fo.create_dataset(
                    name,
                    data=ds[()],
                    dtype=ds.dtype,
                    fletcher32=checksum and bool(chunks) and ds.dtype.kind != "O",
                    **kw,
                )
    (dst / MANIFEST).write_text(json.dumps(m))
    return m


def read_all(root: Path, manifest: dict, order: np.ndarray) -> float:
    split = CacheSplit(root, manifest, "train", ("input_ids", "sample_ids", "sample_counts", "hidden_states"))
    t0 = time.perf_counter()
    for i in order:
        split[int(i)]
    return len(order) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="caches/shakespeare_smollm2")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kd-bench-integrity-"))
    src = Path(args.cache)
    with_ck = copy_cache(src, work / "with", args.shards, True)
    without = copy_cache(src, work / "without", args.shards, False)
    n = with_ck["splits"]["train"]["num_sequences"]
    order = np.random.default_rng(0).permutation(n)
    for root, m in ((work / "with", with_ck), (work / "without", without)):
        read_all(root, m, order[:8])  # warm the page cache and imports
    best = {"with": 0.0, "without": 0.0}
    for _ in range(args.rounds):
        for name, m in (("without", without), ("with", with_ck)):
            best[name] = max(best[name], read_all(work / name, m, order))
    size = {k: sum(p.stat().st_size for p in (work / k).glob("*.h5")) for k in best}
    print(f"{n} sequences in {args.shards} shards, all read in a shuffled order, best of {args.rounds} rounds")
    print(f"  without checksums: {best['without']:8.1f} sequences/s  ({size['without'] / 2**20:.1f} MiB)")
    print(f"  with fletcher32:   {best['with']:8.1f} sequences/s  ({size['with'] / 2**20:.1f} MiB)")
    print(f"  ratio with / without: {best['with'] / best['without']:.3f}  (goal >= 0.95)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
