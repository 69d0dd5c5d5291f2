"""The config of `cache_teacher.py`: what teacher, what text, what to store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from kd.config import NOT_CONTENT, PATH, marked_keys
from kd.errors import KDError


@dataclass
class ServerConfig:
    """A teacher served by an inference server (vLLM, kd/served.py) instead of loaded in process.

    url: the server's base URL (http://host:port), or a list of servers of the same model: requests go to them in
        turn (and a failed one is retried on the next).
    model: the served model's name as requests give it (null = the server's only model).
    concurrency: requests in flight per process; each carries teacher.batch_size windows.
    timeout_s: seconds to wait for one request's answer.
    retries: tries after the first for a request that fails in a way that may pass (connection refused or reset, a
        timeout, HTTP 429 or 5xx), with exponential backoff from backoff_s (at most 30 s between tries).
    backoff_s: the first wait before a retry.
    """

    url: str | list[str]
    model: str | None = None
    concurrency: int = 4
    timeout_s: float = 600.0
    retries: int = 5
    backoff_s: float = 1.0

    def __post_init__(self):
        if self.concurrency < 1:
            raise KDError(f"teacher.server.concurrency must be >= 1, got {self.concurrency}")
        if self.retries < 0:
            raise KDError(f"teacher.server.retries must be >= 0, got {self.retries}")
        if not self.timeout_s > 0 or self.backoff_s < 0:
            raise KDError(
                f"teacher.server.timeout_s must be > 0 and backoff_s >= 0, got {self.timeout_s} and {self.backoff_s}"
            )


@dataclass
class TeacherConfig:
    """The teacher model.

    model: local folder, `asset:NAME` (see `python -m kd.assets`) or hub id of any HF causal LM, dense or MoE.
        With a `server`, what describes the served model: its config and tokenizer (the weights are not read).
    revision: hub revision (branch, tag or commit) when `model` is a hub id; recorded in the cache.
    dtype: compute dtype of the forward pass (fp16 for GPUs without bf16, such as the P100). Log-softmax is fp32 always.
    attn_implementation: passed to `from_pretrained` ("sdpa", "eager", "flash_attention_2", ...).
    batch_size: sequences per forward pass (with a `server`: windows per request). Does not change what is stored,
        so a resumed run may change it.
    device_map: null = the whole teacher on each process's device. For a teacher larger than one GPU, its layers
        placed over the `devices_per_process` GPUs of each process by transformers' device_map: `balanced` (even
        split), `sequential` (fill each GPU in turn), `auto`; or an explicit {module name: device} map ("cpu",
        "disk", a GPU index), as transformers takes it. Each process is then one replica, and the processes share
        the shards as usual (data parallel over replicas). Does not change what is stored (tests check a teacher in
        two parts against the whole one), so a resumed run may change it.
    devices_per_process: GPUs each process's teacher spans under a named device_map: process with local rank r
        takes GPUs r*D .. r*D+D-1 of its machine, so launch GPUs / D processes per machine.
    server: the teacher behind an inference server (ServerConfig; null = in process). The cache then records the
        served model (name, where the server loaded it from) as the teacher's identity, and `dtype` as declared:
        set it to the server's own dtype, which the server does not report.
    """

    model: str = field(default="asset:smollm2-135m-instruct", metadata=PATH)
    revision: str | None = None
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    attn_implementation: str = "sdpa"
    batch_size: int = field(default=8, metadata=NOT_CONTENT)
    device_map: str | dict[str, Any] | None = field(default=None, metadata=NOT_CONTENT)
    devices_per_process: int = field(default=1, metadata=NOT_CONTENT)
    server: ServerConfig | None = field(default=None, metadata=NOT_CONTENT)

    def __post_init__(self):
        if self.batch_size < 1:
            raise KDError(f"teacher.batch_size must be >= 1, got {self.batch_size}")
        if self.devices_per_process < 1:
            raise KDError(f"teacher.devices_per_process must be >= 1, got {self.devices_per_process}")
        if isinstance(self.device_map, str) and self.device_map not in NAMED_DEVICE_MAPS:
            raise KDError(
                f"teacher.device_map={self.device_map!r} is not one of {', '.join(NAMED_DEVICE_MAPS)}, an explicit "
                "{module: device} map, or null"
            )
        if self.devices_per_process > 1 and not isinstance(self.device_map, str):
            raise KDError(
                f"teacher.devices_per_process={self.devices_per_process} needs a named teacher.device_map "
                "(balanced, sequential or auto) to place the teacher over those GPUs"
            )


NAMED_DEVICE_MAPS = ("balanced", "sequential", "auto")


@dataclass
class DataConfig:
    """The text to cache. Read as a stream (kd/data/): memory does not grow with the corpus.

    files: local files or globs (`asset:` paths allowed), read in the order given (each glob sorted). .txt = one
        document per file; .jsonl/.json/.csv/.parquet = one document per record; text formats may be compressed
        (.gz, .zst). Set either `files` or `dataset`.
    eval_files: held-out files for the eval split (then every document of `files` is a training document).
    dataset: a Hugging Face dataset instead of files: hub name, local folder of data files, or `save_to_disk` folder.
    dataset_config: the dataset's config (subset) name.
    dataset_split: which split of the dataset to read; the train/eval split below is made from it.
    eval_dataset_split: a held-out split of the same dataset for eval (then all of `dataset_split` is training data).
    streaming: read `dataset` as a stream (nothing converted to disk first) or memory-mapped; same cache either way.
    text_field: field (column) holding the document text.
    decode_errors: invalid UTF-8 in a file is an error naming the file and line (`strict`), or read as U+FFFD (`replace`).
    bad_records: a record with no usable text (not a JSON object, no `text_field`, a non-string value, invalid JSON)
        is an error naming the file and line (`error`), or skipped and counted (`skip`: the count and the first
        few are printed and kept in the manifest's ingest record).
    seq_len: tokens per packed window.
    separator_token: token placed after each document; null = the tokenizer's EOS token.
    eval_fraction: without a held-out source, the share of documents held out for eval, decided per document from
        a keyed hash of its text (identical documents always land on the same side).
    split_seed: key of that hash.
    max_train_sequences: cap on training windows (null = all): the first windows are kept, and reading stops early.
    max_eval_sequences: cap on eval windows (null = all), likewise.
    unit_bytes: the corpus is tokenized in units of about this many input bytes (the unit of parallel work and of
        resume; a split's last window in each unit may be partial, so keep it >> seq_len tokens).
    format: `text` (documents packed back to back) or `chat`: each record is a conversation (a `messages_field`
        list of {role, content} turns, or `prompt_field` + `completion_field`), rendered with the teacher
        tokenizer's chat template, with a per-token loss mask (kd/data/chat.py); `bad_records` applies to
        malformed conversations too. Chat needs .jsonl/.json/.parquet files or a dataset.
    loss_mask: chat: which tokens the losses count: `assistant` (every assistant turn's content and end-of-turn
        token), `completion` (the last assistant turn only) or `all`.
    chat_template: chat: a Jinja template to render with instead of the tokenizer's own (a string, or an
        `asset:`/file path to a .jinja file); needed when the tokenizer has none.
    messages_field: chat: the field holding a record's list of {role, content} turns.
    prompt_field: chat: the field holding a prompt (a string, or a list of turns) of prompt/completion records.
    completion_field: chat: the field holding the completion (the assistant's reply) of prompt/completion records.
    packing: chat: `first_fit` (several whole conversations per window, each attending only to itself:
        per-conversation position ids and a block-diagonal causal mask, in the teacher pass and the student) or
        `one_per_window` (one conversation per window, the rest padding). A conversation longer than seq_len is
        truncated to its first seq_len tokens (counted; dropped, and counted, if nothing it keeps is in the loss).
    """

    files: list[str] = field(default_factory=list, metadata=PATH)
    eval_files: list[str] = field(default_factory=list, metadata=PATH)
    dataset: str | None = field(default=None, metadata=PATH)  # a local folder, or a hub name as it is
    dataset_config: str | None = None
    dataset_split: str = "train"
    eval_dataset_split: str | None = None
    streaming: bool = field(default=True, metadata=NOT_CONTENT)
    text_field: str = "text"
    decode_errors: Literal["strict", "replace"] = "strict"
    bad_records: Literal["error", "skip"] = "error"
    seq_len: int = 256
    separator_token: str | None = None
    eval_fraction: float = 0.1
    split_seed: int = 0
    max_train_sequences: int | None = None
    max_eval_sequences: int | None = None
    unit_bytes: int = 64 * 2**20
    format: Literal["text", "chat"] = "text"
    loss_mask: Literal["assistant", "completion", "all"] = "assistant"
    chat_template: str | None = field(default=None, metadata=PATH)
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    packing: Literal["first_fit", "one_per_window"] = "first_fit"

    @property
    def has_eval_source(self) -> bool:
        """An explicit held-out source: then no document of the main source goes to eval."""
        return bool(self.eval_files or self.eval_dataset_split)

    def __post_init__(self):
        if self.seq_len < 2:
            raise KDError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if not self.has_eval_source and not 0.0 < self.eval_fraction < 1.0:
            raise KDError(
                f"data.eval_fraction must be in (0, 1) without a held-out source (data.eval_files or "
                f"data.eval_dataset_split), got {self.eval_fraction}"
            )
        for name in ("max_train_sequences", "max_eval_sequences"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise KDError(f"data.{name} must be >= 1 or null, got {getattr(self, name)}")
        if self.unit_bytes < 1:
            raise KDError(f"data.unit_bytes must be >= 1, got {self.unit_bytes}")
        if not -(2**63) <= self.split_seed < 2**63:  # the split hash's 8-byte key (it was an OverflowError mid-ingest)
            raise KDError(f"data.split_seed must fit in 64 bits (-2**63..2**63-1), got {self.split_seed}")
        if not self.files and not self.dataset:
            raise KDError("no data given: set data.files (local files) or data.dataset (a Hugging Face dataset)")
        if self.files and self.dataset:
            raise KDError("both data.files and data.dataset are set: choose one source")
        if self.eval_files and not self.files:
            raise KDError("data.eval_files needs data.files (for a dataset, use data.eval_dataset_split)")
        if self.eval_dataset_split and not self.dataset:
            raise KDError("data.eval_dataset_split needs data.dataset (for files, use data.eval_files)")


@dataclass
class CacheSection:
    """What is stored and where.

    output_dir: the cache directory (created if missing).
    top_k: teacher tokens kept per position, with their log-probs under the full softmax.
    hidden_layers: indices into the teacher's `output_hidden_states` tuple to store (0 = embeddings, num_hidden_layers = last).
    id_codec: how token ids are stored: `bitpack` (ceil(log2 V) bits each; sampled targets stored ragged, without
        padding) or `plain` (uint16/int32). Exact either way.
    logprob_codec: top-k log-probs as `q8` (8 bits + a per-position anchor and step; the top-1 value is exact, the
        rest within half a step; KD-loss error measured in bench/bench_targets.py), `fp16` or `fp32`.
    hidden_codec: hidden states as `fp16`, `fp32`, `q8` (8 bits + a per-token anchor and step) or `lowrank`
        (coefficients on the top `hidden_rank` principal directions of each stored layer, fitted on the teacher's
        first `hidden_basis_tokens` train tokens before any shard is written; decoded to the full hidden size).
    hidden_rank: directions kept per layer by `lowrank` (at most the teacher's hidden size).
    hidden_coefficients: how `lowrank` stores its coefficients: `q8` (rank + 8 bytes per token and layer), `fp16`
        or `fp32` (with hidden_rank = hidden size, exact up to fp32 rounding).
    hidden_basis_tokens: train tokens (from the first window on, in order) the `lowrank` basis is fitted on.
    sample_n: also store sampled targets: per position, this many draws with replacement from the teacher's full
        distribution at T = 1, kept as distinct ids + counts (0 = off; at most 255).
    sample_seed: seed of those draws; each sequence has its own stream, so contents never depend on batching.
    store_text: keep each window's text (chat: its conversations, kd.data.pack.chat_window_text) and every teacher
        token's character span, so students with OTHER tokenizers can be aligned to this cache later
        (cross-tokenizer KD); about 12 bytes per token. Needs a fast tokenizer.
    shard_bytes: target size of a shard (an HDF5 file: the unit of the teacher pass's work, resume and checksums,
        held in memory while it is written): sequences per shard = shard_bytes // the bytes of one sequence
        (kd.cache.shard_sequences), so a shard holds at most shard_bytes plus one sequence.
    sequences_per_shard: a fixed number of sequences per shard instead (null = from shard_bytes).
    overwrite: replace a cache in output_dir that was made with a different config (otherwise that is refused).
    """

    output_dir: str = field(default="caches/default", metadata=dict(NOT_CONTENT, **PATH))
    top_k: int = 256
    hidden_layers: list[int] = field(default_factory=list)
    id_codec: Literal["bitpack", "plain"] = "bitpack"
    logprob_codec: Literal["q8", "fp16", "fp32"] = "q8"
    hidden_codec: Literal["fp16", "fp32", "q8", "lowrank"] = "fp16"
    hidden_rank: int = 128
    hidden_coefficients: Literal["q8", "fp16", "fp32"] = "q8"
    hidden_basis_tokens: int = 65536
    sample_n: int = 0
    sample_seed: int = 0
    store_text: bool = True
    shard_bytes: int = 256 * 2**20
    sequences_per_shard: int | None = None
    overwrite: bool = field(default=False, metadata=NOT_CONTENT)

    def __post_init__(self):
        if self.top_k < 1:
            raise KDError(f"cache.top_k must be >= 1, got {self.top_k}")
        if not 0 <= self.sample_n <= 255:
            raise KDError(f"cache.sample_n must be in 0..255 (counts are stored as uint8), got {self.sample_n}")
        if self.sequences_per_shard is not None and self.sequences_per_shard < 1:
            raise KDError(f"cache.sequences_per_shard must be >= 1 or null, got {self.sequences_per_shard}")
        if self.shard_bytes < 1:
            raise KDError(f"cache.shard_bytes must be >= 1, got {self.shard_bytes}")
        if self.hidden_rank < 1:
            raise KDError(f"cache.hidden_rank must be >= 1, got {self.hidden_rank}")
        if self.hidden_basis_tokens < 2:
            raise KDError(f"cache.hidden_basis_tokens must be >= 2, got {self.hidden_basis_tokens}")
        if len(set(self.hidden_layers)) != len(self.hidden_layers):
            raise KDError(f"cache.hidden_layers repeats a layer: {self.hidden_layers}")


@dataclass
class CacheConfig:
    """Config of cache_teacher.py."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheSection = field(default_factory=CacheSection)


# Keys that do not change what is stored (their fields say so: NOT_CONTENT): a re-run may differ in these and still
# resume the same cache.
NON_CONTENT_KEYS = marked_keys(CacheConfig, NOT_CONTENT)
