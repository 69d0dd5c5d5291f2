"""The teacher cache: a directory of self-describing HDF5 shards plus `manifest.json`.

Layout of DIR (format version 1):
    cache_config.json        resolved config of the run that writes DIR (written first; re-runs are checked against it)
    manifest.json            written last, by rank 0, once every shard is complete: the cache is usable iff it exists
    train-00000.h5 ...       shards; shard j holds sequences [j*S, (j+1)*S) of its split (S = sequences_per_shard)
    train-00000.json ...     sidecar per shard: sha256, counts and config hash; written before the shard's rename
    eval-00000.h5 ...

Datasets in each shard (N sequences, T = seq_len, k = top_k, L = stored layers, H = teacher hidden size):
    input_ids       [N, T]       uint16 when the teacher vocabulary fits, else int32; padding past `lengths`
    lengths         [N]          int32, valid tokens per sequence (only the last window of a split is short)
    sequence_index  [N]          int64, index of each sequence within its split
    topk_ids        [N, T, k]    same integer type as input_ids; sorted by descending probability
    topk_logprobs   [N, T, k]    fp16 (or fp32): log p(token | prefix) under the FULL teacher softmax at T=1,
                                 so the tail mass 1 - sum(exp(topk_logprobs)) is exact up to rounding
    hidden_states   [N, L, T, H] fp16 (or fp32), only when layers are stored; layer j is hidden_states[j] of
                                 the HF `output_hidden_states` tuple (0 = embeddings, num_hidden_layers = last)
    sample_ids      [N, T, n]    only when sample_n > 0: distinct ids among n draws from the full teacher
    sample_counts   [N, T, n]    distribution (T = 1), most frequent first; uint8 counts summing to n, 0 = padding
Position t's targets describe the token at t+1. Every dataset is chunked one sequence per chunk, so reading
sequence i touches one chunk per dataset. Each shard's attribute `kd_meta` (JSON) repeats the cache-wide
metadata plus the shard's own split, index and counts.

Commands:
    python -m kd.cache info DIR      summary of a cache
    python -m kd.cache verify DIR    re-check checksums, shapes and log-prob sanity; exit 1 at the first bad shard
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from kd.errors import KDError, run_cli

FORMAT = "kd-teacher-cache"
FORMAT_VERSION = 1
SPLITS = ("train", "eval")
MANIFEST = "manifest.json"
CONFIG_FILE = "cache_config.json"
META_ATTR = "kd_meta"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.h5"


def sidecar_path(shard: Path) -> Path:
    return shard.with_suffix(".json")


def id_dtype(vocab_size: int) -> np.dtype:
    """Smallest integer type that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Writes one shard under a temporary name; `commit()` flushes, checksums, writes the sidecar and renames.

    Until `commit()` returns, no file with the shard's final name exists, so a killed run can never leave a
    shard that looks complete. The sidecar is written before the rename: a final-named shard always has one.
    """

    def __init__(self, path: Path, meta: dict, num_sequences: int, seq_len: int, top_k: int, num_layers: int,
                 hidden_size: int, ids_dtype: np.dtype, value_dtype: np.dtype, sample_n: int = 0):
        import h5py

        self.path, self.meta = path, meta
        self.tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        self.num_sequences, self.num_tokens, self.cursor = num_sequences, 0, 0
        try:
            self.f = h5py.File(self.tmp, "w")
            N, T, k = num_sequences, seq_len, top_k
            self.f.create_dataset("input_ids", (N, T), ids_dtype, chunks=(1, T))
            self.f.create_dataset("lengths", (N,), np.int32)
            self.f.create_dataset("sequence_index", (N,), np.int64)
            self.f.create_dataset("topk_ids", (N, T, k), ids_dtype, chunks=(1, T, k))
            self.f.create_dataset("topk_logprobs", (N, T, k), value_dtype, chunks=(1, T, k))
            if num_layers:
                H = hidden_size
                self.f.create_dataset("hidden_states", (N, num_layers, T, H), value_dtype, chunks=(1, num_layers, T, H))
            if sample_n:
                self.f.create_dataset("sample_ids", (N, T, sample_n), ids_dtype, chunks=(1, T, sample_n))
                self.f.create_dataset("sample_counts", (N, T, sample_n), np.uint8, chunks=(1, T, sample_n))
        except OSError as e:
            self.abort()
            raise KDError(f"cannot create shard {self.tmp}: {e}") from None

    def append(self, input_ids, lengths, sequence_index, topk_ids, topk_logprobs, hidden, samples=None) -> None:
        """Add a batch of n sequences (numpy arrays in the layout above, any dtype castable to the stored one);
        samples: None or (sample_ids, sample_counts)."""
        n = len(lengths)
        sl = slice(self.cursor, self.cursor + n)
        try:
            self.f["input_ids"][sl] = input_ids
            self.f["lengths"][sl] = lengths
            self.f["sequence_index"][sl] = sequence_index
            self.f["topk_ids"][sl] = topk_ids
            self.f["topk_logprobs"][sl] = topk_logprobs
            if hidden is not None:
                self.f["hidden_states"][sl] = hidden
            if samples is not None:
                self.f["sample_ids"][sl], self.f["sample_counts"][sl] = samples
        except (OSError, RuntimeError) as e:  # h5py reports ENOSPC as either
            self.abort()
            raise KDError(f"writing shard {self.tmp} failed ({e}); free space or choose another cache.output_dir, "
                          "then re-run: complete shards are kept") from None
        self.cursor += n
        self.num_tokens += int(np.sum(lengths))

    def commit(self) -> dict:
        if self.cursor != self.num_sequences:
            self.abort()
            raise RuntimeError(f"shard {self.path.name}: {self.cursor} of {self.num_sequences} sequences written")
        meta = dict(self.meta, num_tokens=self.num_tokens)
        try:
            self.f.attrs[META_ATTR] = json.dumps(meta, sort_keys=True)
            self.f.close()
            with open(self.tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            info = {"file": self.path.name, "sha256": sha256_file(self.tmp), "bytes": self.tmp.stat().st_size,
                    "first_sequence": meta["first_sequence"], "num_sequences": self.num_sequences,
                    "num_tokens": self.num_tokens, "config_hash": meta["config_hash"]}
            write_json_atomic(sidecar_path(self.path), info)
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise KDError(f"finishing shard {self.path} failed ({e}); free space or fix permissions, then re-run") from None
        return info

    def abort(self) -> None:
        try:
            if getattr(self, "f", None) is not None and self.f.id.valid:
                self.f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


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
        hint = (" (a cache run started there but has not finished: re-run cache_teacher.py with the same config)"
                if (root / CONFIG_FILE).exists() else "")
        raise KDError(f"no teacher cache at {root}: {MANIFEST} is missing{hint}")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise KDError(f"{mf} is not valid JSON ({e}); the cache is damaged, re-run cache_teacher.py") from None
    if manifest.get("format") != FORMAT:
        raise KDError(f"{mf} is not a {FORMAT} manifest")
    if not isinstance(manifest.get("format_version"), int) or manifest["format_version"] > FORMAT_VERSION:
        raise KDError(f"{root} has cache format version {manifest.get('format_version')}; this kd reads up to "
                      f"{FORMAT_VERSION}: upgrade kd")
    return manifest


class CacheSplit:
    """Random access to the sequences of one split, as a map-style torch Dataset.

    h5py handles cannot cross a fork, so files are opened lazily and the handle table is keyed by process id:
    each DataLoader worker opens its own. Files are opened read-only, so many runs can share one cache.
    `fields` limits what is read (skip hidden states when no feature loss needs them).
    """

    ALL_FIELDS = ("input_ids", "topk_ids", "topk_logprobs", "hidden_states", "sample_ids", "sample_counts")

    def __init__(self, root: Path, manifest: dict, split: str, fields: Iterable[str] = ALL_FIELDS):
        if split not in manifest["splits"]:
            raise KDError(f"cache {root} has no '{split}' split (it has {sorted(manifest['splits'])})")
        self.root, self.split = root, split
        unknown = set(fields) - set(self.ALL_FIELDS)
        if unknown:
            raise ValueError(f"unknown cache fields {sorted(unknown)}")
        stored = {"hidden_states": bool(manifest["hidden_layers"]), "sample_ids": bool(manifest.get("sample_n")),
                  "sample_counts": bool(manifest.get("sample_n"))}
        self.fields = tuple(f for f in fields if stored.get(f, True))
        self.shards = sorted(manifest["splits"][split]["shards"], key=lambda s: s["first_sequence"])
        self.starts = np.array([s["first_sequence"] for s in self.shards], dtype=np.int64)
        self.length = int(manifest["splits"][split]["num_sequences"])
        self._files: dict[int, dict[int, object]] = {}

    def __len__(self) -> int:
        return self.length

    def _file(self, j: int):
        import h5py

        files = self._files.setdefault(os.getpid(), {})
        if j not in files:
            files[j] = h5py.File(self.root / self.shards[j]["file"], "r")
        return files[j]

    def __getitem__(self, i: int) -> dict:
        import torch

        if not 0 <= i < self.length:
            raise IndexError(i)
        j = int(np.searchsorted(self.starts, i, side="right") - 1)
        f, r = self._file(j), i - int(self.starts[j])
        item = {"length": torch.tensor(int(f["lengths"][r])), "sequence_index": torch.tensor(i)}
        for name in self.fields:
            a = f[name][r]
            # uint16 has no torch counterpart for indexing; ids widen to int64, values keep their stored dtype
            # (fp16 halves host->device traffic; losses upcast to fp32).
            item[name] = torch.from_numpy(a.astype(np.int64) if a.dtype.kind in "ui" else a)
        return item

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


class TeacherCache:
    """A finished cache directory: `manifest` plus `split(name)` readers."""

    def __init__(self, path: str | Path):
        self.root = Path(path)
        self.manifest = read_manifest(self.root)

    def split(self, name: str, fields: Iterable[str] = CacheSplit.ALL_FIELDS) -> CacheSplit:
        return CacheSplit(self.root, self.manifest, name, fields)

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


def verify(path: str | Path, log=print) -> list[str]:
    """Re-check a cache; returns the problems found (empty when the cache is sound). Stops at the first bad shard."""
    import h5py

    root = Path(path)
    manifest = read_manifest(root)
    T, k, vocab = manifest["seq_len"], manifest["top_k"], manifest["teacher"]["vocab_size"]
    L, H = len(manifest["hidden_layers"]), manifest["teacher"]["hidden_size"]
    n_samples = manifest.get("sample_n", 0)
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
                shapes = {"input_ids": (n, T), "lengths": (n,), "sequence_index": (n,), "topk_ids": (n, T, k),
                          "topk_logprobs": (n, T, k)}
                if L:
                    shapes["hidden_states"] = (n, L, T, H)
                if n_samples:
                    shapes["sample_ids"] = shapes["sample_counts"] = (n, T, n_samples)
                for name, shape in shapes.items():
                    if name not in f or f[name].shape != shape:
                        got = f[name].shape if name in f else "missing"
                        return [f"{where}: dataset {name} has shape {got}, expected {shape}"]
                meta = json.loads(f.attrs[META_ATTR])
                if meta.get("format_version") != manifest["format_version"] or meta.get("split") != split:
                    return [f"{where}: its metadata does not match the manifest"]
                seq_index = f["sequence_index"][:]
                if shard["first_sequence"] != expected_next or not np.array_equal(
                        seq_index, np.arange(expected_next, expected_next + n)):
                    return [f"{where}: sequence indices are not contiguous from {expected_next}"]
                lengths = f["lengths"][:]
                if int(lengths.sum()) != shard["num_tokens"] or (lengths < 2).any() or (lengths > T).any():
                    return [f"{where}: lengths are inconsistent with the manifest"]
                for s in range(0, n, 16):  # blocks of 16 sequences: few reads, per-sequence messages
                    lp, ids = f["topk_logprobs"][s:s + 16], f["topk_ids"][s:s + 16]
                    hs = f["hidden_states"][s:s + 16] if L else None
                    counts = f["sample_counts"][s:s + 16] if n_samples else None
                    sids = f["sample_ids"][s:s + 16] if n_samples else None
                    for i in range(len(lp)):
                        problem = _check_block(lp[i], ids[i], vocab)
                        if problem is None and hs is not None and not np.isfinite(hs[i].astype(np.float32)).all():
                            problem = "hidden states are not finite"
                        if problem is None and counts is not None and (
                                (counts[i].astype(np.int64).sum(-1) != n_samples).any() or (sids[i] >= vocab).any()):
                            problem = f"sampled counts do not sum to {n_samples} or sampled ids are out of range"
                        if problem:
                            return [f"{where}, sequence {int(seq_index[s + i])} of split {split}: {problem}"]
            expected_next += n
            log(f"ok {shard['file']}: {n} sequences, {shard['num_tokens']} tokens")
        if expected_next != info["num_sequences"]:
            return [f"split {split}: shards hold {expected_next} sequences, manifest says {info['num_sequences']}"]
    return []


def summary(path: str | Path) -> str:
    m = read_manifest(path)
    lines = [f"{FORMAT} v{m['format_version']} at {path}",
             f"teacher   {m['teacher']['name_or_path']} ({m['teacher']['model_type']}, vocab {m['teacher']['vocab_size']}, "
             f"hidden {m['teacher']['hidden_size']}, dtype {m['teacher']['dtype']})",
             f"tokenizer fingerprint {m['tokenizer']['fingerprint'][:16]}...",
             f"stored    top-{m['top_k']} ids+log-probs ({m['value_dtype']}), hidden layers {m['hidden_layers']}, seq_len {m['seq_len']}"]
    for split, info in m["splits"].items():
        lines.append(f"{split:<9} {info['num_sequences']} sequences, {info['num_tokens']} tokens, "
                     f"{len(info['shards'])} shards, {len(info['documents'])} documents")
    lines.append(f"size      {m['bytes']} bytes, {m['bytes_per_token']:.0f} bytes/token")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kd.cache", description="Inspect or verify a teacher cache.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for cmd in ("info", "verify"):
        sub.add_parser(cmd).add_argument("dir")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        print(summary(args.dir))
        return
    problems = verify(args.dir)
    if problems:
        print(f"verify FAILED: {problems[0]}", file=sys.stderr)
        sys.exit(1)
    print(f"verify ok: {args.dir}")


if __name__ == "__main__":
    run_cli(main)
