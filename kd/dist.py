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


def broadcast_object(accelerator, fn):
    """`fn()` computed on the main process only, its (picklable) result returned on every process."""
    value = [fn() if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(value)
    return value[0]
