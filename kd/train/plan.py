"""The training run's schedule and plan: `run_schedule` (what set-up uses: steps, warmup, what one step takes) and
`plan` (`kd train --dry-run`: the steps and tokens, and an estimate of a step's peak memory per device, from the
cache's manifest and the student's config: no weights loaded, no teacher, nothing written).

The memory estimate adds, per device: the weights in fp32, their gradients, AdamW's two moments (and EMA's copy),
divided over the processes where the back-end shards them; the activations autograd keeps for one micro-batch,
MEASURED on a one- and a two-layer copy of the student at the run's micro-batch shape (small vocabulary, random
weights: seconds) and extrapolated to its depth; the loss's vocabulary-sized temporaries (one `loss.position_chunk`
of positions with the fused head, else the whole micro-batch's logits); and on CPU the resident size of this
process, which has loaded what a training process loads (torch, transformers, accelerate). It leaves out: the
allocator's fragmentation and caching, DataLoader workers (processes of their own), the eval pass (no gradients,
smaller), the optimizer's first-step transients, and on CUDA the context (~0.5 GB, outside max_memory_allocated).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import torch

from kd.cache import TeacherCache
from kd.errors import KDError
from kd.models import count_parameters, load_tokenizer
from kd.paths import resolve_path
from kd.train.data import steps_per_epoch
from kd.train.state import resident_mb
from kd.train_config import TrainConfig

MIB = 2**20


@dataclass
class Schedule:
    """How long the run is, in optimizer steps, and what one step takes on each process."""

    total_steps: int
    warmup_steps: int
    steps_per_epoch: int
    sequences_per_step: int  # per process: micro_batch_size x gradient_accumulation_steps


def run_schedule(cfg: TrainConfig, train_sequences: int, world: int) -> Schedule:
    tc = cfg.train
    epoch_steps = steps_per_epoch(train_sequences, world, tc.micro_batch_size, tc.gradient_accumulation_steps)
    if epoch_steps == 0:
        raise KDError(
            f"the train split ({train_sequences} sequences) is smaller than one optimizer step "
            f"({tc.micro_batch_size} x {tc.gradient_accumulation_steps} x {world} processes)"
        )
    total_steps = tc.max_steps or math.ceil(tc.epochs * epoch_steps)
    warmup = tc.warmup_steps or int(tc.warmup_fraction * total_steps)
    if warmup >= total_steps:
        raise KDError(f"warmup ({warmup} steps) is not shorter than the run ({total_steps} optimizer steps)")
    return Schedule(total_steps, warmup, epoch_steps, tc.micro_batch_size * tc.gradient_accumulation_steps)


def continued_schedule(recorded: dict, new: Schedule, step: int) -> tuple[Schedule, dict | None]:
    """A resumed run's schedule. When train.max_steps (or epochs) now asks for more steps than the run was started
    with, the total grows and the warmup stays the run's own (in steps); the LR curve is then the new total's from
    this step on, so on a decaying schedule the LR rises at once to the longer curve's value here and decays from
    it to min_lr at the new end. Returns the schedule and the extension's record (None when nothing changed)."""
    old_total, warmup = recorded["total_steps"], recorded["warmup_steps"]
    if new.total_steps == old_total:
        return Schedule(old_total, warmup, new.steps_per_epoch, new.sequences_per_step), None
    if new.total_steps < old_total:
        raise KDError(
            f"the run was started for {old_total} optimizer steps and this config asks for {new.total_steps}: a "
            "resumed run can be made longer (train.max_steps, train.epochs), not shorter; stop it where you want instead"
        )
    extension = {"at_step": step, "total_steps_before": old_total, "total_steps": new.total_steps}
    return Schedule(new.total_steps, warmup, new.steps_per_epoch, new.sequences_per_step), extension


@dataclass(frozen=True)
class Memory:
    """A step's peak memory per device, by part, in bytes."""

    weights: int
    gradients: int
    optimizer: int  # AdamW's moments (+ EMA's copy of the weights)
    activations: int
    loss: int
    runtime: int  # CPU: this process's resident size with the libraries loaded; CUDA: 0 (the context is outside)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.loss + self.runtime


@dataclass(frozen=True)
class TrainPlan:
    schedule: Schedule
    world: int
    sharding: str  # none | zero2 | full (FSDP2, ZeRO-3)
    seq_len: int
    train_sequences: int
    parameters: int
    memory: Memory
    device: str

    @property
    def tokens_per_step(self) -> int:
        return self.schedule.sequences_per_step * self.world * self.seq_len

    def lines(self) -> list[str]:
        s, m = self.schedule, self.memory
        parts = ", ".join(
            f"{name} {getattr(m, name) / MIB:,.0f}"
            for name in ("weights", "gradients", "optimizer", "activations", "loss", "runtime")
        )
        return [
            f"student     {self.parameters:,} parameters",
            f"schedule    {s.total_steps:,} optimizer steps ({s.steps_per_epoch:,} per epoch over "
            f"{self.train_sequences:,} windows), warmup {s.warmup_steps:,}, {self.world} process(es)",
            f"tokens      {self.tokens_per_step:,} per step (window positions), {self.tokens_per_step * s.total_steps:,} in all",
            f"memory      ~{m.total / MIB:,.0f} MiB peak per device ({self.device}; sharding: {self.sharding}): {parts} MiB",
            "not estimated: time; fragmentation and allocator caches; DataLoader workers; the eval pass; on CUDA the "
            "context (~0.5 GB)",
        ]


def launch_layout() -> tuple[int, str]:
    """(processes, how the back-end shards the student) as Accelerate's launcher sets them in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return world, "full"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        return world, "full" if stage == 3 else "zero2"
    return world, "none"


def student_config(cfg: TrainConfig, cache: TeacherCache):
    """The student's transformers config, without its weights."""
    from transformers import AutoConfig  # heavy: loaded when a plan is asked for

    s = cfg.student
    if s.pretrained is not None:
        return AutoConfig.from_pretrained(resolve_path(s.pretrained), revision=s.revision)
    if s.from_teacher is not None:
        teacher = s.from_teacher.teacher or cache.info.teacher.name_or_path
        model_cfg = AutoConfig.from_pretrained(resolve_path(teacher))
        model_cfg.num_hidden_layers = len(s.from_teacher.layers) if s.from_teacher.layers else s.from_teacher.num_layers
        if s.from_teacher.intermediate_size:
            model_cfg.intermediate_size = s.from_teacher.intermediate_size
        return model_cfg
    fields = dict(s.config)
    source = s.tokenizer or cache.info.teacher.name_or_path
    fields.setdefault("vocab_size", len(load_tokenizer(source)))
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def saved_activation_bytes(model_cfg, layers: int, batch: int, seq_len: int, checkpointing: bool) -> int:
    """Bytes autograd keeps for one forward of `batch` x `seq_len` tokens through a `layers`-layer copy of the
    student with a small vocabulary (each storage counted once), measured with saved-tensor hooks."""
    from transformers import AutoModelForCausalLM  # heavy: as above

    probe = copy.deepcopy(model_cfg)
    probe.num_hidden_layers = layers
    probe.vocab_size = 256
    if hasattr(probe, "layer_types") and probe.layer_types:
        probe.layer_types = probe.layer_types[:layers]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on the training device: seconds even at 4k tokens
    lm = AutoModelForCausalLM.from_config(probe).to(device)
    lm.train()
    if checkpointing:
        lm.gradient_checkpointing_enable()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, probe.vocab_size, (batch, seq_len), device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        body = lm.base_model(input_ids=ids, output_hidden_states=True)
        body.last_hidden_state.float().sum().backward()
    return sum(seen.values())


def plan(cfg: TrainConfig) -> TrainPlan:
    """`kd train --dry-run`: the run's schedule, the student's size and a step's memory per device (module
    docstring), from the cache's manifest and the student's config. Across tokenizers the windows are counted as
    the cache's (the student's own, re-tokenized, may be more or fewer)."""
    tc = cfg.train
    cache = TeacherCache(tc.cache_dir, check=False)
    world, sharding = launch_layout()
    train_sequences = cache.info.splits["train"].num_sequences
    sched = run_schedule(cfg, train_sequences, world)
    model_cfg = student_config(cfg, cache)
    params = count_parameters(model_cfg)
    # what a training process holds before its student: the libraries this process has now loaded too
    runtime = int(resident_mb(peak=True) * MIB)
    shard = world if sharding == "full" else 1
    opt_shard = world if sharding in ("full", "zero2") else 1
    weights = 4 * params // shard
    gradients = 4 * params // opt_shard
    optimizer = 8 * params // opt_shard + (4 * params // shard if tc.ema_decay else 0)
    b, T = tc.micro_batch_size, cache.seq_len
    ckpt = cfg.student.gradient_checkpointing
    one, two = (saved_activation_bytes(model_cfg, n, b, T, ckpt) for n in (1, 2))
    activations = one + (two - one) * (model_cfg.num_hidden_layers - 1)
    vocab = model_cfg.vocab_size
    positions = min(cfg.loss.position_chunk, b * T) if cfg.loss.fused_head else b * T
    # logits, log-probs and their gradient in fp32, and the cached teacher's dense row for the chunk
    loss = 4 * positions * vocab * 4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runtime = 0 if device == "cuda" else runtime
    memory = Memory(weights, gradients, optimizer, activations, loss, runtime)
    return TrainPlan(sched, world, sharding, T, train_sequences, params, memory, device)
