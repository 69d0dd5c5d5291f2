"""`--dry-run` against the real thing, at the demo's scale: the cache plan of each cache config against its written
cache (bytes, windows, shards), and the training plan's peak memory per device against the peak resident size a
real run logs over its first steps, each in a process of its own (as a user runs them).

    python bench/bench_plan.py                      # the demo cache (caches/shakespeare_smollm2 must exist: kd cache)
    python bench/bench_plan.py --students train_shakespeare train_pruned --steps 3

Prints one row per comparison and the ratio estimate / measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def kd(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "kd", *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"kd {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return out.stdout


def plan_lines(text: str) -> dict[str, str]:
    return {line.split()[0]: line for line in text.splitlines() if line.strip()}


def cache_row(config: str) -> None:
    lines = plan_lines(kd("cache", "--config", config, "--dry-run"))
    cache_dir = ROOT / yaml.safe_load(Path(kd("configs", config).strip()).read_text())["cache"]["output_dir"]
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    est = float(lines["cache"].split()[1].replace(",", "")) * 2**30
    windows = {s: manifest["splits"][s]["num_sequences"] for s in ("train", "eval")}
    shards = sum(manifest["splits"][s]["shard_index"]["num_shards"] for s in ("train", "eval"))
    print(
        f"cache {config:<28} bytes: estimate {est / 2**20:8.1f} MiB, real {manifest['bytes'] / 2**20:8.1f} MiB, "
        f"ratio {est / manifest['bytes']:.3f}; windows real {windows}, shards real {shards}"
    )
    print(f"      plan: {lines['windows']} | {lines['shards']}")


def train_row(config: str, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "--config",
            config,
            f"train.output_dir={tmp}",
            "train.run_name=plan",
            f"train.max_steps={steps}",
            "train.eval_every=1000",
            "train.checkpoint_every=0",
            "train.num_workers=0",
        ]
        lines = plan_lines(kd("train", "--dry-run", *args))
        kd("train", *args)
        records = [json.loads(line) for line in open(Path(tmp) / "plan" / "metrics.jsonl")]
    measured = max(r["peak_mem_mb"] for r in records if "peak_mem_mb" in r)
    est = float(lines["memory"].split("~")[1].split()[0].replace(",", ""))
    print(
        f"train {config:<28} peak memory: estimate {est:8.0f} MiB, measured {measured:8.0f} MiB (peak RSS), "
        f"ratio {est / measured:.3f}"
    )
    print(f"      plan: {lines['memory']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--caches", nargs="*", default=["shakespeare_smollm2"])
    ap.add_argument("--students", nargs="*", default=["train_shakespeare", "train_pruned"])
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    for config in args.caches:
        cache_row(config)
    for config in args.students:
        train_row(config, args.steps)


if __name__ == "__main__":
    main()
