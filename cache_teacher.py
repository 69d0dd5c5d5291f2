"""The caching pass, as the user's `accelerate launch cache_teacher.py --config ...` runs it from a clone.

The pass itself is kd/cache_teacher.py (installed with kd as `kd cache`, or `accelerate launch -m kd cache`); this
file is the same entry point, kept where the project's layout puts it.
"""

from kd.cache_teacher import cli, main  # noqa: F401  (main: the entry point tests and tools call with a config)
from kd.errors import run_cli

if __name__ == "__main__":
    run_cli(lambda: cli(prog="cache_teacher.py"))
