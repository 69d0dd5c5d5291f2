"""The config of `train_student.py`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from kd.errors import KDError
from kd.losses import TAIL_POLICIES
from kd.schedule import SCHEDULES


@dataclass
class StudentConfig:
    """The student model.

    pretrained: local folder, `asset:NAME` or hub id of a causal LM to start from; null = random init from `config`.
    config: for random init, a Hugging Face config as a mapping with `model_type` (e.g. llama) and its fields;
        vocab_size defaults to the tokenizer's size.
    tokenizer: where the student's tokenizer comes from; null = `pretrained`, else the cache's teacher.
    revision: hub revision of `pretrained`.
    gradient_checkpointing: recompute transformer activations in backward (less memory, ~30% more compute).
    attn_implementation: passed to the model ("sdpa", "eager", ...).
    """

    pretrained: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    revision: str | None = None
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"

    def __post_init__(self):
        if (self.pretrained is None) == (self.config is None):
            raise KDError("set exactly one of student.pretrained (a model to start from) and student.config "
                          "(a config mapping with model_type, for random init)")
        if self.config is not None and "model_type" not in self.config:
            raise KDError("student.config needs a model_type (for example llama)")


@dataclass
class LossConfig:
    """total = alpha_ce * CE + alpha_kd * KD + alpha_feature * FEATURE + alpha_contrastive * CONTRASTIVE.

    Each term is a token mean over the whole accumulation window on all processes (see kd/losses.py).
    alpha_ce: weight of the next-token cross-entropy on the data.
    alpha_kd: weight of KL(teacher || student) on the cached top-k teacher distribution (times T^2).
    alpha_feature: weight of the hidden-state loss at the mapped layers (needs hidden states in the cache).
    alpha_contrastive: weight of InfoNCE between projected student and teacher token states of a micro-batch.
    target: what KD compares the student with. topk: the cached top-k log-probs, with `tail` policy. sampled: the
        cached sampled targets (empirical distribution counts / n; needs a cache made with cache.sample_n > 0).
        online: the cache's teacher runs in the training process on every batch and gives its full-vocabulary
        distribution: the exact reference the cached targets are measured against (slow; the teacher is in memory).
        Eval always reports eval/kd and top-1 agreement against the cached top-k, so runs stay comparable.
    temperature: KD temperature T.
    tail: policy for the teacher mass outside the cached top-k when target is topk: renormalize or bucket
        (see kd/losses.py).
    feature_layers: [student_layer, teacher_layer] pairs. Student layers index the student's hidden_states
        (0 = embeddings, num_hidden_layers = last); teacher layers must be among the cache's hidden_layers.
        Each pair gets its own learned linear projector student hidden -> teacher hidden.
    feature_kind: cosine (1 - cos) or normalized_mse (MSE of per-token layer-normalised states).
    contrastive_temperature: temperature of the InfoNCE similarities.
    contrastive_max_positions: positions per micro-batch used as InfoNCE candidates (an M x M matrix).
    position_chunk: positions per chunk of the vocabulary-sized loss computation: bounds peak memory, and small
        chunks stay in CPU cache (128 measured fastest on CPU; GPUs may prefer 1024+).
    cross_tokenizer: null = the student must share the teacher's tokenizer. Otherwise the student re-tokenizes the
        cached text and KD runs at aligned positions only (see kd/align.py), with target topk and: mapped (KL on
        teacher tokens that have an identical student token, all other teacher mass one tail bucket), uld
        (Universal Logit Distillation: L1 distance between the sorted teacher top-k and student top-k
        probabilities; needs no mapping), or hybrid (mapped + uld_weight * uld).
    uld_weight: weight of the ULD term inside hybrid.
    cross_tokenizer_separator: student token placed between documents (null = the student tokenizer's EOS).
    min_aligned_share: floor on the share of student positions aligned to a teacher position; below it the run
        warns loudly, or stops when on_low_alignment is refuse.
    """

    alpha_ce: float = 0.5
    alpha_kd: float = 0.5
    alpha_feature: float = 0.0
    alpha_contrastive: float = 0.0
    target: Literal["topk", "sampled", "online"] = "topk"
    temperature: float = 1.0
    tail: str = "bucket"
    feature_layers: list[list[int]] = field(default_factory=list)
    feature_kind: Literal["cosine", "normalized_mse"] = "cosine"
    contrastive_temperature: float = 0.1
    contrastive_max_positions: int = 256
    position_chunk: int = 128
    cross_tokenizer: Literal["mapped", "uld", "hybrid"] | None = None
    uld_weight: float = 1.0
    cross_tokenizer_separator: str | None = None
    min_aligned_share: float = 0.5
    on_low_alignment: Literal["warn", "refuse"] = "warn"

    def __post_init__(self):
        alphas = {k: getattr(self, k) for k in ("alpha_ce", "alpha_kd", "alpha_feature", "alpha_contrastive")}
        if any(a < 0 for a in alphas.values()):
            raise KDError(f"loss weights must be >= 0, got {alphas}")
        if all(a == 0 for a in alphas.values()):
            raise KDError("all loss weights (loss.alpha_*) are zero: nothing would be trained")
        if self.tail not in TAIL_POLICIES:
            raise KDError(f"unknown KD tail policy loss.tail={self.tail!r}; choose one of {list(TAIL_POLICIES)}")
        if self.temperature <= 0 or self.contrastive_temperature <= 0:
            raise KDError("loss.temperature and loss.contrastive_temperature must be > 0")
        if any(len(p) != 2 for p in self.feature_layers):
            raise KDError(f"loss.feature_layers must be [student_layer, teacher_layer] pairs, got {self.feature_layers}")
        if (self.alpha_feature > 0 or self.alpha_contrastive > 0) and not self.feature_layers:
            raise KDError("loss.alpha_feature / alpha_contrastive > 0 need loss.feature_layers (layer pairs to match)")
        if self.position_chunk < 1 or self.contrastive_max_positions < 2:
            raise KDError("loss.position_chunk must be >= 1 and loss.contrastive_max_positions >= 2")
        if self.cross_tokenizer is not None and self.target != "topk":
            raise KDError(f"loss.cross_tokenizer works on the cached top-k (loss.target=topk), got loss.target={self.target}")
        if self.cross_tokenizer is not None and self.alpha_contrastive > 0:
            raise KDError("loss.alpha_contrastive is not supported with loss.cross_tokenizer; use alpha_feature")
        if self.uld_weight < 0 or not 0 <= self.min_aligned_share <= 1:
            raise KDError("loss.uld_weight must be >= 0 and loss.min_aligned_share in [0, 1]")


@dataclass
class TrainSection:
    """The optimisation and the run.

    cache_dir: teacher cache written by cache_teacher.py.
    output_dir: parent of run directories.
    run_name: this run's directory name under output_dir.
    resume: continue the run in output_dir/run_name from its latest checkpoint (otherwise an existing run
        directory is refused, never overwritten).
    max_steps: run length in OPTIMIZER steps; 0 = derive from `epochs`.
    epochs: run length in passes over the training split, when max_steps is 0.
    micro_batch_size: sequences per forward/backward on each process.
    gradient_accumulation_steps: micro-batches per optimizer step on each process.
    lr: peak learning rate (AdamW).
    min_lr: final learning rate of cosine/linear decay; must be > 0.
    schedule: cosine, linear or constant (each after linear warmup).
    warmup_steps: warmup length in optimizer steps (used when > 0).
    warmup_fraction: warmup length as a fraction of the run's optimizer steps, when warmup_steps is 0.
    weight_decay: AdamW weight decay (not applied to biases and norm weights).
    betas: AdamW betas.
    max_grad_norm: clip the global gradient norm to this; null = no clipping (the norm is still logged).
    mixed_precision: no, fp16 (with a gradient scaler, e.g. P100) or bf16, via Accelerate.
    max_consecutive_skips: stop with an error (after saving a checkpoint) when this many optimizer steps in a
        row are skipped for non-finite losses or gradients.
    eval_every: evaluate every this many optimizer steps (and at the end).
    eval_max_sequences: cap on eval-split sequences per evaluation (null = all).
    checkpoint_every: save a resumable checkpoint every this many optimizer steps (and at the end); 0 = end only.
    ema_decay: keep an exponential moving average of the student weights with this decay; null = off.
    early_stopping_patience: stop when eval/ce has not improved for this many evaluations; null = off.
    num_workers: DataLoader worker processes reading the cache.
    shuffle: training order per epoch: `shards` (shard order shuffled, then sequences shuffled within each run of
        `shuffle_buffer_shards` shards: mostly sequential reads) or `exact` (a uniform permutation: a random read
        per sequence). Both are permutations per epoch, disjoint across processes, and resume exactly.
    shuffle_buffer_shards: shards whose sequences are shuffled together with `shuffle: shards`.
    seed: seed of student init, data order and dropout.
    """

    cache_dir: str = "caches/default"
    output_dir: str = "runs"
    run_name: str = "default"
    resume: bool = False
    max_steps: int = 0
    epochs: float = 1.0
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    max_consecutive_skips: int = 10
    eval_every: int = 50
    eval_max_sequences: int | None = None
    checkpoint_every: int = 0
    ema_decay: float | None = None
    early_stopping_patience: int | None = None
    num_workers: int = 1
    shuffle: Literal["shards", "exact"] = "exact"
    shuffle_buffer_shards: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise KDError(f"unknown LR schedule train.schedule={self.schedule!r}; choose one of {list(SCHEDULES)}")
        if self.max_steps < 0 or (self.max_steps == 0 and self.epochs <= 0):
            raise KDError("set train.max_steps > 0 or train.epochs > 0")
        for name in ("micro_batch_size", "gradient_accumulation_steps", "eval_every", "max_consecutive_skips"):
            if getattr(self, name) < 1:
                raise KDError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.min_lr <= self.lr:
            raise KDError(f"need 0 < train.min_lr <= train.lr (got min_lr={self.min_lr}, lr={self.lr}): "
                          "a step at LR 0 would be wasted")
        if self.warmup_steps < 0 or not 0 <= self.warmup_fraction < 1:
            raise KDError("train.warmup_steps must be >= 0 and train.warmup_fraction in [0, 1)")
        if self.max_steps and self.warmup_steps >= self.max_steps:
            raise KDError(f"train.warmup_steps={self.warmup_steps} is not shorter than the run "
                          f"(train.max_steps={self.max_steps})")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise KDError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise KDError("train.max_grad_norm must be > 0 or null")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise KDError(f"train.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise KDError("train.early_stopping_patience must be >= 1 or null")
        if self.shuffle_buffer_shards < 1:
            raise KDError(f"train.shuffle_buffer_shards must be >= 1, got {self.shuffle_buffer_shards}")
        if self.checkpoint_every < 0 or self.num_workers < 0:
            raise KDError("train.checkpoint_every and train.num_workers must be >= 0")
        if "/" in self.run_name or not self.run_name:
            raise KDError(f"train.run_name must be a plain directory name, got {self.run_name!r}")


@dataclass
class TrainConfig:
    """Config of train_student.py."""

    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainSection = field(default_factory=TrainSection)


# Keys a resumed run may change without changing what it computes.
RESUME_FREE_KEYS = ("train.resume", "train.num_workers")
