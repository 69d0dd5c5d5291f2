"""Train a student against a teacher cache: no teacher in memory, one cache reused by every run.

    kd train --config train_shakespeare [dotted.key=value ...]               # one process
    accelerate launch -m kd train --config train_shakespeare [...]            # several (Accelerate's launcher)
    accelerate launch train_student.py --config configs/train_shakespeare.yaml   # the same, from a clone

Writes runs/<run_name>/: config.json, metrics.jsonl (one line per optimizer step and per eval), checkpoints/
(resumable Accelerate state), final/ (save_pretrained model + tokenizer + projectors) and final_ema/ when EMA
is on. `kd report runs/<run_name>` draws the curves.

The recipe lives in kd/train/recipe.py: `setup` checks every input before anything is written and builds the run
(cache, splits, schedule, student, optimizer, loss plan, logs); `train` evaluates the untrained student, then loops
one optimizer step at a time (LR from the pure schedule, the window's micro-batches with the losses normalised
once, a non-finite step skipped, clip, step; eval and checkpoint at optimizer-step boundaries); `finish` runs the
final eval and saves final/.
"""

from __future__ import annotations

from pathlib import Path

from kd.config import parse_cli
from kd.errors import run_cli
from kd.train import recipe
from kd.train.plan import plan
from kd.train_config import TrainConfig


def main(cfg: TrainConfig) -> Path:
    run = recipe.setup(cfg)
    if run is None:  # a resumed run that had already finished: nothing to do
        return Path(cfg.train.output_dir) / cfg.train.run_name
    try:
        ending = recipe.train(run)
        return recipe.finish(run, ending)
    finally:
        recipe.close(run)  # the run directory's lock, however the run ends


def cli(argv: list[str] | None = None, prog: str = "kd train") -> Path | None:
    """The command line: `--config FILE|NAME` (a path, or the name of a shipped config) plus dotted overrides;
    `--dry-run` prints the plan (steps, tokens, memory per device) and writes nothing."""
    run = parse_cli(TrainConfig, argv, __doc__.split("\n\n")[0], prog)
    if run.dry_run:
        print("\n".join(plan(run.cfg).lines()))
        return None
    return main(run.cfg)


if __name__ == "__main__":
    run_cli(lambda: cli(prog="python -m kd.train_student"))
