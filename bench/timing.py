"""The timed training step the benchmarks share: accumulate_window over a micro-batch, then the optimizer step."""

from __future__ import annotations

import time


def timed_steps(model, batches, plan, accelerator, optimizer, warmup: int = 2) -> list[float]:
    """Seconds of each step after the first `warmup`: one accumulate_window over one micro-batch, AdamW step, zero
    grad (CUDA synchronised before the clock stops). Batches move to the device outside the timed part."""
    import torch

    from kd.train import accumulate_window

    dev = accelerator.device
    times = []
    for i, batch in enumerate(batches):
        batch = {n: v.to(dev) for n, v in batch.items()}
        t0 = time.perf_counter()
        accumulate_window(model, [batch], plan, accelerator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times
