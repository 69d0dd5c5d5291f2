"""The reader at 100,000 shards: open time, memory and a full read in training order under `ulimit -n 256`.

    python bench/bench_shards.py [--shards 1000,100000] [--dir /tmp/kd-bench-shards]

For each shard count, a cache of that many one-sequence shards (16 tokens, top-4 targets, no hidden states: tiny,
so that the count, not the bytes, is what grows) is written with the real writer (kd.cache.ShardWriter and
write_shard_index; synthetic values, no teacher), then read in a child process limited to 256 open files: open
the cache and its train split (timed), every sequence read once in the shard-aware training order
(kd.train.epoch_order, 8-shard buffer) and its ids checked against what was written, then the process's peak RSS
and the split's pickled size (what each DataLoader worker receives). The caches are kept under --dir for re-runs.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T, K, VOCAB = 16, 4, 1000


def build(out: Path, n: int) -> None:
    from kd.cache import FORMAT, FORMAT_VERSION, MANIFEST, ShardWriter, shard_name, write_shard_index
    from kd.cache.codecs import codec_specs
    from kd.io import write_json_atomic
    from kd.teacher import TeacherOutputs

    if (out / MANIFEST).exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config_hash": hashlib.sha256(f"bench-shards-{n}".encode()).hexdigest(),
        "teacher": {"name_or_path": "synthetic", "model_type": "none", "vocab_size": VOCAB, "hidden_size": 8},
        "top_k": K,
        "hidden_layers": [],
        "seq_len": T,
        "sample_n": 0,
        "store_text": False,
        "codecs": codec_specs(VOCAB, "bitpack", "q8", "fp16", 0),
    }
    rng = np.random.default_rng(0)
    t0 = time.time()
    splits = {}
    for split, count in (("train", n), ("eval", 1)):
        records = []
        for j in range(count):
            w = ShardWriter(out / shard_name(split, j), dict(meta, split=split, shard_index=j, first_sequence=j), 1)
            ids = (np.arange(T) + j) % VOCAB
            lp = np.sort(np.log(rng.dirichlet(np.ones(K) * 0.5, size=(1, T)) * 0.9), axis=-1)[..., ::-1]
            top = np.stack([(ids + d) % VOCAB for d in range(1, K + 1)], -1)[None]
            w.append(TeacherOutputs(ids[None], np.array([T]), np.array([j]), top, lp))
            records.append(dict(w.commit(), num_documents=1))
            if split == "train" and (j + 1) % 10000 == 0:
                print(f"  wrote {j + 1} shards, {time.time() - t0:.0f} s", flush=True)
        splits[split] = {
            "num_sequences": count,
            "num_tokens": count * T,
            "num_documents": count,
            "shard_index": write_shard_index(out, split, records),
        }
    write_json_atomic(out / MANIFEST, dict(meta, splits=splits, bytes=0, bytes_per_token=0))
    print(f"  built {n} shards in {time.time() - t0:.0f} s", flush=True)


CHILD = """
import pickle, resource, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
sys.path.insert(0, {root!r})
import numpy as np
from kd.cache import TeacherCache
from kd.train import epoch_order
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
split = TeacherCache({out!r}).split("train", ("input_ids", "topk_ids", "topk_logprobs"))
t_open = time.perf_counter() - t0
pickled = len(pickle.dumps(split))
rss_open = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
order = epoch_order(len(split), 0, 0, 0, 1, 1, split.starts, 8)
t0 = time.perf_counter()
for i in order:
    ids = split[int(i)]["input_ids"].numpy()
    assert ids[0] == i % {vocab} and len(ids) == {T}, (i, ids)
t_read = time.perf_counter() - t0
print(len(order), t_open, pickled, rss0, rss_open, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, t_read)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", default="1000,100000")
    ap.add_argument("--dir", default="/tmp/kd-bench-shards")
    args = ap.parse_args()
    rows = []
    for n in (int(x) for x in args.shards.split(",")):
        out = Path(args.dir) / f"c{n}"
        build(out, n)
        r = subprocess.run(
            [sys.executable, "-c", CHILD.format(root=str(ROOT), out=str(out), vocab=VOCAB, T=T)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise SystemExit(f"reading {n} shards failed:\n{r.stderr[-3000:]}")
        read, t_open, pickled, rss0, rss_open, rss_end, t_read = r.stdout.split()
        rows.append((n, int(read), float(t_open), int(pickled), int(rss0), int(rss_open), int(rss_end), float(t_read)))
        manifest = (out / "manifest.json").stat().st_size
        print(
            f"{n} shards: manifest {manifest} bytes, index {(out / 'train-shards.npy').stat().st_size} bytes",
            flush=True,
        )
    print(
        "\nulimit -n 256 in the reading process; one sequence per shard, read in the shard-aware order (8-shard buffer)\n"
    )
    print(
        f"{'shards':>8}{'read':>9}{'open s':>9}{'split pickled MB':>18}{'RSS MB: start':>15}{'after open':>12}{'after read':>12}{'seq/s':>9}"
    )
    for n, read, t_open, pickled, rss0, rss_open, rss_end, t_read in rows:
        print(
            f"{n:>8}{read:>9}{t_open:>9.3f}{pickled / 2**20:>18.2f}{rss0 / 1024:>15.0f}{rss_open / 1024:>12.0f}"
            f"{rss_end / 1024:>12.0f}{read / t_read:>9.0f}"
        )


if __name__ == "__main__":
    main()
