"""The few collective operations the scripts need, on top of Accelerate (no distributed engine of our own)."""

from __future__ import annotations

import numpy as np

from kd.errors import KDError


def gather_rows(accelerator, row: list[int]) -> np.ndarray:
    """Every process's `row` of integers as [num_processes, len(row)] (an all-gather; a copy on one process)."""
    import torch

    t = torch.tensor([row], dtype=torch.int64, device=accelerator.device)
    return accelerator.gather(t).cpu().numpy().reshape(accelerator.num_processes, len(row))


def agree(accelerator, fn):
    """Run `fn()` on every process; if it raises KDError on any, raise on all (the failing one with its own message),
    so that no process waits forever at the next collective for one that has already stopped."""
    error, result = None, None
    try:
        result = fn()
    except KDError as e:
        error = e
    failed = gather_rows(accelerator, [int(error is not None)])[:, 0]
    if failed.any():
        if error is not None:
            raise error
        raise KDError(f"process {int(np.nonzero(failed)[0][0])} stopped with an error (printed above)")
    return result


# Accelerate back-ends the trainer has been verified on. Under the others a guarantee would silently break:
# DeepSpeed's `accelerator.backward` steps the engine on every micro-batch (kd accumulates by hand, with
# gradient_accumulation_steps=1, so sync_gradients is always true), before the non-finite check can skip a window,
# and with the engine's own loss scaling over its accumulation steps; FSDP's checkpoints and final save would need
# sharded / full state dicts handled on purpose, which kd does not do yet. DDP (one node or many) is tested.
TRAINING_BACKENDS = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA", "MULTI_HPU")


def check_training_backend(accelerator) -> None:
    """Refuse an Accelerate back-end the trainer does not handle correctly yet, before anything loads."""
    kind = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    if kind in ("DEEPSPEED", "FSDP"):
        raise KDError(
            f"train_student.py does not support Accelerate's {kind} back-end yet: under DeepSpeed the optimizer "
            "would step on every micro-batch (kd accumulates and normalises the window itself) and skip no "
            "non-finite window; under FSDP checkpoints and the final save are not gathered on purpose. Launch with "
            "DDP instead (accelerate launch --config_file configs/accelerate/ddp.yaml, or a config with "
            "distributed_type: MULTI_GPU)"
        )
    if kind not in TRAINING_BACKENDS:
        raise KDError(
            f"train_student.py has not been verified on Accelerate's {kind} back-end; launch with DDP "
            "(distributed_type: MULTI_GPU or MULTI_CPU) or one process"
        )
