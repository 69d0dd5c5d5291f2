"""The cache format: constants, names, the table of fields, and what a shard must hold.

`FIELDS` is the one table the writer (kd/cache/writer.py), the reader (kd/cache/reader.py), `verify`, the size
estimates and the manifest's dataset check are driven by: a new field is one row here (and its Store, or a codec
of kd/cache/codecs.py, plus their round-trip tests).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kd.cache import codecs
from kd.data.ingest import SPLITS  # noqa: F401 - the splits the ingest writes are the cache's

FORMAT = "kd-teacher-cache"
FORMAT_VERSION = 8
# 8: `teacher_score` [N, 4] per shard: the teacher's own score on each window (nats on its scored targets, their
#    count, characters and bytes; kd/textscore.py), so that a student evaluated on the first windows of a split
#    (train.eval_max_sequences) is compared with the teacher on the same windows; 7 and older carry the score per
#    shard only (in its record), and a capped eval is then compared with the teacher's score on the whole split
# 7: chat caches (data.format=chat) add two per-token fields, `loss_mask` (the tokens the loss counts) and
#    `segments` (each token's conversation in its window: attention stays within it); text caches as 6, and a
#    6 cache reads as every token counting in one causal stream
# 6: per-shard records in a binary index per split (`train-shards.npy`), not in the manifest's JSON (100,000
#    records load in milliseconds instead of parsing ~37 MB of JSON); shards as in 5
# 5: a checksum per sequence and dataset (`checksums`), checked on every read, instead of 4's HDF5 fletcher32 per
#    chunk (4 is still read, its fletcher32 checked by HDF5)
# 4: the manifest keeps config_hash; 3: streaming ingest (per-document split rule and counts, no document list);
#    shards as in 2
MANIFEST = "manifest.json"
CONFIG_FILE = "cache_config.json"
META_ATTR = "kd_meta"
# Open shard files per reading process (each DataLoader worker): far below common `ulimit -n` values (1024, 256),
# and enough that a sequential or shard-buffered read reopens nothing.
MAX_OPEN_FILES = 32


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.h5"


def shard_index_name(split: str) -> str:
    return f"{split}-shards.npy"


# One record per shard in DIR/<split>-shards.npy (numpy .npy, no pickles), ordered by first sequence; the manifest
# names the file with its sha256 and record count. Older manifests list the same records as JSON objects.
SHARD_RECORD = np.dtype(
    [
        ("file", "S32"),
        ("first_sequence", "<i8"),
        ("num_sequences", "<i8"),
        ("num_tokens", "<i8"),
        ("num_documents", "<i8"),
        ("bytes", "<i8"),
        ("sha256", "S64"),
        ("input_sha256", "S64"),
    ]
)


def records_table(records: list[dict]) -> np.ndarray:
    """Shard records (sidecar or manifest dicts) -> a SHARD_RECORD array, by first sequence; missing keys are 0/""."""
    table = np.zeros(len(records), SHARD_RECORD)
    for name in SHARD_RECORD.names:
        table[name] = [r.get(name, 0 if SHARD_RECORD[name].kind == "i" else "") for r in records]
    return np.sort(table, order="first_sequence")


def sidecar_path(shard):
    return shard.with_suffix(".json")


@dataclass(frozen=True)
class Dims:
    """A cache's sizes: T = seq_len, k = top_k, L = stored layers, H = teacher hidden size, n = sampled targets per
    position (0: none); chat: the cache holds packed conversations (its codecs record has `loss_mask`); text: it
    keeps each window's text and token spans."""

    T: int
    k: int
    L: int
    H: int
    chat: bool = False
    n: int = 0
    text: bool = False

    @classmethod
    def of(cls, manifest: dict) -> Dims:
        """From a manifest, a shard's kd_meta or the teacher pass's description of the cache."""
        return cls(
            manifest["seq_len"],
            manifest["top_k"],
            len(manifest["hidden_layers"]),
            manifest["teacher"]["hidden_size"],
            "loss_mask" in manifest_codecs(manifest),
            manifest.get("sample_n", 0),
            bool(manifest.get("store_text")),
        )


@dataclass(frozen=True)
class Field:
    """A stored field: its name (its key in the manifest's `codecs` where it has one), whether a cache stores it,
    the names its decoded values go by (the reader's item keys, kd.teacher.TeacherOutputs' attributes; default: the
    name), and how a shard stores it (`store`: a kd.cache.codecs.Store from the manifest's codec specs, the sizes and
    the cache's HiddenBasis)."""

    name: str
    stored: Callable[[Dims], bool]
    store: Callable[[dict, Dims, object], codecs.Store]
    outputs: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return self.outputs or (self.name,)


def _coded(name: str, shape: Callable[[Dims], tuple]) -> Callable[[dict, Dims, object], codecs.Store]:
    """A per-position field of decoded per-sequence `shape`, stored through the codec its spec names (the basis goes
    to the hidden states' codec, for `lowrank`)."""
    return lambda specs, d, basis: codecs.Coded(
        name, codecs.field_codec(specs[name], basis if name == "hidden_states" else None), shape(d)
    )


FIELDS = (
    Field("input_ids", lambda d: True, _coded("input_ids", lambda d: (d.T,))),
    Field("topk_ids", lambda d: True, _coded("topk_ids", lambda d: (d.T, d.k))),
    Field("topk_logprobs", lambda d: True, _coded("topk_logprobs", lambda d: (d.T, d.k))),
    Field("hidden_states", lambda d: d.L > 0, _coded("hidden_states", lambda d: (d.L, d.T, d.H))),
    Field("loss_mask", lambda d: d.chat, _coded("loss_mask", lambda d: (d.T,))),
    Field("segments", lambda d: d.chat, _coded("segments", lambda d: (d.T,))),
    # ids and counts [T, n], decoded together; codec `ragged` or plain arrays (codecs.SAMPLE_CODECS)
    Field(
        "samples",
        lambda d: d.n > 0,
        lambda specs, d, basis: codecs.sample_codec(specs["samples"], d.T, d.n),
        ("sample_ids", "sample_counts"),
    ),
    Field("text", lambda d: d.text, lambda specs, d, basis: codecs.Utf8Text(d.T), ("text", "token_spans")),
)
# A field's rows are the `checksums` columns in this order: a new field goes last.


def stored_fields(dims: Dims) -> list[Field]:
    return [f for f in FIELDS if f.stored(dims)]


def field_stores(specs: dict, dims: Dims, basis=None, wanted=None) -> dict[str, codecs.Store]:
    """Field name -> its Store, for every field the cache stores (with `wanted`: only those with an output in it)."""
    return {
        f.name: f.store(specs, dims, basis) for f in stored_fields(dims) if wanted is None or set(f.names) & set(wanted)
    }


def manifest_codecs(manifest: dict) -> dict:
    return manifest["codecs"] if manifest["format_version"] >= 2 else codecs.v1_codec_specs(manifest)


def row_datasets(specs: dict, dims: Dims) -> list[str]:
    """The datasets with one row per sequence (the ragged `sample_bytes`: one [start, end) slice per sequence), in
    the column order of a shard's `checksums` table."""
    return [ds for store in field_stores(specs, dims).values() for ds in store.row_datasets()]


# Datasets a shard holds whole (one value per sequence, or the ragged offsets): checksummed whole, checked on open.
SHARD_DATASETS = ("lengths", "sequence_index", "sample_offsets", "teacher_score")
# a teacher_score row: the teacher's nats on the window's scored targets, their count, characters and bytes
TEACHER_SCORE_COLUMNS = ("nats", "tokens", "chars", "bytes")
WINDOW_SCORES_SINCE = 8  # the first format whose shards keep teacher_score (older ones: per shard record only)


def checksum(a) -> int:
    """An error-detecting checksum of an array's (or bytes') raw bytes, written at cache time per sequence and
    dataset and checked on every read. Not cryptographic (`verify` checks each shard's sha256): it catches flipped
    bits, zeroed or stale pages and misplaced data. Up to 64 KiB: zlib's crc32 (about a microsecond per KiB). Above:
    the sums (modulo 2^64) of the little-endian uint64 words of each 8 KiB block, combined with odd weights
    1, 3, 5, ... (an odd weight is invertible modulo 2^64, so a change to any one word, a single flipped bit
    included, changes the result; so does moving a block), plus the crc32 of the bytes after the last whole block.
    The block sums run at memory speed, 7x crc32, which matters because a sequence's hidden states (~600 KB) are
    checked on every read (bench/bench_integrity.py)."""
    if isinstance(a, np.ndarray) and a.nbytes <= 1 << 16 and a.flags.c_contiguous:
        return zlib.crc32(a)  # the buffer as is: a row read from HDF5 always is contiguous (saves ~3 us of views)
    b = np.frombuffer(a, np.uint8) if isinstance(a, bytes) else np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    if b.size <= 1 << 16:
        return zlib.crc32(b)
    n = b.size >> 13 << 13
    sums = b[:n].view("<u8").reshape(-1, 1024).sum(axis=1, dtype=np.uint64)
    total = int(np.dot(sums, _odd_weights(sums.size)))  # wraps modulo 2^64, as uint64 arithmetic does
    tail = zlib.crc32(b[n:]) if n < b.size else 0
    return (total ^ b.size ^ (tail << 32)) & 0xFFFFFFFFFFFFFFFF


@functools.lru_cache(maxsize=64)
def _odd_weights(n: int) -> np.ndarray:
    return np.arange(1, 2 * n, 2, dtype=np.uint64)


def dataset_mismatch(f, manifest: dict, n: int) -> str | None:
    """The first dataset of an open shard of n sequences whose presence, shape or dtype differs from what the
    manifest implies (None if all match). Shared by `verify` and the reader's check on open."""
    dims, specs = Dims.of(manifest), manifest_codecs(manifest)
    expected = {"lengths": ((n,), None), "sequence_index": ((n,), None)}
    if manifest["format_version"] >= WINDOW_SCORES_SINCE:
        expected["teacher_score"] = ((n, len(TEACHER_SCORE_COLUMNS)), np.dtype(np.float64))
    stores = field_stores(specs, dims).values()
    for store in stores:
        expected.update(store.expected(n))
    if manifest["format_version"] >= 5:  # one checksum column per row dataset (row_datasets)
        expected["checksums"] = ((n, sum(len(store.row_datasets()) for store in stores)), np.dtype(np.uint64))
    for name, (shape, dtype) in expected.items():
        if name not in f or f[name].shape != shape or (dtype is not None and f[name].dtype != dtype):
            got = f"{f[name].dtype} {f[name].shape}" if name in f else "missing"
            return f"dataset {name} is {got}, expected {dtype or ''} {shape}"
    return None


def sequence_bytes(meta: dict) -> tuple[int, int]:
    """(estimate, upper bound) of the bytes one sequence takes in a shard with this metadata (a manifest, or the
    teacher pass's `meta`): its length, index and teacher score, then each stored field's (exact for the fixed-size
    ones; ragged sampled targets and stored text vary, so the estimate assumes n/4 distinct ids per position and 4
    bytes per token of text, the bound n ids and 16 bytes)."""
    stores = field_stores(meta["codecs"], Dims.of(meta)).values()
    sizes = [store.sequence_bytes() for store in stores]
    own = 4 + 8 + 8 * len(TEACHER_SCORE_COLUMNS)  # its length, index and teacher score
    return own + sum(est for est, _ in sizes), own + sum(high for _, high in sizes)


def shard_sequences(meta: dict, shard_bytes: int) -> int:
    """Sequences per shard so that a shard holds at most `shard_bytes` plus one sequence: the bound of
    sequence_bytes plus 1 KiB per row dataset (HDF5's chunk index, measured ~0.7 KiB per chunk) per sequence.
    A function of the config alone, so every process and every resume cuts the same shards."""
    rows = row_datasets(meta["codecs"], Dims.of(meta))
    return max(1, shard_bytes // (sequence_bytes(meta)[1] + 1024 * len(rows)))
