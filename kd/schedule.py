"""Learning-rate schedules as pure functions of the OPTIMIZER step (never of micro-batches or processes).

`step` counts optimizer steps from 1 to `total_steps`. Warmup is linear from lr/warmup to lr over the first
`warmup_steps` steps; after it, `cosine` decays to `min_lr` along half a cosine, `linear` decays to `min_lr`
in a straight line, and `constant` stays at `lr`. `min_lr` is reached exactly at the last step and the LR is
positive at every step (min_lr > 0 is required by the config), so no step of the run is wasted at LR 0.
"""

from __future__ import annotations

import math

# The decay after warmup, by name: progress in (0, 1] (1 at the last step) -> the LR. A new schedule is one entry
# here plus its closed-form test (tests/test_train.py enumerates SCHEDULES).
SCHEDULES = {
    "cosine": lambda progress, lr, min_lr: min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)),
    "linear": lambda progress, lr, min_lr: lr + (min_lr - lr) * progress,
    "constant": lambda progress, lr, min_lr: lr,
}


def lr_at(step: int, *, schedule: str, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    if not 1 <= step <= total_steps:
        raise ValueError(f"step {step} outside the run's 1..{total_steps}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {tuple(SCHEDULES)}")
    if step <= warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in (0, 1], 1 at the last step
    return SCHEDULES[schedule](progress, lr, min_lr)
