"""python -m kd.cache info|verify|export: inspect, verify or export a teacher cache."""

from __future__ import annotations

import argparse
import sys

from kd.cache.export import export
from kd.cache.verify import summary, verify
from kd.config import at_least
from kd.errors import run_cli


def main(argv: list[str] | None = None, prog: str = "python -m kd.cache") -> None:
    parser = argparse.ArgumentParser(prog=prog, description="Inspect, verify or export a teacher cache.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for cmd in ("info", "verify"):
        sub.add_parser(cmd).add_argument("dir")
    ex = sub.add_parser(
        "export", help="write splits as a Hugging Face datasets folder of Parquet files (kd/cache/export.py)"
    )
    ex.add_argument("dir")
    ex.add_argument("out")
    ex.add_argument("--splits", nargs="+", default=None)
    ex.add_argument("--rows-per-file", type=at_least(1), default=4096)
    args = parser.parse_args(argv)
    if args.cmd == "info":
        print(summary(args.dir))
        return
    if args.cmd == "export":
        export(args.dir, args.out, args.splits, args.rows_per_file)
        return
    problems = verify(args.dir)
    if problems:
        print(f"verify FAILED: {problems[0]}", file=sys.stderr)
        sys.exit(1)
    print(f"verify ok: {args.dir}")


if __name__ == "__main__":
    run_cli(main)
