"""The trainer's back-ends, one place each: what is refused under it before anything loads (`check`), and the
back-end side of one optimizer window: how a micro-batch's gradient is accumulated, and how the window ends
(clip and step, or skip). Everything else of the step (the loss plan, the sums, THE normalisation) is the same on
every back-end, in kd/train/step.py.

Three entries in `BACKENDS` (keyed by Accelerate's distributed type; a type with no entry is refused), picked for the
prepared model by `backend_for`:

- `AccelerateBackend`: one process and DDP (one node or many), and `FSDP2Backend` the same calls on sharded
  parameters, all through Accelerate's own calls:
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
    """One process and DDP: Accelerate's calls (module docstring)."""

    # Accelerate's distributed types this entry runs (DDP on one node or many is tested end to end: 2 processes = 1)
    kinds = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA", "MULTI_HPU")

    @staticmethod
    def check(accelerator, tc) -> None:
        """Refuse what this back-end cannot do with the run's TrainConfig `tc`, before anything loads."""

    @classmethod
    def prepared(cls, accelerator, model) -> AccelerateBackend:
        """The backend of a model prepared by `accelerator`."""
        return cls(accelerator)

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


class FSDP2Backend(AccelerateBackend):
    """FSDP2: Accelerate's calls as they stand (module docstring), on parameters sharded over the processes."""

    kinds = ("FSDP",)

    @staticmethod
    def check(accelerator, tc) -> None:
        check_fsdp(accelerator.state.fsdp_plugin, tc)

    @classmethod
    def prepared(cls, accelerator, model) -> AccelerateBackend:
        return cls(accelerator, sharded=True)


class DeepSpeedBackend(AccelerateBackend):
    """The DeepSpeed engine driven directly (module docstring). `reduce_sum` and `unwrap` default to Accelerate's;
    tests pass their own to drive a bare engine (deepspeed.initialize) without an Accelerator."""

    kinds = ("DEEPSPEED",)

    @staticmethod
    def check(accelerator, tc) -> None:
        plugin = accelerator.state.deepspeed_plugin
        check_deepspeed(plugin.deepspeed_config, tc, getattr(plugin, "zero3_init_flag", False))

    @classmethod
    def prepared(cls, accelerator, model) -> AccelerateBackend:
        return cls(accelerator, model)  # the prepared model is the engine

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


def as_backend(accelerator_or_backend) -> AccelerateBackend:
    """Accept an Accelerator (one process, DDP: tests and benches) where a backend is expected."""
    if isinstance(accelerator_or_backend, AccelerateBackend):
        return accelerator_or_backend
    return AccelerateBackend(accelerator_or_backend)


# Accelerate's distributed type -> the entry that runs it; tests/test_backends.py enumerates every entry
BACKENDS: dict[str, type[AccelerateBackend]] = {
    kind: cls for cls in (AccelerateBackend, FSDP2Backend, DeepSpeedBackend) for kind in cls.kinds
}


def backend_kind(accelerator) -> str:
    """Accelerate's distributed type by name: "NO", "MULTI_GPU", "DEEPSPEED", "FSDP", ..."""
    return getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))


def check_training_backend(accelerator, tc) -> None:
    """Refuse an Accelerate back-end, or a combination with one, that the trainer does not handle correctly,
    before anything loads. `tc` is the run's TrainConfig (train.*)."""
    kind = backend_kind(accelerator)
    if kind not in BACKENDS:
        raise KDError(
            f"train_student.py has not been verified on Accelerate's {kind} back-end; launch with DDP "
            "(distributed_type: MULTI_GPU or MULTI_CPU), DeepSpeed, FSDP2 or one process"
        )
    BACKENDS[kind].check(accelerator, tc)


def backend_for(accelerator, model) -> AccelerateBackend:
    """The backend of a prepared model: DeepSpeed's engine, or Accelerate's calls (FSDP2 marks them sharded)."""
    return BACKENDS[backend_kind(accelerator)].prepared(accelerator, model)


# ---- what each back-end refuses, and the set-up it needs --------------------------------------------------------


def check_sharded(tc, backend: str, way_out: str) -> None:
    """What reads whole weights outside the sharded model's forward, refused under ZeRO-3 and FSDP2 alike."""
    if tc.ema_decay:
        raise KDError(
            f"train.ema_decay needs whole weights on every process, and {backend} partitions them; set "
            f"train.ema_decay=null, or {way_out}"
        )
    if tc.extra_eval_files:
        raise KDError(
            "train.extra_eval_files is scored outside the sharded model with an uneven share per process, which "
            f"{backend}'s collective parameter gathering cannot follow; drop it (score the saved student with "
            f"python -m kd.evaluate afterwards), or {way_out}"
        )


def check_fsdp(plugin, tc) -> None:
    """What kd cannot do under Accelerate's FSDP, refused before any weights load (docs/backends.md's table)."""
    if plugin is None:
        raise KDError("Accelerate reports the FSDP back-end but holds no FSDP plugin; launch with an FSDP config")
    if int(plugin.fsdp_version or 1) != 2:
        raise KDError(
            f"the launch config selects FSDP version {plugin.fsdp_version}; kd trains under FSDP2 only (FSDP1's "
            "flattened parameters and its accumulation path are not verified): set fsdp_version: 2 "
            "(configs/accelerate/fsdp2.yaml)"
        )
    if plugin.cpu_ram_efficient_loading:
        raise KDError(
            "the launch config sets fsdp_cpu_ram_efficient_loading: true, which empties the student on every process "
            "but the first and re-ties its weights afterwards, and kd builds and checks the student whole on every "
            "process (resizing, pruned students, projectors, tied embeddings); set fsdp_cpu_ram_efficient_loading: "
            "false (a student fits one device; configs/accelerate/fsdp2.yaml)"
        )
    if plugin.activation_checkpointing:
        raise KDError(
            "the launch config sets fsdp_activation_checkpointing: true, which wraps the student's layers (and "
            "renames their weights) outside kd; set it to false and use student.gradient_checkpointing=true, which "
            "does the same inside the model"
        )
    check_sharded(tc, "FSDP2", "train with DDP (configs/accelerate/ddp.yaml)")


def build_whole(accelerator):
    """Make transformers build models whole until the returned function is called; returns it.

    Under Accelerate's DeepSpeed ZeRO-3, Accelerate registers the DeepSpeed config with transformers (whatever
    zero3_init_flag says), and transformers then creates and loads every model already partitioned
    (deepspeed.zero.Init): the student would reach kd's checks and probes (context length, fused head, packing,
    pruning) with empty weights, and an online teacher outside the engine would stay partitioned. kd builds them
    whole and lets the engine partition the student when Accelerate prepares it, so the registration is lifted here
    and put back by the returned function (after prepare). Elsewhere both do nothing."""
    plugin = accelerator.state.deepspeed_plugin if backend_kind(accelerator) == "DEEPSPEED" else None
    if plugin is None:
        return lambda: None
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    return plugin.set_deepspeed_weakref


def zero3_head_with_root(accelerator, model) -> None:
    """Under ZeRO-3, register the LM head's weight (and bias) as an external parameter of the DistillModel, before
    the engine takes it: ZeRO-3 gathers a parameter for its own module's forward, and the fused loss reads the head's
    weight inside DistillModel.forward without calling the head (kd/losses/chunked.py). Registered, it is gathered
    for the whole forward and backward of the DistillModel, in the same order at every step; left to DeepSpeed's
    own detection of such parameters, the order changes after the first forward and DeepSpeed stops with a
    "tracing error" at the first eval after training began."""
    if backend_kind(accelerator) != "DEEPSPEED" or not getattr(model, "fused_head", False):
        return
    if deepspeed_stage(accelerator.state.deepspeed_plugin.deepspeed_config) != 3:
        return
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    head = model.lm.get_output_embeddings()
    for param in (head.weight, head.bias):
        if param is not None:
            register_external_parameter(model, param)


def deepspeed_stage(ds_config: dict) -> int:
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def _deepspeed_version() -> str:
    from importlib.metadata import version

    return version("deepspeed")


def check_deepspeed(ds_config: dict, tc, zero3_init: bool = False) -> None:
    """What kd cannot do under DeepSpeed, refused before any weights load (docs/backends.md's table)."""
    release = _deepspeed_version()
    have = tuple(int(x) for x in release.split(".")[:2])
    if have < MIN_DEEPSPEED:
        raise KDError(
            f"DeepSpeed {release} is older than the {'.'.join(map(str, MIN_DEEPSPEED))} kd's step "
            "contract was verified on (a non-finite window must be discarded by its overflow path); "
            "pip install -U deepspeed, or train with DDP"
        )
    stage = deepspeed_stage(ds_config)
    if stage not in (1, 2, 3):
        raise KDError(
            f"the DeepSpeed config has ZeRO stage {stage}; kd trains under ZeRO stage 1, 2 or 3 (stage 0 is plain "
            "data parallelism: launch with configs/accelerate/ddp.yaml instead)"
        )
    for key, owner in (
        ("optimizer", "kd builds AdamW from train.lr/betas/weight_decay"),
        ("scheduler", "kd sets the LR of every step from train.schedule"),
    ):
        if key in ds_config:
            raise KDError(f"the DeepSpeed config sets `{key}`, but {owner}: remove `{key}` from the DeepSpeed config")
    # DeepSpeed's overflow path discards a non-finite window only when it computes the gradient norm, and under bf16
    # only when it checks for overflow: kd's skip relies on both (kd/train/backend.py)
    if (ds_config.get("zero_optimization") or {}).get("compute_grad_norm", True) is False:
        raise KDError(
            "the DeepSpeed config sets zero_optimization.compute_grad_norm: false, and kd needs the gradient norm "
            "(it is logged, and a non-finite one must make DeepSpeed discard the window); remove it"
        )
    if (ds_config.get("bf16") or {}).get("check_grad_overflow", True) is False:
        raise KDError(
            "the DeepSpeed config sets bf16.check_grad_overflow: false, under which DeepSpeed would apply a "
            "non-finite window that kd skips; remove it"
        )
    if zero3_init:
        raise KDError(
            "the launch config sets zero3_init_flag: true, which builds the student already partitioned, and kd "
            "builds and checks it whole (resizing, pruned students, projectors) before DeepSpeed partitions it; set "
            "zero3_init_flag: false (a student fits one device; configs/accelerate/zero3.yaml)"
        )
    if stage == 3:
        # parameters exist only as partitions: what reads whole weights outside the engine's forward is refused
        check_sharded(tc, "ZeRO-3", "use ZeRO-2 (configs/accelerate/zero2.yaml)")


def configure_deepspeed(accelerator, tc, say=print) -> None:
    """Fill the DeepSpeed config from train.* before `accelerator.prepare`: the micro-batch, the accumulation
    steps and the clipping are kd's (its window step sets the boundary and normalises the loss itself), and ZeRO-3
    gathers whole weights for the final save_pretrained. A config giving other values is overridden, with a note."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ours = {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.gradient_accumulation_steps,
        "train_batch_size": tc.micro_batch_size * tc.gradient_accumulation_steps * accelerator.num_processes,
        "gradient_clipping": float(tc.max_grad_norm or 0.0),
    }
    for key, value in ours.items():
        given = ds.get(key, "auto")
        if given not in ("auto", None, value):
            say(f"[deepspeed] {key}: {given} in the DeepSpeed config -> {value} from train.* (kd owns it)")
        ds[key] = value
    if deepspeed_stage(ds) == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    # Accelerate's own accumulation count follows, so that it warns of no mismatch (kd never uses it under DeepSpeed)
    accelerator.gradient_accumulation_steps = tc.gradient_accumulation_steps
