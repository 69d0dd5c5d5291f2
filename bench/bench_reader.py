"""Cache reader throughput in the training order: exact vs shard-aware shuffle, 1 and 2 DataLoader workers.

    python bench/bench_reader.py [--cache caches/shakespeare_smollm2] [--sequences 256] [--rounds 2]

Reads the train split of an existing cache (the demo's by default: run scripts/demo.sh first) with every field the
demo's training step reads (ids, top-k, sampled targets, hidden states), micro-batches of 4, through
`kd.train.make_loader` in the order `kd.train.epoch_order` gives for `train.shuffle: exact` and for `shards`
(buffer of 8 shards), with 1 and 2 worker processes, each configuration in its own process, alternating over
`--rounds`, best kept. Prints sequences/s and the ratio to what the demo's cached training step consumes
(8 sequences per optimizer step at the step time given by --step-seconds, 1.18 s measured by bench_train.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(cache_dir: str, shuffle: str, workers: int, sequences: int) -> dict:
    from kd.cache import TeacherCache
    from kd.train import epoch_order, make_loader

    split = TeacherCache(cache_dir).split("train")
    order = epoch_order(len(split), 0, 0, 0, 1, 4, split.starts if shuffle == "shards" else None, 8)[:sequences]
    it = iter(make_loader(split, order, 4, num_workers=workers, pin_memory=False))
    next(it)  # worker start-up is not steady state
    t0 = time.perf_counter()
    n = 4 * sum(1 for _ in it)
    return {"sequences_per_s": n / (time.perf_counter() - t0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="caches/shakespeare_smollm2")
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--step-seconds", type=float, default=1.18)
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.cache, args.child[0], int(args.child[1]), args.sequences)))
        return
    best: dict = {}
    for _ in range(args.rounds):
        for shuffle in ("exact", "shards"):
            for workers in (1, 2):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--cache",
                        args.cache,
                        "--sequences",
                        str(args.sequences),
                        "--child",
                        shuffle,
                        str(workers),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                rate = json.loads(out.split("RESULT ", 1)[1])["sequences_per_s"]
                best[(shuffle, workers)] = max(best.get((shuffle, workers), 0.0), rate)
    consumed = 8 / args.step_seconds
    print(f"\n{'order':<8}{'workers':>8}{'sequences/s':>13}{'x the demo step':>17}")
    for (shuffle, workers), rate in best.items():
        print(f"{shuffle:<8}{workers:>8}{rate:>13.1f}{rate / consumed:>17.1f}")


if __name__ == "__main__":
    main()
