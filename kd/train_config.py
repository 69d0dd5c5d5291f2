"""The config of `train_student.py`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from kd.config import PATH, RESUME_FREE, marked_keys
from kd.errors import KDError
from kd.losses.divergences import REGISTRY
from kd.losses.terms import KINDS, Term, needs_hidden, needs_teacher_signal, parse_terms
from kd.schedule import SCHEDULES
from kd.signals import TAIL_POLICIES


@dataclass
class FromTeacherConfig:
    """A student cut from the cache's teacher (kd/prune.py: rules, importance and their sources): whole decoder layers
    kept, optionally fewer MLP neurons per layer, every kept weight copied exactly. Llama-style teachers (llama, qwen2,
    qwen3, mistral). `python -m kd.prune --cache DIR ... --compare` prints what each rule keeps and its held-out CE.

    teacher: the model to cut; null = the cache's teacher (its weights checked against the cache's fingerprint).
    layers: teacher decoder layers to keep (0-based, increasing); null = chosen by `rule` from `num_layers`.
    num_layers: how many decoder layers to keep when `layers` is null.
    rule: block (drop the contiguous block whose input and output states are closest; Gromov et al. 2024),
        influence (drop the layers of least block influence; ShortGPT), every_other (evenly spaced; the baseline).
    intermediate_size: MLP neurons kept per layer, those of largest mean contribution to the residual stream;
        null = the teacher's width.
    calibration_sequences: the cache's first train windows the importance is measured on (one teacher forward).
    """

    teacher: str | None = field(default=None, metadata=PATH)
    layers: list[int] | None = None
    num_layers: int | None = None
    rule: Literal["block", "influence", "every_other"] = "block"
    intermediate_size: int | None = None
    calibration_sequences: int = 256

    def __post_init__(self):
        if (self.layers is None) == (self.num_layers is None):
            raise KDError(
                "student.from_teacher needs exactly one of layers (an explicit list of teacher layers to keep) and "
                "num_layers (how many to keep, chosen by student.from_teacher.rule)"
            )
        if self.num_layers is not None and self.num_layers < 1:
            raise KDError("student.from_teacher.num_layers must be >= 1")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise KDError("student.from_teacher.intermediate_size must be >= 1")
        if self.calibration_sequences < 1:
            raise KDError("student.from_teacher.calibration_sequences must be >= 1")


@dataclass
class StudentConfig:
    """The student model.

    pretrained: local folder, `asset:NAME` or hub id of a causal LM to start from; null = random init from `config`.
    config: for random init, a Hugging Face config as a mapping with `model_type` (e.g. llama) and its fields;
        vocab_size defaults to the tokenizer's size.
    from_teacher: cut the student from the cache's teacher (a FromTeacherConfig mapping, e.g. {num_layers: 15});
        it then uses the teacher's tokenizer, and loss.feature_layers may be left empty (kept layers are matched to
        the teacher layers they came from, where the cache holds them).
    tokenizer: where the student's tokenizer comes from; null = `pretrained`, else the cache's teacher.
    revision: hub revision of `pretrained`.
    gradient_checkpointing: recompute transformer activations in backward (less memory, ~30% more compute).
    attn_implementation: passed to the model ("sdpa", "eager", ...).
    chat_template: with a chat cache and another tokenizer than the teacher's (loss.cross_tokenizer), how the
        student renders each conversation: null = its tokenizer's own chat template, or the teacher's where it has
        none; `teacher` = the teacher's (the one the cache was rendered with); or a Jinja template string or file.
    """

    pretrained: str | None = field(default=None, metadata=PATH)
    config: dict[str, Any] | None = None
    from_teacher: FromTeacherConfig | None = None
    tokenizer: str | None = field(default=None, metadata=PATH)
    revision: str | None = None
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    chat_template: str | None = field(default=None, metadata=PATH)  # a template file; inline text as it is

    def __post_init__(self):
        if sum(v is not None for v in (self.pretrained, self.config, self.from_teacher)) != 1:
            raise KDError(
                "set exactly one of student.pretrained (a model to start from), student.config "
                "(a config mapping with model_type, for random init) and student.from_teacher (cut from the teacher)"
            )
        if self.from_teacher is not None and self.tokenizer is not None:
            raise KDError("a student cut from the teacher uses the teacher's tokenizer: leave student.tokenizer unset")
        if self.config is not None and "model_type" not in self.config:
            raise KDError("student.config needs a model_type (for example llama)")


@dataclass
class LossConfig:
    """The loss: a weighted list of terms (`terms`), or the equivalent older alpha_* fields.

    terms: list of {kind, weight, name?, ...options} (kd/losses/terms.py). Kinds: ce; the divergences forward_kl,
        reverse_kl, jsd (beta), tvd, skew_kl (alpha), skew_reverse_kl (alpha) (definitions in kd/losses/divergences.py
        and docs/training.md); uld (cross-tokenizer only); feature (distance: cosine | normalized_mse); contrastive
        (temperature, max_positions). Each term is a token mean over the accumulation window, the loss is
        sum weight * term, and a term of weight 0 is computed and logged only. Example (torchtune's symmetric KL):
        [{kind: ce, weight: 0.5}, {kind: forward_kl, weight: 0.25}, {kind: reverse_kl, weight: 0.25}].
        Empty = built from the alpha_* fields below, which must then be left unset when terms is given.
    alpha_ce: weight of the next-token cross-entropy on the data (default 0.5) = {kind: ce, name: ce}.
    alpha_kd: weight of KL(teacher || student) on the teacher signal, times T^2 (default 0.5) = {kind: forward_kl,
        name: kd} (across tokenizers: mapped -> forward_kl, uld -> uld, hybrid -> forward_kl + a term `uld` of
        weight alpha_kd * uld_weight).
    alpha_feature: weight of the hidden-state loss at the mapped layers (needs hidden states in the cache) =
        {kind: feature, distance: feature_kind}.
    alpha_contrastive: weight of InfoNCE between projected student and teacher token states of a micro-batch =
        {kind: contrastive, temperature: contrastive_temperature, max_positions: contrastive_max_positions}.
    target: the teacher signal every divergence compares the student with (kd/signals.py). topk: the cached top-k
        log-probs, with `tail` policy. sampled: the cached sampled targets (empirical distribution counts / n;
        needs a cache made with cache.sample_n > 0; only divergences linear in the teacher distribution stay
        unbiased there, so only forward_kl is accepted). online: the cache's teacher runs in the training process
        on every batch and gives its full-vocabulary distribution: the exact reference the cached targets are
        measured against (slow; the teacher is in memory).
        Eval always reports eval/kd (forward KL) and top-1 agreement against the cached top-k (across tokenizers:
        the mapped top-k), whatever the training terms, so runs stay comparable.
    temperature: KD temperature T, for every divergence term (each is multiplied by T^2).
    tail: policy for the teacher mass outside the cached top-k when target is topk: renormalize or bucket
        (see kd/signals.py).
    feature_layers: [student_layer, teacher_layer] pairs. Student layers index the student's hidden_states
        (0 = embeddings, num_hidden_layers = last); teacher layers must be among the cache's hidden_layers.
        Each pair gets its own learned linear projector student hidden -> teacher hidden.
    feature_kind: cosine (1 - cos) or normalized_mse (MSE of per-token layer-normalised states).
    contrastive_temperature: temperature of the InfoNCE similarities.
    contrastive_max_positions: positions per micro-batch used as InfoNCE candidates (an M x M matrix).
    position_chunk: positions per chunk of the vocabulary-sized loss computation: bounds peak memory, and small
        chunks stay in CPU cache (128 measured fastest on CPU; GPUs may prefer 1024+).
    fused_head: compute the student's LM head inside the loss, position_chunk positions at a time, so that its
        [positions, vocabulary] logits never exist (peak memory holds one chunk of vocabulary-sized temporaries).
        Used where the head is a plain linear layer and the model's logits are exactly head(body(x)), checked at
        set-up; otherwise the trainer says why and uses the model's own forward. false: always the model's forward.
    cross_tokenizer: null = the student must share the teacher's tokenizer. Otherwise the student re-tokenizes the
        cached text and KD runs at aligned positions only (see kd/align.py) on the mapped top-k targets. Without
        `terms` the value picks the KD term: mapped (forward KL on teacher tokens that have an identical student
        token, all other teacher mass one tail bucket), uld (Universal Logit Distillation: L1 distance between the
        sorted teacher top-k and student top-k probabilities; needs no mapping), or hybrid (mapped + uld_weight *
        uld); with `terms` any of the three turns cross-tokenizer mode on and the terms say what is computed.
    uld_weight: weight of the ULD term inside hybrid.
    cross_tokenizer_separator: student token placed between documents (null = the student tokenizer's EOS).
    min_aligned_share: floor on the share of student positions aligned to a teacher position; below it the run
        warns loudly, or stops when on_low_alignment is refuse.
    on_low_alignment: what an aligned share below min_aligned_share does: warn (and train) or refuse (stop).
    """

    terms: list[dict[str, Any]] = field(default_factory=list)
    alpha_ce: float | None = None
    alpha_kd: float | None = None
    alpha_feature: float | None = None
    alpha_contrastive: float | None = None
    target: Literal["topk", "sampled", "online"] = "topk"
    temperature: float = 1.0
    tail: str = "bucket"
    feature_layers: list[list[int]] = field(default_factory=list)
    feature_kind: Literal["cosine", "normalized_mse"] = "cosine"
    contrastive_temperature: float = 0.1
    contrastive_max_positions: int = 256
    position_chunk: int = 128
    fused_head: bool = True
    cross_tokenizer: Literal["mapped", "uld", "hybrid"] | None = None
    uld_weight: float = 1.0
    cross_tokenizer_separator: str | None = None
    min_aligned_share: float = 0.5
    on_low_alignment: Literal["warn", "refuse"] = "warn"

    def __post_init__(self):
        alpha_names = ("alpha_ce", "alpha_kd", "alpha_feature", "alpha_contrastive")
        if self.terms:
            set_alphas = [k for k in alpha_names if getattr(self, k) is not None]
            if set_alphas:
                raise KDError(
                    f"loss.terms replaces loss.alpha_*: remove {', '.join('loss.' + k for k in set_alphas)} "
                    "and give each weight as a term, e.g. {kind: ce, weight: 0.5}, {kind: forward_kl, "
                    "weight: 0.5}"
                )
            # the alpha_* form's options: a term carries its own, so with loss.terms these would do nothing
            defaults = {f.name: f.default for f in fields(self)}
            ignored = {
                "feature_kind": "the feature term's `distance`",
                "contrastive_temperature": "the contrastive term's `temperature`",
                "contrastive_max_positions": "the contrastive term's `max_positions`",
                "uld_weight": "the uld term's `weight`",
            }
            given = [k for k in ignored if getattr(self, k) != defaults[k]]
            if given:
                raise KDError(
                    f"loss.{given[0]} applies to loss.alpha_* only; with loss.terms give {ignored[given[0]]} "
                    f"in the term itself and remove loss.{given[0]}"
                )
        else:
            for k, default in zip(alpha_names, (0.5, 0.5, 0.0, 0.0)):
                if getattr(self, k) is None:
                    setattr(self, k, default)
            alphas = {k: getattr(self, k) for k in alpha_names}
            if any(not isinstance(a, (int, float)) or a < 0 for a in alphas.values()):
                raise KDError(f"loss weights must be numbers >= 0, got {alphas}")
            if all(a == 0 for a in alphas.values()):
                raise KDError("all loss weights (loss.alpha_*) are zero: nothing would be trained")
        if self.tail not in TAIL_POLICIES:
            raise KDError(f"unknown KD tail policy loss.tail={self.tail!r}; choose one of {list(TAIL_POLICIES)}")
        if self.temperature <= 0 or self.contrastive_temperature <= 0:
            raise KDError("loss.temperature and loss.contrastive_temperature must be > 0")
        if any(len(p) != 2 for p in self.feature_layers):
            raise KDError(
                f"loss.feature_layers must be [student_layer, teacher_layer] pairs, got {self.feature_layers}"
            )
        if self.position_chunk < 1 or self.contrastive_max_positions < 2:
            raise KDError("loss.position_chunk must be >= 1 and loss.contrastive_max_positions >= 2")
        if self.cross_tokenizer is not None and self.target != "topk":
            raise KDError(
                f"loss.cross_tokenizer works on the cached top-k (loss.target=topk), got loss.target={self.target}"
            )
        if self.uld_weight < 0 or not 0 <= self.min_aligned_share <= 1:
            raise KDError("loss.uld_weight must be >= 0 and loss.min_aligned_share in [0, 1]")
        terms = self.loss_terms()  # validates the list
        kinds = {t.kind for t in terms}
        for kind in sorted(kinds):
            if KINDS[kind].cross_tokenizer == "never" and self.cross_tokenizer is not None:
                raise KDError(f"the {kind} term is not supported with loss.cross_tokenizer; use a feature term")
            if KINDS[kind].cross_tokenizer == "only" and self.cross_tokenizer is None:
                raise KDError(
                    f"the {kind} term compares across tokenizers: it needs loss.cross_tokenizer (mapped, uld or hybrid)"
                )
        if self.target == "sampled":
            biased = sorted(k for k in kinds if k in REGISTRY and not REGISTRY[k].unbiased_on_samples)
            if biased:
                raise KDError(
                    f"loss.target=sampled: {', '.join(biased)} is not linear in the teacher distribution, so "
                    "training it against sampled targets (counts / n) would be biased; use forward_kl "
                    "there, or loss.target=topk / online for these kinds"
                )

    def trained_terms(self) -> list:
        """The terms training computes: those of weight > 0. A weight-0 term would cost every step what a trained
        one costs (a CE-only run as much as a KD run); CE and KD are measured at every eval whatever the weights."""
        return [t for t in self.loss_terms() if t.weight != 0]

    def trains_on_signal(self) -> bool:
        """Whether a trained term reads the teacher's distribution (its cached fields, or the online teacher)."""
        return any(needs_teacher_signal(t) for t in self.trained_terms())

    def loss_terms(self) -> list:
        """The loss as kd.losses.terms.Term objects: `terms` parsed, or the alpha_* fields mapped onto it."""
        if self.terms:
            return parse_terms(self.terms)
        kd_kind = {None: "forward_kl", "mapped": "forward_kl", "hybrid": "forward_kl", "uld": "uld"}[
            self.cross_tokenizer
        ]
        terms = [Term("ce", "ce", float(self.alpha_ce)), Term("kd", kd_kind, float(self.alpha_kd))]
        if self.cross_tokenizer == "hybrid":
            terms.append(Term("uld", "uld", float(self.alpha_kd) * self.uld_weight))
        if self.alpha_feature > 0:
            terms.append(Term("feature", "feature", float(self.alpha_feature), {"distance": self.feature_kind}))
        if self.alpha_contrastive > 0:
            terms.append(
                Term(
                    "contrastive",
                    "contrastive",
                    float(self.alpha_contrastive),
                    {"temperature": self.contrastive_temperature, "max_positions": self.contrastive_max_positions},
                )
            )
        return terms


FP32_MAX = 3.4028234663852886e38
SEED_LIMIT = 2**32  # train.seed is in 0..SEED_LIMIT-1: numpy's seeding (accelerate's set_seed) takes no other


@dataclass
class TrainSection:
    """The optimisation and the run.

    cache_dir: teacher cache written by cache_teacher.py. A resumed run may name it at another path (moved or
        copied): the cache is checked by its identity (its config hash), not by where it is.
    trust_cache: skip the per-sequence checksums on read (the shards' agreement with the manifest is checked
        either way); only for a cache checked with `python -m kd.cache verify` since it was last written.
    output_dir: parent of run directories (a run directory moved elsewhere is resumed from there).
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
    eval_steps: also evaluate after these optimizer steps, e.g. log-spaced token budgets of one run
        ([20, 40, 80, 160]) without evaluating every 20 steps.
    eval_max_sequences: cap on eval-split sequences per evaluation (null = all).
    checkpoint_every: save a resumable checkpoint every this many optimizer steps; 0 = none during the run.
    save_final_state: keep a resumable checkpoint at the end (the optimizer's moments included: ~3x the weights);
        null = only when checkpoint_every > 0. Without it the run keeps only final/ (the weights), as a sweep
        needs, and a finished run cannot be continued.
    ema_decay: keep an exponential moving average of the student weights with this decay; null = off.
    early_stopping_patience: stop when eval/ce has not improved for this many evaluations; null = off.
    num_workers: DataLoader worker processes reading the cache.
    shuffle: training order per epoch: `shards` (shard order shuffled, then sequences shuffled within each run of
        `shuffle_buffer_shards` shards: mostly sequential reads) or `exact` (a uniform permutation: a random read
        per sequence). Both are permutations per epoch, disjoint across processes, and resume exactly.
    shuffle_buffer_shards: shards whose sequences are shuffled together with `shuffle: shards`.
    seed: seed of student init, data order and dropout.
    extra_eval_files: a second eval text, e.g. out of domain: files or globs (as data.files), packed into windows of
        the cache's seq_len with the student's tokenizer; every eval also logs extra_eval/ce, extra_eval/ppl,
        extra_eval/bits_per_char and extra_eval/bits_per_byte on it.
    log_with: trackers that get every metric record beside metrics.jsonl (which stays the record), through
        Accelerate: tensorboard (pip install -e '.[tensorboard]'; files in <run>/trackers/), wandb, mlflow,
        trackio, comet_ml, aim, clearml, dvclive, swanlab; the resolved config is logged as hyperparameters.
    eval_generations: with a chat cache, at every eval the student answers this many held-out prompts greedily (the
        eval split's first conversations, up to their first assistant reply); written with the reference replies
        to <run>/generations.jsonl and shown by `python -m kd.report` (0 = off).
    generation_tokens: the most tokens each of those replies may have.
    on_weaker_teacher: when the cached teacher's held-out bits per character are not better than the untrained
        student's (compared at step 0): warn (loudly, and train) or refuse (stop before training).
    """

    cache_dir: str = field(
        default="caches/default", metadata=dict(RESUME_FREE, **PATH)
    )  # a resume finds it by its identity
    trust_cache: bool = field(default=False, metadata=RESUME_FREE)
    output_dir: str = field(
        default="runs", metadata=dict(RESUME_FREE, **PATH)
    )  # a run directory may be moved and resumed
    run_name: str = "default"
    resume: bool = field(default=False, metadata=RESUME_FREE)
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
    eval_steps: list[int] = field(default_factory=list)
    eval_max_sequences: int | None = None
    checkpoint_every: int = 0
    save_final_state: bool | None = field(default=None, metadata=RESUME_FREE)
    ema_decay: float | None = None
    early_stopping_patience: int | None = None
    num_workers: int = field(default=1, metadata=RESUME_FREE)
    shuffle: Literal["shards", "exact"] = "exact"
    shuffle_buffer_shards: int = 8
    seed: int = 0
    on_weaker_teacher: Literal["warn", "refuse"] = field(default="warn", metadata=RESUME_FREE)
    log_with: list[str] = field(default_factory=list, metadata=RESUME_FREE)
    extra_eval_files: list[str] = field(default_factory=list, metadata=PATH)
    eval_generations: int = 4
    generation_tokens: int = 48

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise KDError(f"unknown LR schedule train.schedule={self.schedule!r}; choose one of {list(SCHEDULES)}")
        if self.max_steps < 0 or (self.max_steps == 0 and self.epochs <= 0):
            raise KDError("set train.max_steps > 0 or train.epochs > 0")
        if not 0 <= self.seed < SEED_LIMIT:  # numpy's seeding takes no other (a ValueError traceback at start-up)
            raise KDError(f"train.seed must be in 0..2**32-1, got {self.seed}")
        if self.eval_generations < 0 or self.generation_tokens < 1:
            raise KDError("train.eval_generations must be >= 0 and train.generation_tokens >= 1")
        for name in ("micro_batch_size", "gradient_accumulation_steps", "eval_every", "max_consecutive_skips"):
            if getattr(self, name) < 1:
                raise KDError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if any(s < 1 for s in self.eval_steps):
            raise KDError(f"train.eval_steps must be optimizer steps >= 1, got {self.eval_steps}")
        if not 0 < self.min_lr <= self.lr:
            raise KDError(
                f"need 0 < train.min_lr <= train.lr (got min_lr={self.min_lr}, lr={self.lr}): "
                "a step at LR 0 would be wasted"
            )
        if self.warmup_steps < 0 or not 0 <= self.warmup_fraction < 1:
            raise KDError("train.warmup_steps must be >= 0 and train.warmup_fraction in [0, 1)")
        if self.max_steps and self.warmup_steps >= self.max_steps:
            raise KDError(
                f"train.warmup_steps={self.warmup_steps} is not shorter than the run (train.max_steps={self.max_steps})"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise KDError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        # AdamW's first step size, lr / (1 - beta1), is an fp32 scalar: past fp32's range torch raises at step 1
        if self.lr / (1 - self.betas[0]) > FP32_MAX:
            raise KDError(
                f"train.lr={self.lr} overflows AdamW's fp32 step size (lr / (1 - beta1) must be at most "
                f"{FP32_MAX:.4g}): give a learning rate"
            )
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise KDError("train.max_grad_norm must be > 0 or null")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise KDError(f"train.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise KDError("train.early_stopping_patience must be >= 1 or null")
        # a slice's bound, [:n]: -1 evaluated all windows but the last, 0 none (an eval of nothing, NaN)
        if self.eval_max_sequences is not None and self.eval_max_sequences < 1:
            raise KDError(f"train.eval_max_sequences must be >= 1 or null (all), got {self.eval_max_sequences}")
        if self.shuffle_buffer_shards < 1:
            raise KDError(f"train.shuffle_buffer_shards must be >= 1, got {self.shuffle_buffer_shards}")
        if self.checkpoint_every < 0 or self.num_workers < 0:
            raise KDError("train.checkpoint_every and train.num_workers must be >= 0")
        unknown = sorted(set(self.log_with) - set(TRACKERS))
        if unknown:
            raise KDError(f"unknown tracker(s) train.log_with={unknown}; choose from {list(TRACKERS)}")
        if "/" in self.run_name or not self.run_name:
            raise KDError(f"train.run_name must be a plain directory name, got {self.run_name!r}")


@dataclass
class TrainConfig:
    """Config of train_student.py."""

    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self):
        if (
            needs_hidden(self.loss.trained_terms())
            and not self.loss.feature_layers
            and self.student.from_teacher is None
        ):
            # a student cut from the teacher gets its pairs from the layers it kept (kd.prune.feature_pairs)
            raise KDError("feature / contrastive loss terms need loss.feature_layers (layer pairs to match)")


# Keys a resumed run may change without changing what it computes.
RESUME_FREE_KEYS = marked_keys(TrainConfig, RESUME_FREE)
# Keys that name files or folders: recorded resolved by a run, and compared resolved on resume
PATH_KEYS = marked_keys(TrainConfig, PATH)
# Accelerate's trackers (accelerate.utils.LoggerType, "all" aside)
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive", "swanlab")
