"""Writing a cache: one shard built in memory and committed atomically with its sidecar (ShardWriter), and the
whole directory, its claim, lock, shards and manifest (CacheWriter)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd.cache.format import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    META_ATTR,
    SHARD_DATASETS,
    SPLITS,
    TEACHER_SCORE_COLUMNS,
    Dims,
    checksum,
    records_table,
    shard_index_name,
    shard_name,
    sidecar_path,
    stored_fields,
)
from kd.cache.manifest import content_config, manifest_record
from kd.cache_config import CacheConfig
from kd.config import diff_keys
from kd.data.ingest import INGEST_DIR, IngestSpec
from kd.dist import agree, gather_rows
from kd.errors import KDError
from kd.io import (
    LOCK_FILE,
    DirLock,
    disk_error,
    h5_image,
    h5_in_memory,
    sha256_file,
    write_bytes_durable,
    write_json_atomic,
)
from kd.teacher import TeacherOutputs


class ShardWriter:
    """Builds one shard in memory; `commit()` writes it under a temporary name, fsyncs, writes the sidecar and
    renames. Built in memory (kd.io.h5_in_memory) so that a full disk or a file-size limit fails one plain write,
    which removes the partial file and raises one KDError, instead of HDF5's late errors and segfaults.

    Until `commit()` returns, no file with the shard's final name exists, so a killed run can never leave a
    shard that looks complete. The sidecar is written before the rename: a final-named shard always has one.
    `meta` is the shard's kd_meta: the cache's description (sizes, `codecs`: kd/cache/codecs.py) plus the shard's
    split, index and first sequence. `append` takes the teacher's outputs in the decoded layout (TeacherOutputs).
    `basis`: the cache's HiddenBasis, for a `lowrank` hidden-state codec.
    """

    def __init__(self, path: Path, meta: dict, num_sequences: int, basis=None):
        self.path, self.meta = path, meta
        self.tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        self.num_sequences, self.num_tokens, self.cursor = num_sequences, 0, 0
        try:
            self.f = h5_in_memory(str(self.tmp))
            N = num_sequences
            self.f.create_dataset("lengths", (N,), np.int32, chunks=(N,))
            self.f.create_dataset("sequence_index", (N,), np.int64, chunks=(N,))
            # contiguous, not chunked: a chunk's index would cost ~2.5 KiB more per shard for 32 bytes a window
            self.f.create_dataset("teacher_score", (N, len(TEACHER_SCORE_COLUMNS)), np.float64)
            dims = Dims.of(meta)
            self.fields = stored_fields(dims)  # each with the outputs it takes (Field.names) and its Store
            self.stores = {f.name: f.store(meta["codecs"], dims, basis) for f in self.fields}
            for store in self.stores.values():
                store.create(self.f, N)
            # Integrity: every row's checksum goes into `checksums` [N, len(rows)] at commit, and the reader checks
            # each row it reads against it (a flipped byte fails that sequence's read instead of reaching the
            # student). HDF5's fletcher32 (format 4) did the same per chunk at 3x the read cost.
            self.rows = [ds for store in self.stores.values() for ds in store.row_datasets()]
            self.sums = np.zeros((N, len(self.rows)), np.uint64)
            self.used = dict.fromkeys(self.stores, 0)  # bytes of variable-length rows stored, per field
        except OSError as e:
            self.abort()
            raise KDError(f"cannot create shard {self.tmp}: {e}") from None

    def append(self, out: TeacherOutputs) -> None:
        """Add a batch of n sequences (kd.teacher.TeacherOutputs: the decoded layout, any dtype castable to the
        stored one): each stored field's values, encoded by its Store (kd/cache/format.py FIELDS)."""
        lengths = out.lengths
        n = len(lengths)
        sl = slice(self.cursor, self.cursor + n)
        try:
            fixed, variable = {}, {}  # per field: rows of fixed-shape datasets, per-sequence byte strings
            for field in self.fields:
                values = tuple(getattr(out, name) for name in field.names)
                if any(v is None for v in values):
                    raise ValueError(f"this cache stores {field.name} and the batch has none")
                fixed[field.name], variable[field.name] = self.stores[field.name].encode(values)
            # the checksums of the bytes as stored: the arrays in the datasets' own dtypes
            rows = {ds: np.asarray(a, self.f[ds].dtype) for part in fixed.values() for ds, a in part.items()}
            rows.update({ds: blobs for part in variable.values() for ds, blobs in part.items()})
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
            self.f["sequence_index"][sl] = out.sequence_index
            self.f["teacher_score"][sl] = np.nan if out.teacher_score is None else out.teacher_score
            for name, part in fixed.items():
                for ds in part:
                    self.f[ds][sl] = rows[ds]
                if variable[name]:
                    self.used[name] = self.stores[name].write_variable(
                        self.f, variable[name], self.cursor, self.used[name]
                    )
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


# ----------------------------------------------------------------------------------------------------------
# The whole cache directory


@dataclass(frozen=True)
class ShardJob:
    """Shard `index` of `split`: sequences [first, end) of that split."""

    split: str
    index: int
    first: int
    end: int

    @property
    def num_sequences(self) -> int:
        return self.end - self.first


def weights_change(old: dict | None, new: dict) -> str | None:
    """How the teacher's weights differ between a cache's record and now (None if they do not)."""
    if old is None or old.get("digest") == new["digest"]:
        return None
    if old.get("kind") == new.get("kind") == "local files":
        before, after = ({f["name"]: f for f in r["files"]} for r in (old, new))
        changed = [n for n in sorted(set(before) | set(after)) if before.get(n) != after.get(n)]
        return "weight files changed: " + ", ".join(
            f"{n} ({'sha256 ' + before[n]['sha256'][:12] if n in before else 'absent'} -> "
            f"{'sha256 ' + after[n]['sha256'][:12] if n in after else 'absent'})"
            for n in changed[:3]
        )
    if old.get("kind") == new.get("kind") == "served":
        return f"served model {old['model']} ({old['root']}) -> {new['model']} ({new['root']})"
    return f"teacher weights {old} -> {new}"


class CacheWriter:
    """The writing side of one cache directory, across all processes of a run: the directory's claim and lock
    (`claimed`), the record of the run's config (`record_config`), which shards this process computes (`my_jobs`),
    a ShardWriter per shard (`shard`), and the manifest written last (`finish`).

    Order on disk, so that a killed run never leaves something that looks complete: cache_config.json once the input
    is ingested; shards under temporary names, each renamed when whole; manifest.json last (the cache exists from
    then on); the ingest windows removed after it. `cfg_dict`: the run's resolved config (kd.config.to_dict); `meta`:
    the cache's description (kd.cache.manifest.cache_metadata), which every shard's kd_meta and the manifest carry
    (a lowrank codec's spec gets its basis's sha256 once the basis is fitted: kd.cache.build.hidden_basis)."""

    def __init__(self, out: Path, cfg_dict: dict, meta: dict, accelerator):
        self.out, self.cfg_dict, self.meta, self.accelerator = Path(out), cfg_dict, meta, accelerator

    # -- the directory's claim ---------------------------------------------------------------------------------
    @contextmanager
    def claimed(self, overwrite: bool, spec: IngestSpec, weights: dict):
        """Lock the output directory (main process) for the whole run and prepare it; yields True on every process
        if it already holds this exact cache (nothing to do). A second run on the directory is refused."""
        lock = None

        def claim() -> int:
            nonlocal lock
            if not self.accelerator.is_main_process:
                return 0
            if self.out.is_dir() and (self.out / MANIFEST).exists() and not os.access(self.out, os.W_OK):
                # a complete cache on a read-only disk: checked against this config, and nothing is written to it
                # (not even the lock): a re-run with nothing to do only reads
                if self._prepare(overwrite, weights, writable=False):
                    return 1
                raise KDError(f"{self.out} is read-only and its cache is not this config's; choose another directory")
            lock = self._open()
            complete = self._prepare(overwrite, weights)
            if not complete:
                ingest_dir = self.out / INGEST_DIR
                ingest_dir.mkdir(exist_ok=True)
                ingest_cfg = ingest_dir / "config.json"
                if ingest_cfg.exists() and json.loads(ingest_cfg.read_text()).get("hash") != spec.content_hash():
                    print("[ingest] discarding an unfinished ingest made with another data config", flush=True)
                    for p in ingest_dir.glob("*.h5"):
                        p.unlink()
                write_json_atomic(ingest_cfg, {"hash": spec.content_hash(), "spec": spec.__dict__})
            return int(complete)

        try:
            state = agree(self.accelerator, claim)
            yield bool(gather_rows(self.accelerator, [state])[0, 0])  # the main process's finding, on every process
        finally:
            if lock is not None:
                lock.release()

    def _open(self) -> DirLock:
        out = self.out
        if out.exists() and not out.is_dir():
            raise KDError(f"cache.output_dir {out} exists and is not a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KDError(f"cannot write to cache.output_dir {out}: {e}") from None
        return DirLock(out, "cache_teacher.py run").acquire()

    def _prepare(self, overwrite: bool, weights: dict | None = None, writable: bool = True) -> bool:
        """On the main process, holding the directory lock: refuse a directory that holds something else, clear
        what a killed run left; True if it already holds this exact cache (nothing to do). `weights`: the teacher's
        weights_fingerprint now, compared with the one the cache was started with."""
        out, cfg_dict = self.out, self.cfg_dict
        cfg_file = out / CONFIG_FILE
        if cfg_file.exists():
            try:
                recorded = json.loads(cfg_file.read_text())
                old = recorded["config"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise KDError(
                    f"{cfg_file} is damaged (not the JSON cache_teacher.py writes); remove it, or use "
                    "cache.overwrite=true to start this cache again"
                ) from None
            changed = weights_change(recorded.get("teacher_weights"), weights) if weights is not None else None
            if changed and not overwrite:
                served = weights.get("kind") == "served"
                raise KDError(
                    (
                        f"{out} was started with another served teacher ({changed}); serve that model again, "
                        if served
                        else f"{out} was started with other teacher weights at {cfg_dict['teacher']['model']} "
                        f"({changed}); restore those weights, "
                    )
                    + "or use cache.overwrite=true (or another cache.output_dir) to cache this teacher"
                )
            differing = diff_keys(content_config(old), content_config(cfg_dict), CacheConfig) + (
                ["teacher weights"] if changed else []
            )
            # the cache format is part of a cache's identity (its shards' config hash): shards a kd of another
            # format began are computed again, said here; a finished cache of another format stays as it is (kd
            # reads it), unless cache.overwrite=true rewrites it in this kd's format
            fmt = recorded.get("format_version")
            if fmt != FORMAT_VERSION and not differing:
                if not (out / MANIFEST).exists():
                    print(
                        f"[cache] {out} was begun by a kd writing cache format {fmt}: its shards are computed again "
                        f"in format {FORMAT_VERSION} (its ingested windows are kept)",
                        flush=True,
                    )
                elif overwrite and writable:
                    differing = [f"the cache format ({fmt}; this kd writes {FORMAT_VERSION})"]
                    print(f"[cache] rewriting {out}: {differing[0]}", flush=True)
                else:
                    print(
                        f"[cache] {out} is a cache of format {fmt}, which this kd reads as it is; cache.overwrite=true "
                        f"rewrites it in format {FORMAT_VERSION} (docs/formats.md says what that adds)",
                        flush=True,
                    )
            if differing and (not overwrite or not writable):
                raise KDError(
                    f"{out} holds a cache made with a different config (differing keys: {', '.join(differing)}). "
                    "Use another cache.output_dir, or cache.overwrite=true to replace it"
                )
            if differing:
                for p in out.iterdir():
                    if p.suffix in (".h5", ".json", ".npy") or ".tmp-" in p.name:
                        p.unlink()
                shutil.rmtree(out / INGEST_DIR, ignore_errors=True)
            elif (out / MANIFEST).exists():
                if writable:  # a run killed between manifest and clean-up left its windows
                    shutil.rmtree(out / INGEST_DIR, ignore_errors=True)
                return True
        elif any(p.name not in (LOCK_FILE, INGEST_DIR) for p in out.iterdir()):
            # an unfinished ingest (no cache_config.json yet) is kd's own and may be resumed or replaced; anything
            # else is the user's
            raise KDError(
                f"cache.output_dir {out} is not empty and holds no kd cache; refusing to write into it. "
                "Choose an empty or new directory"
            )
        probe = out / f".write-probe-{os.getpid()}"
        try:
            probe.write_bytes(b"0" * 4096)
        except OSError as e:
            raise KDError(f"cannot write to cache.output_dir {out}: {disk_error(e)}") from None
        finally:
            probe.unlink(missing_ok=True)
        for p in [*out.glob("*.tmp-*"), *out.glob(f"{INGEST_DIR}/*.tmp-*")]:  # left by a killed run; never counted
            p.unlink()
        return False

    def record_config(self, weights: dict) -> None:
        """Only once the input is ingested does the directory become this config's cache: a run refused before
        leaves nothing that would block the corrected re-run."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process and not (self.out / CONFIG_FILE).exists():
            write_json_atomic(
                self.out / CONFIG_FILE,
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "config": self.cfg_dict,
                    "teacher_weights": weights,
                },
            )

    # -- the shards --------------------------------------------------------------------------------------------
    def jobs(self, num_sequences: dict) -> list[ShardJob]:
        """Every shard of the cache: shard j of a split holds its sequences [j*S, (j+1)*S)."""
        S = self.meta["sequences_per_shard"]
        return [
            ShardJob(split, j, start, min(start + S, num_sequences[split]))
            for split in SPLITS
            for j, start in enumerate(range(0, num_sequences[split], S))
        ]

    def my_jobs(self, jobs: list[ShardJob]) -> list[ShardJob]:
        """This process's shards: j % N == rank, so the cache does not depend on the number of processes."""
        return jobs[self.accelerator.process_index :: self.accelerator.num_processes]

    def is_complete(self, job: ShardJob, input_sha256) -> bool:
        """A shard on disk is kept only if it is whole (sha256), of this cache (config hash), computed from exactly
        these windows (`input_sha256()`: their fingerprint, computed only when the rest holds) and, with the lowrank
        codec, with this basis."""
        info = complete_shard_info(self.out / shard_name(job.split, job.index), self.meta["config_hash"])
        if info is None:
            return False
        same_basis = info.get("basis_sha256") == self.meta["codecs"]["hidden_states"].get("basis_sha256")
        return same_basis and info.get("input_sha256") == input_sha256()

    def shard(self, job: ShardJob, basis=None) -> ShardWriter:
        meta = dict(self.meta, split=job.split, shard_index=job.index, first_sequence=job.first)
        return ShardWriter(self.out / shard_name(job.split, job.index), meta, job.num_sequences, basis)

    # -- the end -----------------------------------------------------------------------------------------------
    def finish(self, jobs: list[ShardJob], num_sequences: dict, stats: dict) -> dict:
        """Main process, once every process is done: collect the sidecars into the per-split shard indexes and
        manifest.json (the cache exists from here on), then remove the ingest windows (they live on in the shards)."""
        records, refs = {}, {}
        for split in SPLITS:
            shards = [
                json.loads(sidecar_path(self.out / shard_name(j.split, j.index)).read_text())
                for j in jobs
                if j.split == split
            ]
            for info in shards:
                info.pop("config_hash")
            records[split] = shards
            # the per-shard records go to a binary index beside the manifest: at 100,000 shards, JSON records
            # would make the manifest ~37 MB and its parse the slowest part of opening a cache
            refs[split] = write_shard_index(self.out, split, shards)
        manifest = manifest_record(self.meta, self.cfg_dict, records, refs, num_sequences, stats)
        write_json_atomic(self.out / MANIFEST, manifest)
        shutil.rmtree(self.out / INGEST_DIR, ignore_errors=True)
        return manifest
