"""Writing shards: one shard is built in memory and committed atomically with its sidecar."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from kd.cache.codecs import ragged_encode
from kd.cache.format import (
    META_ATTR,
    SHARD_DATASETS,
    Dims,
    checksum,
    coded_fields,
    field_codecs,
    field_datasets,
    records_table,
    row_datasets,
    shard_index_name,
    sidecar_path,
)
from kd.errors import KDError
from kd.io import disk_error, h5_image, h5_in_memory, sha256_file, write_bytes_durable, write_json_atomic


class ShardWriter:
    """Builds one shard in memory; `commit()` writes it under a temporary name, fsyncs, writes the sidecar and
    renames. Built in memory (kd.io.h5_in_memory) so that a full disk or a file-size limit fails one plain write,
    which removes the partial file and raises one KDError, instead of HDF5's late errors and segfaults.

    Until `commit()` returns, no file with the shard's final name exists, so a killed run can never leave a
    shard that looks complete. The sidecar is written before the rename: a final-named shard always has one.
    `codecs` is the manifest's record (kd/cache/codecs.py); arrays passed to `append` are always the decoded
    layout (hidden states may be a torch tensor on the teacher's device: a `lowrank` codec projects them there).
    `basis`: the cache's HiddenBasis, for a `lowrank` hidden-state codec.
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
        basis=None,
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
            dims = Dims(T, k, num_layers, hidden_size, "loss_mask" in codecs)
            self.field_codecs = field_codecs(codecs, [f.name for f in coded_fields(dims)], basis)
            for ds, (ds_shape, dtype) in field_datasets(codecs, dims).items():
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
        self, input_ids, lengths, sequence_index, topk_ids, topk_logprobs, hidden, samples=None, text=None, chat=None
    ) -> None:
        """Add a batch of n sequences (numpy arrays in the decoded layout, any dtype castable to the stored one);
        samples: None or (sample_ids, sample_counts), padded [n, T, sample_n]; text: None or (texts, spans [n, T, 2]);
        chat (a chat cache): (loss_mask [n, T], segments [n, T])."""
        n = len(lengths)
        sl = slice(self.cursor, self.cursor + n)
        try:
            encoded = {}
            given = {
                "input_ids": input_ids,
                "topk_ids": topk_ids,
                "topk_logprobs": topk_logprobs,
                "hidden_states": hidden,
            }
            if "loss_mask" in self.field_codecs:
                if chat is None:
                    raise ValueError("a chat cache's sequences need their loss_mask and segments")
                given.update(loss_mask=chat[0], segments=chat[1])
            for name, codec in self.field_codecs.items():
                encoded.update(codec.encode(name, given[name]))
            blobs = None
            if samples is not None and self.codecs["samples"]["name"] == "ragged":
                spec = self.codecs["samples"]
                blobs = [ragged_encode(i, c, spec["id_bits"], spec["count_bits"]) for i, c in zip(*samples)]
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


def write_shard_index(root: Path, split: str, records: list[dict]) -> dict:
    """A split's shard records (sidecar dicts) -> DIR/<split>-shards.npy, written atomically; returns the manifest's
    reference to it ({file, sha256, num_shards})."""
    table = records_table(records)
    buf = io.BytesIO()
    np.save(buf, table, allow_pickle=False)
    data, path = buf.getvalue(), root / shard_index_name(split)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    write_bytes_durable(tmp, data)  # one KDError naming the cause if the disk is full
    os.replace(tmp, path)
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "num_shards": len(records)}
