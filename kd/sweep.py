"""Run a grid of trainings on one cache, one after the other, and print a table of final eval metrics.

    kd sweep --config train_shakespeare train.lr=1e-4,3e-4 loss.alpha_kd=0.5,0.9

A key with comma-separated values is swept (the grid is their product); a key with one value applies to every
run. Run names are `<train.run_name>-<i>`; each run is a normal run directory. Values containing commas (lists)
cannot be swept; put them in the YAML. Runs go through `python -m kd.train_student`, one process each.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
from pathlib import Path

from kd.config import load_config
from kd.errors import KDError, run_cli
from kd.paths import resolve_config
from kd.train import read_metrics
from kd.train_config import TrainConfig

METRICS = ("eval/ce", "eval/ppl", "eval/kd", "eval/top1_agreement")


def expand(overrides: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    fixed, swept = [], []
    for o in overrides:
        if "=" not in o:
            raise KDError(f"override '{o}' must look like key=value or key=v1,v2")
        key, value = o.split("=", 1)
        values = value.split(",") if "," in value and not value.strip().startswith("[") else [value]
        (swept.append((key, values)) if len(values) > 1 else fixed.append(o))
    return fixed, swept


def main(argv: list[str] | None = None, prog: str = "kd sweep") -> list[dict]:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML config file, or a shipped config's name (`kd configs`)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    args.config = str(resolve_config(args.config))
    fixed, swept = expand(args.overrides)
    base = load_config(TrainConfig, args.config, fixed)  # fail on a bad key before any run starts
    grid = list(itertools.product(*[[f"{k}={v}" for v in vs] for k, vs in swept])) or [()]
    for combo in grid:
        load_config(TrainConfig, args.config, fixed + list(combo))
    rows = []
    for i, combo in enumerate(grid):
        name = f"{base.train.run_name}-{i}"
        cmd = [
            sys.executable,
            "-m",
            "kd.train_student",
            "--config",
            args.config,
            *fixed,
            *combo,
            f"train.run_name={name}",
        ]
        print(f"[sweep] run {i + 1}/{len(grid)}: {' '.join(combo) or '(base config)'} -> {name}", flush=True)
        result = subprocess.run(cmd)
        run_dir = Path(base.train.output_dir) / name
        row = {
            "run": name,
            "overrides": " ".join(combo),
            "status": "ok" if result.returncode == 0 else f"exit {result.returncode}",
        }
        if result.returncode == 0:
            final = [r for r in read_metrics(run_dir) if "eval/ce" in r][-1]
            row.update({m: final[m] for m in METRICS})
        rows.append(row)
    width = max(len(r["overrides"]) for r in rows) + 2
    print("\n" + f"{'run':<24}{'overrides':<{width}}" + "".join(f"{m:>22}" for m in METRICS) + "  status")
    for r in rows:
        vals = "".join(f"{r[m]:>22.4f}" if m in r else f"{'-':>22}" for m in METRICS)
        print(f"{r['run']:<24}{r['overrides']:<{width}}{vals}  {r['status']}")
    if any(r["status"] != "ok" for r in rows):
        sys.exit(1)
    return rows


if __name__ == "__main__":
    run_cli(lambda: main(prog="python -m kd.sweep"))
