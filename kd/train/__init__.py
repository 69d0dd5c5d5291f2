"""Training a student against a cache, one room per concern:

recipe.py    the recipe train_student.py calls: setup (a Run), train (the loop), evaluate, finish
step.py      the loss plan chosen at set-up, one optimizer window (accumulation and THE normalisation), evaluate
backend.py   the back-ends (one process/DDP, FSDP2, DeepSpeed): what each refuses, how a window accumulates and ends
model.py     the trained module (student LM + feature projectors) and the student built from the config
data.py      steps per epoch, the per-epoch order of sequences, the loader
state.py     the run's state (a dataclass), EMA weights, the metrics log, peak memory
checkpoint.py  the run directory, resumable checkpoints, the final save_pretrained folder
generations.py  chat replies to held-out prompts at every eval

The package namespace holds the building blocks; the recipe is imported as kd.train.recipe.
"""

from kd.train.data import epoch_order, make_loader, steps_per_epoch
from kd.train.model import DistillModel
from kd.train.state import EMA, RUN_FORMAT_VERSION, MetricsLog, TrainState, peak_memory_mb, read_metrics
from kd.train.step import (
    LossPlan,
    StepResult,
    WindowResult,
    accumulate_window,
    batch_counts,
    contrastive_positions,
    eval_record,
    evaluate,
    micro_batch_sums,
    optimizer_step,
    positions,
)

__all__ = [
    "EMA",
    "RUN_FORMAT_VERSION",
    "DistillModel",
    "LossPlan",
    "MetricsLog",
    "StepResult",
    "TrainState",
    "WindowResult",
    "accumulate_window",
    "batch_counts",
    "contrastive_positions",
    "epoch_order",
    "eval_record",
    "evaluate",
    "make_loader",
    "micro_batch_sums",
    "optimizer_step",
    "peak_memory_mb",
    "positions",
    "read_metrics",
    "steps_per_epoch",
]
