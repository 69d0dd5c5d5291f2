"""`python -m kd COMMAND ...`, and under Accelerate's launcher `accelerate launch -m kd COMMAND ...` (kd/cli.py)."""

from kd.cli import run

run()
