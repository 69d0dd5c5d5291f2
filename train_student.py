"""The training pass, as the user's `accelerate launch train_student.py --config ...` runs it from a clone.

The pass itself is kd/train_student.py (installed with kd as `kd train`, or `accelerate launch -m kd train`); this
file is the same entry point, kept where the project's layout puts it.
"""

from kd.errors import run_cli
from kd.train_student import cli, main  # noqa: F401  (main: the entry point tests and tools call with a config)

if __name__ == "__main__":
    run_cli(lambda: cli(prog="train_student.py"))
