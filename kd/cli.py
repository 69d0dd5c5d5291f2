"""The `kd` command: every entry point of an installed kd, as subcommands of one command.

    kd cache --config shakespeare_smollm2          the caching pass (kd/cache_teacher.py)
    kd train --config train_shakespeare            the training pass (kd/train_student.py)
    accelerate launch -m kd train --config ...     either pass on several processes or GPUs

One command rather than one script per tool, because Accelerate's launcher takes one module (`-m kd`) and passes the
rest on: `accelerate launch -m kd train ...` is the multi-GPU form of `kd train ...`, with nothing else to install or
find on PATH. Each subcommand is also its module's own `python -m` entry (`python -m kd.evaluate`, ...), and from a
clone the two passes are the top-level cache_teacher.py and train_student.py, the same entry points.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from kd import __version__
from kd.errors import KDError, run_cli
from kd.paths import resolve_config, shipped_configs, shipped_configs_dir


@dataclass(frozen=True)
class Command:
    module: str  # imported when the command runs, so `kd --help` and a mistyped command load no torch
    function: str  # called with (argv, prog)
    help: str
    prefix: tuple[str, ...] = ()  # argv put before the user's (the cache tools are subcommands of kd.cache's parser)


COMMANDS = {
    "cache": Command("kd.cache_teacher", "cli", "run the teacher once over a corpus and write its cache"),
    "train": Command("kd.train_student", "cli", "train a student against a cache (no teacher in memory)"),
    "evaluate": Command("kd.evaluate", "main", "score a model on a cache's held-out split, or on text"),
    "info": Command("kd.cache.__main__", "main", "describe a cache: its teacher, splits, fields and sizes", ("info",)),
    "verify": Command(
        "kd.cache.__main__", "main", "check every shard of a cache, its checksums and contents", ("verify",)
    ),
    "export": Command("kd.cache.__main__", "main", "write a cache's splits as a Hugging Face dataset", ("export",)),
    "prune": Command("kd.prune.__main__", "main", "cut a smaller student from the cache's teacher"),
    "report": Command("kd.report", "main", "draw a run's curves and summarise it"),
    "sweep": Command("kd.sweep", "main", "run a grid of trainings on one cache and tabulate them"),
    "assets": Command("kd.assets", "main", "fetch the offline assets (real teachers, tokenizers, Shakespeare)"),
    "configs": Command("kd.cli", "configs", "list the shipped configs, or print where one lives"),
}


def configs(argv: list[str], prog: str) -> None:
    """`kd configs`: each shipped config's name and first comment line; `kd configs NAME`: its path (for
    `accelerate launch --config_file`, or to copy and edit)."""
    ap = argparse.ArgumentParser(prog=prog, description=COMMANDS["configs"].help)
    ap.add_argument("name", nargs="?", help="a shipped config's name, e.g. train_shakespeare or accelerate/fsdp2")
    args = ap.parse_args(argv)
    if args.name is not None:
        print(resolve_config(args.name))
        return
    root = shipped_configs_dir()
    for name in shipped_configs():
        lines = (root / f"{name}.yaml").read_text().splitlines()
        first = next((line.lstrip("# ").strip() for line in lines if line.startswith("#")), "")
        print(f"{name:<28} {first if len(first) <= 90 else first[:87] + '...'}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    usage = "\n".join(f"  {name:<10} {c.help}" for name, c in COMMANDS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: kd COMMAND [args] (kd COMMAND --help for its own)\n\n{__doc__.split(chr(10) * 2)[0]}\n")
        print(f"commands:\n{usage}")
        return
    if argv[0] in ("-V", "--version"):
        print(f"kd {__version__}")
        return
    command = COMMANDS.get(argv[0])
    if command is None:
        raise KDError(f"unknown command '{argv[0]}'; the commands are: {', '.join(COMMANDS)} (kd --help)")
    function = getattr(importlib.import_module(command.module), command.function)
    prog = "kd" if command.prefix else f"kd {argv[0]}"
    function([*command.prefix, *argv[1:]], prog)


def run() -> None:
    """The console script `kd` (pyproject.toml) and `python -m kd`: a KDError is one line and exit 2."""
    run_cli(main)
