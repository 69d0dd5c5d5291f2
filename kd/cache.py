"""The teacher cache: a directory of self-describing HDF5 shards plus `manifest.json`.

Layout of DIR (format version 5; versions 1 to 4 are still read):
    cache_config.json        resolved config of the run that writes DIR (written once the input is ingested; re-runs are
                             checked against it)
    ingest/, .lock           only while the cache is being built: the packed windows (kd/data/ingest.py), and the
                             writing run's flock (kd/io.py)
    manifest.json            written last, by rank 0, once every shard is complete: the cache is usable iff it exists;
                             its `codecs` record says how each field is stored (see kd/codecs.py)
    train-00000.h5 ...       shards; shard j holds sequences [j*S, (j+1)*S) of its split (S: the manifest's
                             sequences_per_shard, from cache.shard_bytes or given)
    train-00000.json ...     sidecar per shard: sha256, counts and config hash; written before the shard's rename
    eval-00000.h5 ...

Fields of each sequence, as the reader returns them (T = seq_len, k = top_k, L = stored layers, H = teacher hidden):
    input_ids       [T]          token ids (plain uint16 when the vocabulary fits, else int32); padding past `length`
    lengths         [N]          (per shard) int32 valid tokens per sequence (only a split's last window is short)
    sequence_index  [N]          (per shard) int64 index of each sequence within its split
    topk_ids        [T, k]       sorted by descending probability; plain, or `bitpack` ([N, bytes] uint8 on disk)
    topk_logprobs   [T, k]       log p(token | prefix) under the FULL teacher softmax at T=1, so the tail mass
                                 1 - sum(exp(topk_logprobs)) is exact up to rounding; plain fp16/fp32, or `q8`
                                 (uint8 plus `topk_logprobs_q8` [N, T, 2] fp32 anchor and step per position)
    hidden_states   [L, T, H]    only when layers are stored; layer j is hidden_states[j] of the HF
                                 `output_hidden_states` tuple (0 = embeddings); plain fp16/fp32, or `q8` per token
    sample_ids      [T, n]       only when sample_n > 0: distinct ids among n draws from the full teacher
    text            str          only when store_text: the window's text (documents' text, separators as the
                                 separator token's string), for re-tokenizing it with another tokenizer
    token_spans     [T, 2]       only when store_text: [start, end) character span of each teacher token in `text`
    sample_counts   [T, n]       distribution (T = 1), most frequent first, counts sum to n, 0 = padding. On disk
                                 plain [N, T, n] arrays, or `ragged`: one byte string per sequence in `sample_bytes`
                                 with [start, end) in `sample_offsets` [N + 1]
Position t's targets describe the token at t+1. Every fixed-size dataset is chunked one sequence per chunk, so
reading sequence i touches one chunk per dataset. `checksums` [N, D] uint64 holds kd.cache.checksum of each
sequence's row of each of the D datasets its attribute `rows` names, and its attribute `whole` the checksums of the
whole-shard datasets (lengths, sequence_index, sample_offsets); the reader checks both (ShardRows). Each shard's
attribute `kd_meta` (JSON) repeats the cache-wide metadata plus the shard's own split, index and counts.

Commands:
    python -m kd.cache info DIR      summary of a cache
    python -m kd.cache verify DIR    re-check checksums, shapes and log-prob sanity; exit 1 at the first bad shard
    python -m kd.cache export DIR OUT   the splits as a Hugging Face datasets folder of Parquet files (kd/export.py)
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from kd import codecs
from kd.errors import KDError, run_cli
from kd.io import disk_error, h5_image, h5_in_memory, sha256_file, write_bytes_durable, write_json_atomic  # noqa: F401

FORMAT = "kd-teacher-cache"
FORMAT_VERSION = 5  # 5: a checksum per sequence and dataset (`checksums`), checked on every read, instead of 4's
# HDF5 fletcher32 per chunk (4 is still read, its fletcher32 checked by HDF5); 4: manifest keeps config_hash
# 3: streaming ingest (per-document split rule and counts, no document list); shards as in 2
SPLITS = ("train", "eval")
MANIFEST = "manifest.json"
CONFIG_FILE = "cache_config.json"
META_ATTR = "kd_meta"
# Open shard files per reading process (each DataLoader worker): far below common `ulimit -n` values (1024, 256),
# and enough that a sequential or shard-buffered read reopens nothing.
MAX_OPEN_FILES = 32


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.h5"


def sidecar_path(shard: Path) -> Path:
    return shard.with_suffix(".json")


def checksum(a) -> int:
    """An error-detecting checksum of an array's (or bytes') raw bytes, written at cache time per sequence and
    dataset and checked on every read. Not cryptographic (`verify` checks each shard's sha256): it catches flipped
    bits, zeroed or stale pages and misplaced data. Up to 64 KiB: zlib's crc32 (about a microsecond per KiB). Above:
    the sums (modulo 2^64) of the little-endian uint64 words of each 8 KiB block, combined with odd weights
    1, 3, 5, ... (an odd weight is invertible modulo 2^64, so a change to any one word, a single flipped bit
    included, changes the result; so does moving a block), plus the crc32 of the bytes after the last whole block.
    The block sums run at memory speed, 7x crc32, which matters because a sequence's hidden states (~600 KB) are
    checked on every read (bench/bench_integrity.py)."""
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


def row_datasets(codecs: dict, num_layers: int, sample_n: int, store_text: bool) -> list[str]:
    """The datasets with one row per sequence (the ragged `sample_bytes`: one [start, end) slice per sequence), in
    the column order of a shard's `checksums` table."""
    names = []
    for name in ("input_ids", "topk_ids", "topk_logprobs", "hidden_states"):
        if name != "hidden_states" or num_layers:
            names += list(_datasets(name, codecs[name], (1, 1, 1)))
    if sample_n:
        names += ["sample_bytes"] if codecs["samples"]["name"] == "ragged" else ["sample_ids", "sample_counts"]
    return names + (["text", "token_spans"] if store_text else [])


# Datasets a shard holds whole (one value per sequence, or the ragged offsets): checksummed whole, checked on open.
SHARD_DATASETS = ("lengths", "sequence_index", "sample_offsets")


def _datasets(name: str, spec: dict, shape: tuple) -> dict[str, tuple[tuple, np.dtype]]:
    """HDF5 datasets (name -> per-sequence shape, dtype) that hold field `name` of per-sequence `shape` under `spec`."""
    if spec["name"] == "plain":
        return {name: (shape, np.dtype(spec["dtype"]))}
    if spec["name"] == "bitpack":
        return {name: ((codecs.packed_nbytes(int(np.prod(shape)), spec["bits"]),), np.dtype(np.uint8))}
    if spec["name"] == "q8":
        return {name: (shape, np.dtype(np.uint8)), name + "_q8": (shape[:-1] + (2,), np.dtype(np.float32))}
    raise KDError(f"unknown codec {spec['name']!r} for {name}: this kd cannot read the cache, upgrade kd")


def _encode(name: str, spec: dict, batch: np.ndarray) -> dict[str, np.ndarray]:
    """A batch [n, ...] of field `name` in the decoded layout -> the stored datasets' values."""
    if spec["name"] == "plain":
        return {name: batch}
    if spec["name"] == "bitpack":
        return {name: np.stack([codecs.pack_bits(b, spec["bits"]) for b in np.asarray(batch)])}
    q, params = codecs.q8_encode(batch, spec.get("rounding", "nearest"))
    return {name: q, name + "_q8": params}


def _decode(row, name: str, spec: dict, shape: tuple) -> np.ndarray:
    """One sequence of field `name`, decoded (ids as int64, values as stored (plain) or fp32 (q8)); `row(ds)` returns
    that sequence's row of dataset ds as stored (ShardRows.get)."""
    if spec["name"] == "plain":
        a = row(name)
        return a.astype(np.int64) if a.dtype.kind in "ui" else a
    if spec["name"] == "bitpack":
        return codecs.unpack_bits(row(name), spec["bits"], int(np.prod(shape))).reshape(shape)
    if spec["name"] == "q8":
        return codecs.q8_decode(row(name), row(name + "_q8"))
    raise KDError(f"unknown codec {spec['name']!r} for {name}: this kd cannot read the cache, upgrade kd")


def _decode_samples(row, spec: dict, seq_len: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    if spec["name"] == "ragged":
        return codecs.ragged_decode(row("sample_bytes"), seq_len, n, spec["id_bits"], spec["count_bits"])
    return row("sample_ids").astype(np.int64), row("sample_counts").astype(np.int64)


class ShardRows:
    """An open shard's rows, each checked against the shard's per-sequence checksums when it is read (format 5 on;
    `check=False` trusts the data). Opening reads the small whole-shard datasets (lengths, ragged offsets) once and
    checks them too; a mismatch raises ValueError naming the dataset."""

    def __init__(self, f, check: bool = True):
        self.f, self.datasets = f, {}  # h5py's name lookup costs ~50 us: each dataset is looked up once
        self.lengths = f["lengths"][:]
        self.offsets = f["sample_offsets"][:] if "sample_offsets" in f else None
        self.sums, self.col = None, {}
        if check and "checksums" in f:
            table = f["checksums"]
            self.sums = table[:]
            self.col = {ds: j for j, ds in enumerate(json.loads(table.attrs["rows"]))}
            for ds, value in json.loads(table.attrs["whole"]).items():
                if checksum(f[ds][:]) != value:
                    raise ValueError(f"dataset {ds} fails its checksum")

    def get(self, ds: str, r: int):
        d = self.datasets.get(ds)
        if d is None:
            d = self.datasets[ds] = self.f[ds]
        if ds == "sample_bytes":
            a, b = self.offsets[r : r + 2]
            if not 0 <= a <= b <= d.shape[0]:
                raise ValueError(f"sampled-target offsets [{a}, {b}) are outside the stored bytes")
            value = d[a:b]
        else:
            value = d[r]
        if self.sums is not None and checksum(value) != int(self.sums[r, self.col[ds]]):
            raise ValueError(f"dataset {ds} fails its checksum")
        return value

    def row(self, r: int):
        return lambda ds: self.get(ds, r)

    def close(self) -> None:
        self.f.close()


def field_shapes(manifest: dict) -> dict[str, tuple]:
    """Per-sequence decoded shape of each stored field."""
    T, k = manifest["seq_len"], manifest["top_k"]
    return {
        "input_ids": (T,),
        "topk_ids": (T, k),
        "topk_logprobs": (T, k),
        "hidden_states": (len(manifest["hidden_layers"]), T, manifest["teacher"]["hidden_size"]),
    }


def dataset_mismatch(f, manifest: dict, n: int) -> str | None:
    """The first dataset of an open shard of n sequences whose presence, shape or dtype differs from what the
    manifest implies (None if all match). Shared by `verify` and the reader's check on open."""
    T, L, n_samples = manifest["seq_len"], len(manifest["hidden_layers"]), manifest.get("sample_n", 0)
    specs, shapes = manifest_codecs(manifest), field_shapes(manifest)
    expected = {"lengths": ((n,), None), "sequence_index": ((n,), None)}
    for name, shape in shapes.items():
        if name != "hidden_states" or L:
            expected.update({ds: ((n,) + sh, dt) for ds, (sh, dt) in _datasets(name, specs[name], shape).items()})
    if n_samples and specs["samples"]["name"] == "ragged":
        expected["sample_offsets"] = ((n + 1,), None)
    elif n_samples:
        expected["sample_ids"] = expected["sample_counts"] = ((n, T, n_samples), None)
    if manifest["format_version"] >= 5:
        cols = row_datasets(specs, L, n_samples, bool(manifest.get("store_text")))
        expected["checksums"] = ((n, len(cols)), np.dtype(np.uint64))
    for name, (shape, dtype) in expected.items():
        if name not in f or f[name].shape != shape or (dtype is not None and f[name].dtype != dtype):
            got = f"{f[name].dtype} {f[name].shape}" if name in f else "missing"
            return f"dataset {name} is {got}, expected {dtype or ''} {shape}"
    return None


def manifest_codecs(manifest: dict) -> dict:
    return manifest["codecs"] if manifest["format_version"] >= 2 else codecs.v1_codec_specs(manifest)


class ShardWriter:
    """Builds one shard in memory; `commit()` writes it under a temporary name, fsyncs, writes the sidecar and
    renames. Built in memory (kd.io.h5_in_memory) so that a full disk or a file-size limit fails one plain write,
    which removes the partial file and raises one KDError, instead of HDF5's late errors and segfaults.

    Until `commit()` returns, no file with the shard's final name exists, so a killed run can never leave a
    shard that looks complete. The sidecar is written before the rename: a final-named shard always has one.
    `codecs` is the manifest's record (see kd/codecs.py); arrays passed to `append` are always the decoded layout.
    """

    def __init__(
        self,
        path: Path,
        meta: dict,
        num_sequences: int,
        seq_len: int,
        top_k: int,
        num_layers: int,
        hidden_size: int,
        codecs: dict,
        sample_n: int = 0,
        store_text: bool = False,
    ):
        import h5py

        self.path, self.meta, self.codecs = path, meta, codecs
        self.tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        self.num_sequences, self.num_tokens, self.cursor, self.sample_bytes = num_sequences, 0, 0, 0
        try:
            self.f = h5_in_memory(str(self.tmp))
            N, T, k = num_sequences, seq_len, top_k
            # Integrity: every row's checksum goes into `checksums` [N, len(rows)] at commit, and the reader checks
            # each row it reads against it (a flipped byte fails that sequence's read instead of reaching the
            # student). HDF5's fletcher32 (format 4) did the same per chunk at 3x the read cost.
            self.rows = row_datasets(codecs, num_layers, sample_n, store_text)
            self.sums = np.zeros((N, len(self.rows)), np.uint64)
            self.f.create_dataset("lengths", (N,), np.int32, chunks=(N,))
            self.f.create_dataset("sequence_index", (N,), np.int64, chunks=(N,))
            for name, shape in (
                ("input_ids", (T,)),
                ("topk_ids", (T, k)),
                ("topk_logprobs", (T, k)),
                ("hidden_states", (num_layers, T, hidden_size)),
            ):
                if name != "hidden_states" or num_layers:
                    for ds, (ds_shape, dtype) in _datasets(name, codecs[name], shape).items():
                        self.f.create_dataset(ds, (N,) + ds_shape, dtype, chunks=(1,) + ds_shape)
            if store_text:
                self.f.create_dataset("text", (N,), h5py.string_dtype("utf-8"))
                self.f.create_dataset("token_spans", (N, T, 2), np.int32, chunks=(1, T, 2))
            if sample_n and codecs["samples"]["name"] == "ragged":
                # variable length per sequence: one growing byte array plus each sequence's [start, end) offsets.
                # Small chunks: HDF5 allocates the last chunk whole, and a sequence (~15 KB at T = 256) spans a few.
                self.f.create_dataset("sample_bytes", (0,), np.uint8, maxshape=(None,), chunks=(1 << 13,))
                self.f.create_dataset("sample_offsets", (N + 1,), np.int64, chunks=(N + 1,))
            elif sample_n:
                dtype = np.dtype(codecs["samples"]["dtype"])
                self.f.create_dataset("sample_ids", (N, T, sample_n), dtype, chunks=(1, T, sample_n))
                self.f.create_dataset("sample_counts", (N, T, sample_n), np.uint8, chunks=(1, T, sample_n))
        except OSError as e:
            self.abort()
            raise KDError(f"cannot create shard {self.tmp}: {e}") from None

    def append(
        self, input_ids, lengths, sequence_index, topk_ids, topk_logprobs, hidden, samples=None, text=None
    ) -> None:
        """Add a batch of n sequences (numpy arrays in the decoded layout, any dtype castable to the stored one);
        samples: None or (sample_ids, sample_counts), padded [n, T, sample_n]; text: None or (texts, spans [n, T, 2])."""
        n = len(lengths)
        sl = slice(self.cursor, self.cursor + n)
        try:
            encoded = {}
            for name, arr in (
                ("input_ids", input_ids),
                ("topk_ids", topk_ids),
                ("topk_logprobs", topk_logprobs),
                ("hidden_states", hidden),
            ):
                if arr is not None:
                    encoded.update(_encode(name, self.codecs[name], arr))
            blobs = None
            if samples is not None and self.codecs["samples"]["name"] == "ragged":
                spec = self.codecs["samples"]
                blobs = [codecs.ragged_encode(i, c, spec["id_bits"], spec["count_bits"]) for i, c in zip(*samples)]
            elif samples is not None:
                encoded["sample_ids"] = np.asarray(samples[0], self.codecs["samples"]["dtype"])
                encoded["sample_counts"] = np.asarray(samples[1], np.uint8)
            if text is not None:
                encoded["token_spans"] = np.asarray(text[1], np.int32)
            # the checksums of the bytes as stored: the arrays in the datasets' own dtypes
            rows = {ds: np.asarray(arr, self.f[ds].dtype) for ds, arr in encoded.items()}
            if blobs is not None:
                rows["sample_bytes"] = blobs
            if text is not None:
                rows["text"] = [t.encode("utf-8") for t in text[0]]
            for col, ds in enumerate(self.rows):
                self.sums[sl, col] = [checksum(row) for row in rows[ds]]
        except ValueError as e:
            self.abort()
            raise KDError(
                f"cannot encode the teacher's outputs for shard {self.path.name}: {e}. The teacher produced "
                "non-finite values; check its dtype, or store them plain (cache.logprob_codec=fp32)"
            ) from None
        try:
            self.f["lengths"][sl] = lengths
            self.f["sequence_index"][sl] = sequence_index
            for ds, arr in rows.items():
                if ds not in ("sample_bytes", "text"):
                    self.f[ds][sl] = arr
            if blobs is not None:
                ends = self.sample_bytes + np.cumsum([b.size for b in blobs])
                self.f["sample_bytes"].resize((int(ends[-1]),))
                self.f["sample_bytes"][self.sample_bytes : int(ends[-1])] = np.concatenate(blobs)
                self.f["sample_offsets"][self.cursor + 1 : self.cursor + n + 1] = ends
                self.sample_bytes = int(ends[-1])
            if text is not None:
                self.f["text"][sl] = list(text[0])
        except (OSError, RuntimeError) as e:  # in memory: out of memory, or a bug
            self.abort()
            raise KDError(f"building shard {self.path.name} failed ({e})") from None
        self.cursor += n
        self.num_tokens += int(np.sum(lengths))

    def commit(self, extra: dict | None = None) -> dict:
        """Finish the shard; `extra` goes into its sidecar (and so the manifest's shard record)."""
        if self.cursor != self.num_sequences:
            self.abort()
            raise RuntimeError(f"shard {self.path.name}: {self.cursor} of {self.num_sequences} sequences written")
        meta = dict(self.meta, num_tokens=self.num_tokens)
        try:
            ds = self.f.create_dataset("checksums", data=self.sums)
            ds.attrs["rows"] = json.dumps(self.rows)
            ds.attrs["whole"] = json.dumps({n: checksum(self.f[n][:]) for n in SHARD_DATASETS if n in self.f})
            self.f.attrs[META_ATTR] = json.dumps(meta, sort_keys=True)
            image = h5_image(self.f)
            write_bytes_durable(self.tmp, image)
            info = {
                "file": self.path.name,
                "sha256": hashlib.sha256(image).hexdigest(),
                "bytes": len(image),
                "first_sequence": meta["first_sequence"],
                "num_sequences": self.num_sequences,
                "num_tokens": self.num_tokens,
                "config_hash": meta["config_hash"],
                **(extra or {}),
            }
            write_json_atomic(sidecar_path(self.path), info)
            os.replace(self.tmp, self.path)
        except KDError as e:
            self.abort()
            raise KDError(f"{e} (complete shards are kept)") from None
        except OSError as e:
            self.abort()
            raise KDError(f"finishing shard {self.path} failed: {disk_error(e)} (complete shards are kept)") from None
        return info

    def abort(self) -> None:
        """Drop the shard: nothing of it stays on disk (a sidecar is only ever written for a whole file)."""
        try:
            if getattr(self, "f", None) is not None and self.f.id.valid:
                self.f.close()
        except (OSError, RuntimeError):
            pass  # an in-memory file: nothing to flush
        self.tmp.unlink(missing_ok=True)


def sequence_bytes(meta: dict) -> tuple[int, int]:
    """(estimate, upper bound) of the bytes one sequence takes in a shard with this metadata (a manifest, or the
    teacher pass's `meta`): exact for the fixed-size datasets; ragged sampled targets and stored text vary, so the
    estimate assumes n/4 distinct ids per position and 4 bytes per token of text, the bound n ids and 16 bytes."""
    specs, T = meta["codecs"], meta["seq_len"]
    fixed = 4 + 8 + 8 * len(row_datasets(specs, len(meta["hidden_layers"]), meta.get("sample_n", 0), False))
    for name, shape in field_shapes(meta).items():
        if name != "hidden_states" or meta["hidden_layers"]:
            fixed += sum(int(np.prod(sh)) * dt.itemsize for sh, dt in _datasets(name, specs[name], shape).values())
    est = high = fixed
    n = meta.get("sample_n", 0)
    if n and specs["samples"]["name"] == "ragged":
        per_id = (specs["samples"]["id_bits"] + specs["samples"]["count_bits"]) / 8
        est += int(T * (2 + per_id * max(1, n // 4))) + 8
        high += int(T * (2 + per_id * n)) + 8
    elif n:
        est = high = fixed + T * n * (np.dtype(specs["samples"]["dtype"]).itemsize + 1)
    if meta.get("store_text"):
        est, high = est + T * (4 + 8), high + T * (16 + 8)
    return est, high


def shard_sequences(meta: dict, shard_bytes: int) -> int:
    """Sequences per shard so that a shard holds at most `shard_bytes` plus one sequence: the bound of
    sequence_bytes plus 1 KiB per row dataset (HDF5's chunk index, measured ~0.7 KiB per chunk) per sequence.
    A function of the config alone, so every process and every resume cuts the same shards."""
    rows = row_datasets(meta["codecs"], len(meta["hidden_layers"]), meta.get("sample_n", 0), meta.get("store_text"))
    return max(1, shard_bytes // (sequence_bytes(meta)[1] + 1024 * len(rows)))


def complete_shard_info(path: Path, config_hash: str) -> dict | None:
    """The sidecar of a shard that is complete and belongs to this config, else None (the shard is redone)."""
    side = sidecar_path(path)
    if not (path.exists() and side.exists()):
        return None
    try:
        info = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("config_hash") != config_hash or info.get("bytes") != path.stat().st_size:
        return None
    if sha256_file(path) != info.get("sha256"):
        return None
    return info


# ----------------------------------------------------------------------------------------------------------
# Reading


def read_manifest(path: str | Path) -> dict:
    root = Path(path)
    mf = root / MANIFEST
    if not mf.exists():
        hint = (
            " (a cache run started there but has not finished: re-run cache_teacher.py with the same config)"
            if (root / CONFIG_FILE).exists()
            else ""
        )
        raise KDError(f"no teacher cache at {root}: {MANIFEST} is missing{hint}")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise KDError(f"{mf} is not valid JSON ({e}); the cache is damaged, re-run cache_teacher.py") from None
    if manifest.get("format") != FORMAT:
        raise KDError(f"{mf} is not a {FORMAT} manifest")
    if not isinstance(manifest.get("format_version"), int) or manifest["format_version"] > FORMAT_VERSION:
        raise KDError(
            f"{root} has cache format version {manifest.get('format_version')}; this kd reads up to "
            f"{FORMAT_VERSION}: upgrade kd"
        )
    return manifest


class CacheSplit:
    """Random access to the sequences of one split, as a map-style torch Dataset.

    h5py handles cannot cross a fork, so files are opened lazily and the handle table is keyed by process id:
    each DataLoader worker opens its own. Files are opened read-only, so many runs can share one cache.
    `fields` limits what is read (skip hidden states when no feature loss needs them). `check=False` skips the
    per-sequence checksums (format 5 on) for a cache already checked with `python -m kd.cache verify`; the
    agreement of each shard with the manifest is checked on open either way.
    """

    TENSOR_FIELDS = ("input_ids", "topk_ids", "topk_logprobs", "hidden_states", "sample_ids", "sample_counts")
    ALL_FIELDS = TENSOR_FIELDS + ("text", "token_spans")  # text is a str: ask for it explicitly (kd/align.py does)

    def __init__(
        self, root: Path, manifest: dict, split: str, fields: Iterable[str] = TENSOR_FIELDS, check: bool = True
    ):
        if split not in manifest["splits"]:
            raise KDError(f"cache {root} has no '{split}' split (it has {sorted(manifest['splits'])})")
        self.root, self.split, self.check = root, split, check
        unknown = set(fields) - set(self.ALL_FIELDS)
        if unknown:
            raise ValueError(f"unknown cache fields {sorted(unknown)}")
        stored = {
            "hidden_states": bool(manifest["hidden_layers"]),
            "sample_ids": bool(manifest.get("sample_n")),
            "sample_counts": bool(manifest.get("sample_n")),
            "text": bool(manifest.get("store_text")),
            "token_spans": bool(manifest.get("store_text")),
        }
        self.fields = tuple(f for f in fields if stored.get(f, True))
        shards = sorted(manifest["splits"][split]["shards"], key=lambda s: s["first_sequence"])
        # per shard only its file name, first sequence and count: a reader's memory (copied into every DataLoader
        # worker) stays small at 100,000 shards, where the manifest's full records take ~100 MB as Python objects
        self.files = [sh["file"] for sh in shards]
        self.starts = np.array([sh["first_sequence"] for sh in shards], dtype=np.int64)
        self.counts = np.array([sh["num_sequences"] for sh in shards], dtype=np.int64)
        self.length = int(manifest["splits"][split]["num_sequences"])
        self.codecs, self.shapes = manifest_codecs(manifest), field_shapes(manifest)
        self.seq_len, self.sample_n = manifest["seq_len"], manifest.get("sample_n", 0)
        self.manifest = {k: v for k, v in manifest.items() if k != "splits"}  # the cache-wide description
        expected = 0
        for sh in shards:  # the shard records must tile the split: a removed or edited record is caught here
            if sh["first_sequence"] != expected:
                raise KDError(
                    f"cache {root}: the manifest's {split} shards do not cover sequences {expected}.."
                    f"{sh['first_sequence'] - 1} (a shard record is missing or edited); the cache is damaged: "
                    "run python -m kd.cache verify, or re-cache"
                )
            expected += sh["num_sequences"]
        if expected != self.length:
            raise KDError(
                f"cache {root}: the manifest's {split} split says {self.length} sequences but its shards hold "
                f"{expected}; the cache is damaged: run python -m kd.cache verify, or re-cache"
            )
        self._files: dict[int, OrderedDict] = {}  # per process id: shard index -> open ShardRows, LRU order
        self.max_open_files = MAX_OPEN_FILES

    def __len__(self) -> int:
        return self.length

    def _file(self, j: int) -> ShardRows:
        """Shard j, open. At most MAX_OPEN_FILES per process: the least recently used is closed when
        another is needed, so a shuffled read over 100,000 shards never runs out of file descriptors."""
        import h5py

        files = self._files.setdefault(os.getpid(), OrderedDict())
        if j in files:
            files.move_to_end(j)
            return files[j]
        while len(files) >= self.max_open_files:
            files.popitem(last=False)[1].close()
        path = self.root / self.files[j]
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise KDError(
                f"cannot open shard {path} of cache {self.root} ({e}): it is missing or damaged; run "
                f"python -m kd.cache verify {self.root}, or re-cache"
            ) from None
        problem = self._disagreement(f, j)
        if problem is None:
            try:
                rows = ShardRows(f, self.check)
            except (OSError, ValueError) as e:
                f.close()
                raise KDError(
                    f"shard {path.name} of cache {self.root} cannot be read ({str(e).splitlines()[0]}); the cache "
                    f"is damaged: run python -m kd.cache verify {self.root}, or re-cache"
                ) from None
        if problem:
            f.close()
            raise KDError(
                f"shard {path.name} of cache {self.root} does not match the manifest: {problem}. The cache "
                f"was changed or damaged since this reader opened it; run python -m kd.cache verify "
                f"{self.root}, or re-cache"
            )
        files[j] = rows
        return rows

    def _disagreement(self, f, j: int) -> str | None:
        """What differs between an open shard, its manifest record and the manifest (None if all agree): the
        cache's identity (config hash, format 4 on), the content description, the number of sequences and every
        dataset's per-sequence shape. Cheap (attributes and shapes only), so it is done on every open."""
        try:
            meta = json.loads(f.attrs[META_ATTR])
        except (KeyError, ValueError, OSError):
            return "it carries no readable kd_meta"
        m, first, count = self.manifest, int(self.starts[j]), int(self.counts[j])
        if "config_hash" in m and meta.get("config_hash") != m["config_hash"]:
            return (
                f"it belongs to another cache (config hash {str(meta.get('config_hash'))[:12]}..., the manifest's "
                f"{m['config_hash'][:12]}...): the cache was overwritten under this reader"
            )
        for key in ("top_k", "seq_len", "hidden_layers", "sample_n", "codecs"):
            if meta.get(key) != m.get(key):
                return f"{key} is {meta.get(key)!r} in the shard and {m.get(key)!r} in the manifest"
        for key in ("vocab_size", "hidden_size"):
            if meta["teacher"].get(key) != m["teacher"].get(key):
                return f"teacher.{key} is {meta['teacher'].get(key)} in the shard and {m['teacher'].get(key)} in the manifest"
        if meta.get("first_sequence") != first or f["lengths"].shape[0] != count:
            return (
                f"it holds {f['lengths'].shape[0]} sequences from {meta.get('first_sequence')}, the manifest says "
                f"{count} from {first}"
            )
        return dataset_mismatch(f, m, count)

    def __getitem__(self, i: int) -> dict:

        if not 0 <= i < self.length:
            raise IndexError(i)
        j = int(np.searchsorted(self.starts, i, side="right") - 1)
        shard, r = self._file(j), i - int(self.starts[j])
        try:
            return self._read(shard, r, i)
        except (OSError, ValueError) as e:  # a chunk failing its checksum, a truncated file, a damaged encoding
            raise KDError(
                f"shard {self.files[j]} of cache {self.root}, sequence {i} of split {self.split}: "
                f"cannot be read ({str(e).splitlines()[0]}); the cache is damaged: run python -m kd.cache "
                f"verify {self.root}, or re-cache"
            ) from None

    def _read(self, shard: ShardRows, r: int, i: int) -> dict:
        import torch

        row = shard.row(r)
        item = {"length": torch.tensor(int(shard.lengths[r])), "sequence_index": torch.tensor(i)}
        # ids widen to int64 (uint16 has no torch counterpart for indexing); plain values keep their stored dtype
        # (fp16 halves host->device traffic; losses upcast to fp32), q8 values decode to fp32.
        for name in self.fields:
            if name in ("sample_ids", "sample_counts"):
                continue  # decoded together, below
            if name == "text":  # a str, for alignment to another tokenizer (kd/align.py); never sent to a device
                item["text"] = row("text").decode("utf-8")
                continue
            if name == "token_spans":
                item["token_spans"] = torch.from_numpy(row("token_spans").astype(np.int64))
                continue
            item[name] = torch.from_numpy(_decode(row, name, self.codecs[name], self.shapes[name]))
        wanted = [n for n in ("sample_ids", "sample_counts") if n in self.fields]
        if wanted:
            decoded = _decode_samples(row, self.codecs["samples"], self.seq_len, self.sample_n)
            item.update(
                {n: torch.from_numpy(a) for n, a in zip(("sample_ids", "sample_counts"), decoded) if n in wanted}
            )
        return item

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


class TeacherCache:
    """A finished cache directory: `manifest` plus `split(name)` readers."""

    def __init__(self, path: str | Path, check: bool = True):
        self.root, self.check = Path(path), check
        self.manifest = read_manifest(self.root)

    def split(self, name: str, fields: Iterable[str] = CacheSplit.TENSOR_FIELDS) -> CacheSplit:
        return CacheSplit(self.root, self.manifest, name, fields, self.check)

    @property
    def top_k(self) -> int:
        return self.manifest["top_k"]

    @property
    def hidden_layers(self) -> list[int]:
        return self.manifest["hidden_layers"]

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]


# ----------------------------------------------------------------------------------------------------------
# Verify


def _check_block(lp: np.ndarray, ids: np.ndarray, vocab: int) -> str | None:
    """Sanity of one sequence's stored log-probs/ids [T, k]; returns a description of the first problem."""
    lp32 = lp.astype(np.float32)
    if not np.isfinite(lp32).all():
        return "log-probs are not finite"
    if (lp32 > 0).any():
        return "log-probs are positive"
    if (np.diff(lp32, axis=-1) > 0).any():
        return "log-probs are not sorted in descending order"
    mass = np.exp(lp32).sum(-1)
    if (mass > 1 + 1e-3).any():
        return f"probabilities sum to {mass.max():.6f} > 1 + 1e-3"
    if (ids.astype(np.int64) >= vocab).any() or (ids.astype(np.int64) < 0).any():
        return f"token ids outside [0, {vocab})"
    if ids.shape[-1] > 1 and (np.diff(np.sort(ids, axis=-1), axis=-1) == 0).any():
        return "a position repeats a token id in its top-k"
    return None


def _check_sequence(row, specs: dict, shapes: dict, vocab: int, n_samples: int, T: int) -> str | None:
    """Decode one sequence of an open shard (`row`: ShardRows.row) and check it; returns the first problem."""
    problem = _check_block(
        _decode(row, "topk_logprobs", specs["topk_logprobs"], shapes["topk_logprobs"]),
        _decode(row, "topk_ids", specs["topk_ids"], shapes["topk_ids"]),
        vocab,
    )
    if (
        problem is None
        and shapes["hidden_states"][0]
        and not np.isfinite(
            _decode(row, "hidden_states", specs["hidden_states"], shapes["hidden_states"]).astype(np.float32)
        ).all()
    ):
        problem = "hidden states are not finite"
    if problem is None and n_samples:
        ids, counts = _decode_samples(row, specs["samples"], T, n_samples)
        if (counts.sum(-1) != n_samples).any() or (ids >= vocab).any():
            problem = f"sampled counts do not sum to {n_samples} or sampled ids are out of range"
    return problem


def verify(path: str | Path, log=print) -> list[str]:
    """Re-check a cache; returns the problems found (empty when the cache is sound). Stops at the first bad shard."""
    import h5py

    root = Path(path)
    manifest = read_manifest(root)
    T, vocab = manifest["seq_len"], manifest["teacher"]["vocab_size"]
    n_samples = manifest.get("sample_n", 0)
    specs, shapes = manifest_codecs(manifest), field_shapes(manifest)
    for split, info in manifest["splits"].items():
        expected_next = 0
        for shard in sorted(info["shards"], key=lambda s: s["first_sequence"]):
            p = root / shard["file"]
            where = f"shard {shard['file']}"
            if not p.exists():
                return [f"{where}: file is missing"]
            if sha256_file(p) != shard["sha256"]:
                return [f"{where}: sha256 does not match the manifest (the file changed or is damaged)"]
            try:
                f = h5py.File(p, "r")
            except OSError as e:
                return [f"{where}: not a readable HDF5 file ({e})"]
            with f:
                n = shard["num_sequences"]
                problem = dataset_mismatch(f, manifest, n)
                if problem:
                    return [f"{where}: {problem}"]
                meta = json.loads(f.attrs[META_ATTR])
                if meta.get("format_version") != manifest["format_version"] or meta.get("split") != split:
                    return [f"{where}: its metadata does not match the manifest"]
                seq_index = f["sequence_index"][:]
                if shard["first_sequence"] != expected_next or not np.array_equal(
                    seq_index, np.arange(expected_next, expected_next + n)
                ):
                    return [f"{where}: sequence indices are not contiguous from {expected_next}"]
                lengths = f["lengths"][:]
                if int(lengths.sum()) != shard["num_tokens"] or (lengths < 2).any() or (lengths > T).any():
                    return [f"{where}: lengths are inconsistent with the manifest"]
                if n_samples and specs["samples"]["name"] == "ragged":
                    offsets = f["sample_offsets"][:]
                    if offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != f["sample_bytes"].shape[0]:
                        return [f"{where}: sampled-target offsets are inconsistent with the stored bytes"]
                try:
                    rows = ShardRows(f)
                except ValueError as e:
                    return [f"{where}: {e}"]
                for i in range(n):
                    try:
                        problem = _check_sequence(rows.row(i), specs, shapes, vocab, n_samples, T)
                        for ds in ("text", "token_spans"):  # not decoded above, but checksummed like the rest
                            if ds in rows.col:
                                rows.get(ds, i)
                    except (ValueError, IndexError) as e:  # a truncated or garbled packed field
                        problem = f"cannot decode: {e}"
                    if problem:
                        return [f"{where}, sequence {int(seq_index[i])} of split {split}: {problem}"]
            expected_next += n
            log(f"ok {shard['file']}: {n} sequences, {shard['num_tokens']} tokens")
        if expected_next != info["num_sequences"]:
            return [f"split {split}: shards hold {expected_next} sequences, manifest says {info['num_sequences']}"]
    return []


def summary(path: str | Path) -> str:
    m = read_manifest(path)
    lines = [
        f"{FORMAT} v{m['format_version']} at {path}",
        f"teacher   {m['teacher']['name_or_path']} ({m['teacher']['model_type']}, vocab {m['teacher']['vocab_size']}, "
        f"hidden {m['teacher']['hidden_size']}, dtype {m['teacher']['dtype']})",
        f"tokenizer fingerprint {m['tokenizer']['fingerprint'][:16]}...",
        f"stored    top-{m['top_k']} ids+log-probs, hidden layers {m['hidden_layers']}, seq_len {m['seq_len']}, "
        f"sampled targets n={m.get('sample_n', 0)}",
        "codecs    " + ", ".join(f"{k}: {codecs.describe(v)}" for k, v in manifest_codecs(m).items()),
    ]
    for split, info in m["splits"].items():
        lines.append(
            f"{split:<9} {info['num_sequences']} sequences, {info['num_tokens']} tokens, "
            f"{len(info['shards'])} shards, {info.get('num_documents', len(info.get('documents', [])))} documents"
        )
        score = info.get("teacher_score")
        if score:  # kd/textscore.py: comparable with any student's eval, whatever its tokenizer
            lines.append(
                f"          teacher's own score: CE {score['ce_per_token']:.4f} nats/token, "
                f"{score['bits_per_char']:.4f} bits/char, {score['bits_per_byte']:.4f} bits/byte "
                f"({score['tokens']} targets, {score['chars']} characters)"
            )
    lines.append(f"size      {m['bytes']} bytes, {m['bytes_per_token']:.0f} bytes/token")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kd.cache", description="Inspect, verify or export a teacher cache."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    for cmd in ("info", "verify"):
        sub.add_parser(cmd).add_argument("dir")
    ex = sub.add_parser("export", help="write splits as a Hugging Face datasets folder of Parquet files (kd/export.py)")
    ex.add_argument("dir")
    ex.add_argument("out")
    ex.add_argument("--splits", nargs="+", default=None)
    ex.add_argument("--rows-per-file", type=int, default=4096)
    args = parser.parse_args(argv)
    if args.cmd == "info":
        print(summary(args.dir))
        return
    if args.cmd == "export":
        from kd.export import export

        export(args.dir, args.out, args.splits, args.rows_per_file)
        return
    problems = verify(args.dir)
    if problems:
        print(f"verify FAILED: {problems[0]}", file=sys.stderr)
        sys.exit(1)
    print(f"verify ok: {args.dir}")


if __name__ == "__main__":
    run_cli(main)
