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


# Accelerate back-ends the trainer runs on. DDP (one node or many) is tested end to end with 2 processes = 1;
# DeepSpeed ZeRO-1/2/3 steps through kd/train/engine.py's DeepSpeedBackend (tests/test_deepspeed.py drives bare
# ZeRO-2 and ZeRO-3 engines on CPU); FSDP2 through Accelerate's own calls, its sharded parameters, checkpoints and
# final save handled on purpose. tests/test_sharded_training.py runs train_student.py under FSDP2 and ZeRO-2/3 on CPU.
TRAINING_BACKENDS = (
    "NO",
    "MULTI_CPU",
    "MULTI_GPU",
    "MULTI_XPU",
    "MULTI_NPU",
    "MULTI_MLU",
    "MULTI_MUSA",
    "MULTI_HPU",
    "DEEPSPEED",
    "FSDP",
)


def backend_kind(accelerator) -> str:
    """Accelerate's distributed type by name: "NO", "MULTI_GPU", "DEEPSPEED", "FSDP", ..."""
    return getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))


def check_training_backend(accelerator, tc=None) -> None:
    """Refuse an Accelerate back-end, or a combination with one, that the trainer does not handle correctly,
    before anything loads. `tc` is the run's TrainConfig (train.*)."""
    kind = backend_kind(accelerator)
    if kind not in TRAINING_BACKENDS:
        raise KDError(
            f"train_student.py has not been verified on Accelerate's {kind} back-end; launch with DDP "
            "(distributed_type: MULTI_GPU or MULTI_CPU), DeepSpeed, FSDP2 or one process"
        )
    if kind == "FSDP":
        check_fsdp(accelerator.state.fsdp_plugin, tc)
    if kind == "DEEPSPEED" and tc is not None:
        plugin = accelerator.state.deepspeed_plugin
        check_deepspeed(plugin.deepspeed_config, tc, getattr(plugin, "zero3_init_flag", False))


def check_sharded(tc, backend: str, way_out: str) -> None:
    """What reads whole weights outside the sharded model's forward, refused under ZeRO-3 and FSDP2 alike."""
    if tc is None:
        return
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
    """What kd cannot do under Accelerate's FSDP, refused before any weights load (the README's table)."""
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
    """What kd cannot do under DeepSpeed, refused before any weights load (the README's table)."""
    from kd.train.engine import MIN_DEEPSPEED

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
    # only when it checks for overflow: kd's skip relies on both (kd/train/engine.py)
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
