"""The back-end side of one optimizer window: how a micro-batch's gradient is accumulated, and how the window ends
(clip and step, or skip). Everything else of the step (the loss plan, the sums, THE normalisation) is the same on
every back-end, in kd/train/step.py.

Two implementations, picked from the prepared model (`backend_for`):

- `AccelerateBackend`: one process, DDP (one node or many) and FSDP2, all through Accelerate's own calls:
  `no_sync` on every micro-batch but the last, `accelerator.backward` (kd creates the Accelerator with
  gradient_accumulation_steps=1, so it divides by nothing), `clip_grad_norm_`, then `optimizer.step()` or, on a
  skipped window, `zero_grad` (and the fp16 scaler's update, as its own skipped step would do). Under FSDP2 the
  same calls are right as they stand: `no_sync` is FSDP2's `set_requires_gradient_sync(False)` (unsharded
  gradients accumulate locally, one reduce-scatter on the window's last micro-batch), the norm is the global one
  over the gradient shards (Accelerate's DTensor-aware clipping), and a skipped window's `zero_grad` drops the
  sharded gradients before any optimizer state is touched.
- `DeepSpeedBackend`: the DeepSpeed engine owns accumulation, clipping and the step, and `accelerator.backward`
  would call `engine.step()` on every micro-batch under kd's hand-made accumulation. So kd drives the engine itself:
  every micro-batch is `engine.backward(loss, scale_wrt_gas=False)` (kd's loss is already normalised over the
  window: no division by the engine's accumulation steps), with the accumulation boundary set on the window's last
  one, then ONE `engine.step()`. A window kd skips (a non-finite loss term on any process) gets its last
  micro-batch's loss multiplied by NaN, so that DeepSpeed's own overflow path discards it: ZeRO clears its
  accumulated and partitioned gradients and buffers, leaves weights and optimizer state as they were, and under fp16
  lowers its loss scale (as torch's scaler does). kd then reads `engine.was_step_applied()` and refuses to continue
  if a window it skipped was applied. Reaching into ZeRO's partitions to clear them by hand is what this avoids.
"""

from __future__ import annotations

import contextlib
import math

import torch

from kd.errors import KDError

# DeepSpeed releases whose engine this contract was verified against (tests/test_deepspeed.py, real ZeRO-2 and
# ZeRO-3 engines on CPU): older ones need not treat a non-finite gradient norm as an overflow in fp32 and bf16.
MIN_DEEPSPEED = (0, 19)


class AccelerateBackend:
    """One process, DDP, FSDP2: Accelerate's calls (module docstring)."""

    def __init__(self, accelerator, sharded: bool = False):
        self.accelerator = accelerator
        # parameters partitioned over the processes (FSDP2): every process must run the same forwards
        self.sharded = sharded

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, "sum")

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def micro_batch(self, model, last: bool):
        """Around a micro-batch's forward and backward: gradients are all-reduced once per window, on its last."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    @contextlib.contextmanager
    def whole_root(self, model):
        """Around a call of the inner student LM that bypasses the prepared model's own forward (chat generations).
        Under FSDP2 the prepared model's own group (embeddings, final norm, LM head, projectors: Accelerate wraps
        only the decoder layers apart, kd/train/model.py) is gathered only by that forward's hook: it is gathered
        here for the call and freed after it; each decoder layer gathers itself in its own forward. A collective:
        every process enters. Elsewhere nothing to do (DDP holds whole weights; ZeRO-3 gathers every module in its
        own hooks)."""
        gather = self.sharded and hasattr(model, "unshard")
        if gather:
            model.unshard()
        try:
            yield
        finally:
            if gather:
                model.reshard()

    def backward(self, model, loss: torch.Tensor, last: bool, skip: bool) -> None:
        # Always backward, even when non-finite: skipping it on one process would deadlock DDP's all-reduce; the
        # window is then skipped in finish() on every process.
        self.accelerator.backward(loss)

    def finish(self, model, optimizer, skip: bool, max_grad_norm: float | None) -> tuple[float, bool]:
        """Clip, then step unless the window is skipped (`skip`, or a non-finite gradient norm).
        Returns (the gradient norm before clipping, whether the step was applied)."""
        grad_norm = float(self.accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf))
        if skip or not math.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            if self.accelerator.scaler is not None:
                self.accelerator.scaler.update()
            return grad_norm, False
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, True


class DeepSpeedBackend(AccelerateBackend):
    """The DeepSpeed engine driven directly (module docstring). `reduce_sum` and `unwrap` default to Accelerate's;
    tests pass their own to drive a bare engine (deepspeed.initialize) without an Accelerator."""

    def __init__(self, accelerator, engine, reduce_sum=None, num_processes: int | None = None):
        super().__init__(accelerator, sharded=engine.zero_optimization_stage() == 3)
        self.engine = engine
        self._reduce, self._world = reduce_sum, num_processes

    @property
    def num_processes(self) -> int:
        return self._world if self._world is not None else self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.engine.device if self.accelerator is None else self.accelerator.device

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t) if self._reduce is not None else super().reduce_sum(t)

    def unwrap(self, model):
        return self.engine.module

    def micro_batch(self, model, last: bool):
        return contextlib.nullcontext()  # the engine reduces at the boundary set in backward()

    def backward(self, model, loss: torch.Tensor, last: bool, skip: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        if last and skip:
            loss = loss * float("nan")  # DeepSpeed's overflow path then discards the whole window (docstring)
        self.engine.backward(loss, scale_wrt_gas=False)

    def finish(self, model, optimizer, skip: bool, max_grad_norm: float | None) -> tuple[float, bool]:
        # the engine clips to its gradient_clipping (kd sets it to train.max_grad_norm: configure_deepspeed)
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        if skip and applied:
            raise KDError(
                "DeepSpeed applied an optimizer step whose loss was non-finite: this DeepSpeed release does not "
                "discard a non-finite window as kd requires (verified from DeepSpeed "
                f"{'.'.join(map(str, MIN_DEEPSPEED))}); install that or a later one, or train with DDP"
            )
        norm = self.engine.get_global_grad_norm()  # inf after DeepSpeed's overflow path
        return (float(norm) if norm is not None else math.nan), applied


def backend_for(accelerator, model) -> AccelerateBackend:
    """The backend of a prepared model: DeepSpeed's engine, or Accelerate's calls (FSDP2 marks it sharded)."""
    from kd.dist import backend_kind

    kind = backend_kind(accelerator)
    if kind == "DEEPSPEED":
        return DeepSpeedBackend(accelerator, model)
    return AccelerateBackend(accelerator, sharded=kind == "FSDP")


def as_backend(accelerator_or_backend) -> AccelerateBackend:
    """Accept an Accelerator (one process, DDP: tests and benches) where a backend is expected."""
    if isinstance(accelerator_or_backend, AccelerateBackend):
        return accelerator_or_backend
    return AccelerateBackend(accelerator_or_backend)
