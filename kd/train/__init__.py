"""The training recipe, one room per concern (the loop itself reads top to bottom in train_student.py):

step.py      the loss plan chosen at set-up, one optimizer window (accumulation and THE normalisation), evaluate
model.py     the trained module: student LM + feature projectors
data.py      steps per epoch, the per-epoch order of sequences, the loader
state.py     the run's state (a dataclass), EMA weights, the metrics log, peak memory
checkpoint.py  the run directory, resumable checkpoints, the final save_pretrained folder
"""

from kd.train.data import epoch_order, make_loader, steps_per_epoch
from kd.train.model import DistillModel
from kd.train.state import EMA, RUN_FORMAT_VERSION, MetricsLog, TrainState, peak_memory_mb, read_metrics
from kd.train.step import (
    LossPlan,
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
