"""Behaviour unchanged? Compare two caches field by field and two training runs metric by metric.

    python bench/equivalence.py caches DIR_A DIR_B    # every field of every sequence of every split, decoded
    python bench/equivalence.py runs RUN_A RUN_B      # every numeric field of metrics.jsonl but timings, final/ weights
    bash bench/equivalence.sh REV_A REV_B             # the demo config at two git revisions, then both comparisons

Exit 0 when identical, 1 with the first differences listed. "Identical" is bitwise: decoded arrays compared with
np.array_equal (NaN equal to NaN), metrics compared as the floats json parsed. What legitimately differs between two
runs of the same content is left out and named: wall-clock timings, the cache's creation time and ingest seconds,
the output paths a config names.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

# metrics.jsonl keys that measure the machine, not the computation
TIMING_KEYS = {"tokens_per_s", "elapsed_s", "step_cpu_s", "peak_mem_mb"}
# manifest keys that describe one run of the pass, not the cache's content
RUN_KEYS = {"created_unix"}


def _strip_run_keys(manifest: dict) -> dict:
    out = {k: v for k, v in manifest.items() if k not in RUN_KEYS}
    if "ingest" in out:
        out["ingest"] = {k: v for k, v in out["ingest"].items() if k != "seconds"}
    cfg = json.loads(json.dumps(out.get("config", {})))
    cfg.get("cache", {}).pop("output_dir", None)
    out["config"] = cfg
    return out


def _diff_json(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                diffs.append(f"{path}.{k}: only in {'B' if k not in a else 'A'}")
            else:
                diffs += _diff_json(a[k], b[k], f"{path}.{k}")
        return diffs
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff_json(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def compare_caches(dir_a: str, dir_b: str) -> list[str]:
    import torch

    from kd.cache import TeacherCache
    from kd.cache.reader import CacheSplit

    a, b = TeacherCache(dir_a), TeacherCache(dir_b)
    diffs = [f"manifest{d}" for d in _diff_json(_strip_run_keys(a.manifest), _strip_run_keys(b.manifest))]
    checked = 0
    for split in sorted(a.manifest["splits"]):
        sa, sb = a.split(split, CacheSplit.ALL_FIELDS), b.split(split, CacheSplit.ALL_FIELDS)
        if len(sa) != len(sb):
            diffs.append(f"{split}: {len(sa)} != {len(sb)} sequences")
            continue
        for i in range(len(sa)):
            ra, rb = sa[i], sb[i]
            for name in sorted(set(ra) | set(rb)):
                va, vb = ra.get(name), rb.get(name)
                if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
                    same = va.dtype == vb.dtype and np.array_equal(va.numpy(), vb.numpy(), equal_nan=True)
                else:
                    same = va == vb
                if not same:
                    diffs.append(f"{split}[{i}].{name} differs")
            checked += 1
    # and the files themselves: shards, the low-rank basis, the shard indexes, byte for byte
    from kd.io import sha256_file

    files = sorted({p.name for d in (dir_a, dir_b) for p in Path(d).iterdir() if p.suffix in (".h5", ".npy")})
    for name in files:
        pa, pb = Path(dir_a) / name, Path(dir_b) / name
        if not (pa.exists() and pb.exists()) or sha256_file(pa) != sha256_file(pb):
            diffs.append(f"{name}: not byte-identical")
    print(
        f"[equivalence] caches: {checked} sequences compared, every field decoded; {len(files)} shard, basis and "
        "index files compared byte for byte",
        flush=True,
    )
    return diffs


def _metrics(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def compare_runs(run_a: str, run_b: str) -> list[str]:
    a, b = Path(run_a), Path(run_b)
    ma, mb = _metrics(a), _metrics(b)
    diffs = [] if len(ma) == len(mb) else [f"metrics.jsonl: {len(ma)} != {len(mb)} records"]
    for i, (ra, rb) in enumerate(zip(ma, mb)):
        diffs += [f"metrics.jsonl line {i + 1}{d}" for d in _diff_json(ra, rb)]
    numbers = sum(isinstance(v, (int, float)) for r in ma for v in r.values())
    weights = 0
    if (a / "final").is_dir() and (b / "final").is_dir():
        from safetensors.numpy import load_file

        for fa in sorted((a / "final").glob("*.safetensors")):
            ta, tb = load_file(fa), load_file(b / "final" / fa.name)
            for name in sorted(set(ta) | set(tb)):
                if name not in ta or name not in tb or not np.array_equal(ta[name], tb[name]):
                    diffs.append(f"final/{fa.name}: tensor {name} differs")
                weights += 1
    print(
        f"[equivalence] runs: {len(ma)} metric records ({numbers} numbers) compared, {weights} final tensors",
        flush=True,
    )
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["caches", "runs"])
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args()
    diffs = (compare_caches if args.what == "caches" else compare_runs)(args.a, args.b)
    for d in diffs[:20]:
        print(f"  {d}")
    print(f"[equivalence] {args.what}: " + ("IDENTICAL" if not diffs else f"{len(diffs)} differences"))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
