"""What a cache says about itself: its identity (the config hash), the description every shard and the manifest
carry (`cache_metadata`), the manifest written last from the shards' sidecars (`manifest_record`), and the typed
manifest every reader of a finished cache sees (`Manifest`, older formats upgraded on read).

The identity is the content config (the config minus keys that change nothing stored, kd.cache_config's
NON_CONTENT_KEYS), the teacher's weights (not their path), the shard format and, with sampled targets, the sampling
scheme: a resumed run whose identity differs redoes its shards instead of mixing them in.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, fields

from kd import __version__
from kd.cache.codecs import codec_specs
from kd.cache.format import (
    FORMAT,
    FORMAT_VERSION,
    SPLITS,
    TEACHER_SCORE_COLUMNS,
    Dims,
    manifest_codecs,
    shard_sequences,
)
from kd.cache_config import NON_CONTENT_KEYS, CacheConfig
from kd.config import flatten, resolved_paths
from kd.data.ingest import CHAT_COUNTS, IngestSpec
from kd.io import json_sha256
from kd.teacher import SAMPLER
from kd.textscore import score_record


def content_config(cfg_dict: dict) -> dict:
    """The config minus keys that do not change what is stored (with what flattening puts under them: an explicit
    teacher.device_map flattens to one key per module)."""
    return {
        k: v
        for k, v in flatten(cfg_dict).items()
        if k not in NON_CONTENT_KEYS and not k.startswith(tuple(n + "." for n in NON_CONTENT_KEYS))
    }


def config_hash(cfg: CacheConfig, cfg_dict: dict, weights: dict) -> str:
    """The cache's identity (module docstring), repeated in every shard's kd_meta and checked by the reader."""
    content = dict(content_config(cfg_dict), teacher_weights=weights["digest"], shard_format=FORMAT_VERSION)
    if cfg.cache.sample_n:  # shards drawn by another sampling scheme are redone, never mixed in on resume
        content["sampler"] = SAMPLER
    return json_sha256(content)


def cache_metadata(cfg: CacheConfig, config_hash: str, model_cfg, tokenizer, spec: IngestSpec, weights: dict) -> dict:
    """What every shard's kd_meta and the manifest carry: the content's description, nothing about this run."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kd_version": __version__,
        "config_hash": config_hash,
        "teacher": {
            "name_or_path": cfg.teacher.model,
            "revision": cfg.teacher.revision,
            "commit_hash": getattr(model_cfg, "_commit_hash", None),
            "model_type": model_cfg.model_type,
            "vocab_size": model_cfg.vocab_size,
            "hidden_size": model_cfg.hidden_size,
            "num_hidden_layers": model_cfg.num_hidden_layers,
            "dtype": cfg.teacher.dtype,
            "weights": weights,
        },
        "tokenizer": {
            "fingerprint": spec.tokenizer_fingerprint,
            "class": type(tokenizer).__name__,
            "size": len(tokenizer),
            "separator_id": spec.sep_id,
            "separator": spec.sep_text,
        },
        "top_k": cfg.cache.top_k,
        "hidden_layers": cfg.cache.hidden_layers,
        "seq_len": cfg.data.seq_len,
        "codecs": codec_specs(
            model_cfg.vocab_size,
            cfg.cache.id_codec,
            cfg.cache.logprob_codec,
            cfg.cache.hidden_codec,
            cfg.cache.sample_n,
            cfg.cache.hidden_rank,
            cfg.cache.hidden_coefficients,
            chat=spec.chat is not None,
        ),
        "position_targets": "next token (t+1)",
        "sample_n": cfg.cache.sample_n,
        "sampler": SAMPLER if cfg.cache.sample_n else None,
        "store_text": cfg.cache.store_text,
        "dataset": {
            "files": cfg.data.files,
            "eval_files": cfg.data.eval_files,
            "dataset": cfg.data.dataset,
            "dataset_config": cfg.data.dataset_config,
            "dataset_split": cfg.data.dataset_split,
            "eval_dataset_split": cfg.data.eval_dataset_split,
            "text_field": cfg.data.text_field,
            "split_rule": (
                "held-out source: every main document is a training document"
                if cfg.data.has_eval_source
                else f"per document: eval iff blake2b(text, key=split_seed={cfg.data.split_seed}) / 2^64 "
                f"< eval_fraction={cfg.data.eval_fraction}"
            ),
            "unit_bytes": cfg.data.unit_bytes,
        },
    }
    if spec.chat is not None:  # what the loss_mask and segments fields mean (kd/data/chat.py, kd/data/pack.py)
        template = spec.chat["template"]
        meta["chat"] = {
            "fields": spec.chat["fields"],
            "loss_mask": spec.chat["loss_mask"],
            "packing": spec.chat["packing"],
            "template": "the tokenizer's own" if template is None else "data.chat_template",
            # the Jinja text itself (a few KB): a student without a template of its own may render with it
            "template_text": template or tokenizer.chat_template,
            "attention": "causal within each conversation (segments), position ids restart per conversation",
        }
    # shard boundaries: a fixed count, or as many sequences as fit cache.shard_bytes (from the config alone)
    meta["sequences_per_shard"] = cfg.cache.sequences_per_shard or shard_sequences(meta, cfg.cache.shard_bytes)
    return meta


def manifest_record(meta: dict, cfg_dict: dict, records: dict, index_refs: dict, num_sequences: dict, stats: dict):
    """The manifest: the cache-wide `meta`, the resolved config, and per split its counts, fingerprint, teacher score
    and the reference to its binary shard index. `records`: each split's shard sidecars, in order; `index_refs`: what
    writing each split's shard index returned."""
    splits = {}
    for split in SPLITS:
        shards = records[split]
        splits[split] = {
            "num_sequences": num_sequences[split],
            "num_tokens": sum(sh["num_tokens"] for sh in shards),
            "num_documents": sum(sh["num_documents"] for sh in shards),
            # sha256 over the shards' input fingerprints, in order: the windows the teacher saw
            "fingerprint": hashlib.sha256("".join(sh["input_sha256"] for sh in shards).encode()).hexdigest(),
            "shard_index": index_refs[split],
        }
        if all("teacher_score" in sh for sh in shards):  # shards written by an older kd carry none
            total = [sum(sh["teacher_score"][k] for sh in shards) for k in TEACHER_SCORE_COLUMNS]
            splits[split]["teacher_score"] = score_record(*total)
    total_bytes = sum(sh["bytes"] for sp in records.values() for sh in sp)
    total_tokens = sum(sp["num_tokens"] for sp in splits.values())
    meta = dict(
        meta,
        dataset=dict(
            meta["dataset"],
            fingerprint=hashlib.sha256("".join(splits[s]["fingerprint"] for s in SPLITS).encode()).hexdigest(),
        ),
    )
    # `ingest` and `created_unix` describe this run, not the content: with more processes, or after a resume,
    # more input may have been read past a cap. config_hash stays: the cache's identity, which every shard's
    # kd_meta repeats and the reader checks
    return dict(
        meta,
        config=cfg_dict,
        paths=resolved_paths(cfg_dict, CacheConfig),  # the config's files and folders as the files they name
        splits=splits,
        bytes=total_bytes,
        bytes_per_token=total_bytes / total_tokens,
        created_unix=time.time(),
        ingest={
            k: stats[k]
            for k in ("documents", "empty_documents", "bad_records", "long_documents", "units", "reused", "tokens")
            + ("seconds",)
            + (CHAT_COUNTS if "chat" in meta else ())
        },
    )


# ---- the typed manifest: what a reader of a finished cache sees ------------------------------------------------


@dataclass(frozen=True)
class TeacherInfo:
    """The teacher the cache was made with (its weights' fingerprint from format 4 on; None before)."""

    name_or_path: str
    revision: str | None
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    dtype: str
    model_type: str | None = None
    commit_hash: str | None = None
    weights: dict | None = None


@dataclass(frozen=True)
class TokenizerInfo:
    """The teacher's tokenizer: its fingerprint (kd.models.tokenizer_fingerprint) and the documents' separator."""

    fingerprint: str
    size: int
    separator_id: int | None = None
    separator: str | None = None


@dataclass(frozen=True)
class ChatInfo:
    """A chat cache (format 7 on, data.format=chat): what its loss_mask and segments fields mean."""

    loss_mask: str  # assistant | completion | all (kd.data.chat)
    packing: str  # one_per_window | first_fit (kd.data.pack.ChatPacker)
    fields: list
    template: str  # "the tokenizer's own" | "data.chat_template"
    template_text: str | None  # the Jinja text the conversations were rendered with
    attention: str


@dataclass(frozen=True)
class DatasetInfo:
    """Where the cached text came from (the config's sources) and the rule that split it; empty before format 3."""

    files: list = field(default_factory=list)
    eval_files: list = field(default_factory=list)
    dataset: str | None = None
    dataset_config: str | None = None
    dataset_split: str | None = None
    split_rule: str | None = None
    fingerprint: str | None = None  # sha256 over the splits' fingerprints: the windows the teacher saw


@dataclass(frozen=True)
class SplitInfo:
    num_sequences: int
    num_tokens: int
    fingerprint: str  # sha256 over the shards' input fingerprints: the windows the teacher saw
    num_shards: int = 0
    num_documents: int = 0
    teacher_score: dict | None = None  # the teacher's own CE and bits per character (kd/textscore.py), when recorded

    @classmethod
    def of(cls, split: dict) -> SplitInfo:
        """Before format 6 the shard records, and before format 3 the documents, were listed in the manifest."""
        return cls(
            num_sequences=split["num_sequences"],
            num_tokens=split["num_tokens"],
            fingerprint=split.get("fingerprint", ""),
            num_shards=split["shard_index"]["num_shards"] if "shard_index" in split else len(split["shards"]),
            num_documents=split.get("num_documents", len(split.get("documents", []))),
            teacher_score=split.get("teacher_score"),
        )


@dataclass(frozen=True)
class Manifest:
    """A finished cache's manifest.json, typed, for everything that reads a cache (`TeacherCache.info`). Older
    formats are upgraded here, on read, so no reader tests for keys: `chat` is None for a text cache, `sample_n` 0
    and `store_text` False where a cache holds none, `config_hash` None before format 4."""

    format_version: int
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    top_k: int
    hidden_layers: list[int]
    seq_len: int
    sample_n: int
    store_text: bool
    config_hash: str | None
    chat: ChatInfo | None
    splits: dict[str, SplitInfo]
    dataset: DatasetInfo
    codecs: dict  # each stored field's codec spec (kd/cache/codecs.py); format 1's plain storage as specs
    bytes: int = 0
    bytes_per_token: float = 0.0
    ingest: dict = field(default_factory=dict)  # what the caching run read (counts, seconds)

    @property
    def dims(self) -> Dims:
        """The sizes and switches the field table (kd/cache/format.py FIELDS) is read with."""
        return Dims(
            self.seq_len,
            self.top_k,
            len(self.hidden_layers),
            self.teacher.hidden_size,
            "loss_mask" in self.codecs,
            self.sample_n,
            self.store_text,
        )

    @classmethod
    def of(cls, m: dict) -> Manifest:
        """From a manifest's JSON as read (kd.cache.reader.read_manifest checks its format and version)."""

        def pick(record_cls, record: dict):
            names = {f.name for f in fields(record_cls)}
            return record_cls(**{k: v for k, v in record.items() if k in names})

        chat = m.get("chat")
        return cls(
            format_version=m["format_version"],
            teacher=pick(TeacherInfo, m["teacher"]),
            tokenizer=pick(TokenizerInfo, m["tokenizer"]),
            top_k=m["top_k"],
            hidden_layers=list(m["hidden_layers"]),
            seq_len=m["seq_len"],
            sample_n=m.get("sample_n") or 0,
            store_text=bool(m.get("store_text")),
            config_hash=m.get("config_hash"),
            chat=None
            if chat is None
            else ChatInfo(
                loss_mask=chat["loss_mask"],
                packing=chat["packing"],
                fields=chat["fields"],
                template=chat["template"],
                template_text=chat.get("template_text"),
                attention=chat["attention"],
            ),
            splits={name: SplitInfo.of(split) for name, split in m["splits"].items()},
            dataset=pick(DatasetInfo, m.get("dataset") or {}),
            codecs=manifest_codecs(m),
            bytes=m.get("bytes", 0),
            bytes_per_token=m.get("bytes_per_token", 0.0),
            ingest=m.get("ingest") or {},
        )
