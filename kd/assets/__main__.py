"""python -m kd.assets: fetch the offline assets, or print where one lives."""

from kd.assets import main
from kd.errors import run_cli

run_cli(main)
