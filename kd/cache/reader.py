"""Reading a cache: the manifest, a split as a map-style torch Dataset (bounded open files), open shards' rows."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd.cache.basis import BASIS_FILE, HiddenBasis
from kd.cache.format import (
    CONFIG_FILE,
    FIELDS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MAX_OPEN_FILES,
    META_ATTR,
    SHARD_RECORD,
    TEACHER_SCORE_COLUMNS,
    WINDOW_SCORES_SINCE,
    checksum,
    dataset_mismatch,
    field_stores,
    records_table,
    stored_fields,
)
from kd.cache.manifest import Manifest
from kd.errors import KDError
from kd.textscore import eval_text_differs, score_record


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
            self.sums = table[:].tolist()  # Python ints: indexing a uint64 array per read costs more than the crc
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
        if self.sums is not None and checksum(value) != self.sums[r][self.col[ds]]:
            raise ValueError(f"dataset {ds} fails its checksum")
        return value

    def row(self, r: int):
        return lambda ds: self.get(ds, r)

    def close(self) -> None:
        self.f.close()


def shard_table(root: Path, manifest: dict, split: str) -> np.ndarray:
    """A split's shard records as a numpy structured array (SHARD_RECORD), by first sequence: from the binary index
    the manifest names (format 6 on; its sha256 checked) or from the manifest's JSON list (older caches)."""
    info = manifest["splits"][split]
    if "shards" in info:
        return records_table(info["shards"])
    ref = info["shard_index"]
    path = root / ref["file"]
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KDError(
            f"cannot read the shard index {path} of cache {root} ({e}): the cache is damaged; re-cache"
        ) from None
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise KDError(
            f"the shard index {path} does not match the manifest (sha256 differs): the cache was changed or "
            f"damaged; run python -m kd.cache verify {root}, or re-cache"
        )
    table = np.load(io.BytesIO(data), allow_pickle=False)
    if table.dtype != SHARD_RECORD or len(table) != ref["num_shards"]:
        raise KDError(f"the shard index {path} is not a kd shard index of {ref['num_shards']} records: re-cache")
    return np.sort(table, order="first_sequence")


def shard_records(root: Path, manifest: dict, split: str) -> list[dict]:
    """shard_table as plain dicts (str and int values), for verify, tools and tests; slow at 100,000 shards."""
    table = shard_table(root, manifest, split)
    return [
        {n: (row[n].decode() if SHARD_RECORD[n].kind == "S" else int(row[n])) for n in SHARD_RECORD.names}
        for row in table
    ]


class CacheSplit:
    """Random access to the sequences of one split, as a map-style torch Dataset.

    h5py handles cannot cross a fork, so files are opened lazily and the handle table is keyed by process id:
    each DataLoader worker opens its own. Files are opened read-only, so many runs can share one cache.
    `fields` limits what is read (skip hidden states when no feature loss needs them). `check=False` skips the
    per-sequence checksums (format 5 on) for a cache already checked with `python -m kd.cache verify`; the
    agreement of each shard with the manifest is checked on open either way.
    """

    # every value the field table stores (kd/cache/format.py FIELDS); the text and its spans only when asked for
    # (kd/align.py does): the text is a str, not a tensor
    ALL_FIELDS = tuple(name for f in FIELDS for name in f.names)
    TENSOR_FIELDS = tuple(name for f in FIELDS if f.name != "text" for name in f.names)

    def __init__(
        self, root: Path, manifest: dict, split: str, fields: Iterable[str] = TENSOR_FIELDS, check: bool = True
    ):
        info = Manifest.of(manifest)
        if split not in info.splits:
            raise KDError(f"cache {root} has no '{split}' split (it has {sorted(info.splits)})")
        self.root, self.split, self.check = root, split, check
        unknown = set(fields) - set(self.ALL_FIELDS)
        if unknown:
            raise ValueError(f"unknown cache fields {sorted(unknown)}")
        stored = {name for f in stored_fields(info.dims) for name in f.names}
        self.fields = tuple(f for f in fields if f in stored)
        shards = shard_table(root, manifest, split)
        # per shard only its file name, first sequence and count, as numpy arrays: a reader's memory (copied into
        # every DataLoader worker) stays small at 100,000 shards (5.6 MB), where JSON records as Python objects
        # took ~100 MB
        self.files = shards["file"].copy()
        self.starts = shards["first_sequence"].copy()
        self.counts = shards["num_sequences"].copy()
        self.length = info.splits[split].num_sequences
        self.codecs = info.codecs
        spec = self.codecs["hidden_states"]
        basis = None
        if spec["name"] == "lowrank" and "hidden_states" in self.fields:  # [L, H, r]: small, pickled to workers
            basis = HiddenBasis.load(root / BASIS_FILE, spec.get("basis_sha256"))
        # the Store of each field with a value asked for, built once (sampled ids and counts decode together)
        self.stores = field_stores(self.codecs, info.dims, basis, wanted=self.fields)
        self.manifest = {k: v for k, v in manifest.items() if k != "splits"}  # the cache-wide description
        # the shard records must tile the split: a removed or edited record is caught here
        ends = np.cumsum(self.counts)
        gaps = np.flatnonzero(self.starts != np.concatenate([[0], ends[:-1]]))
        if len(gaps):
            j = int(gaps[0])
            expected = int(ends[j - 1]) if j else 0
            raise KDError(
                f"cache {root}: the manifest's {split} shards do not cover sequences {expected}.."
                f"{int(self.starts[j]) - 1} (a shard record is missing or edited); the cache is damaged: "
                "run python -m kd.cache verify, or re-cache"
            )
        expected = int(ends[-1]) if len(ends) else 0
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
        path = self.root / self.files[j].decode()
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
                f"shard {self.files[j].decode()} of cache {self.root}, sequence {i} of split {self.split}: "
                f"cannot be read ({str(e).splitlines()[0]}); the cache is damaged: run python -m kd.cache "
                f"verify {self.root}, or re-cache"
            ) from None

    def _read(self, shard: ShardRows, r: int, i: int) -> dict:
        import torch

        row = shard.row(r)
        item = {"length": torch.tensor(int(shard.lengths[r])), "sequence_index": torch.tensor(i)}
        # ids widen to int64 (uint16 has no torch counterpart for indexing); plain values keep their stored dtype
        # (fp16 halves host->device traffic; losses upcast to fp32), q8 values decode to fp32. Text stays a str, for
        # alignment to another tokenizer (kd/align.py); it never goes to a device.
        for store in self.stores.values():
            for name, value in zip(store.outputs, store.decode(row)):
                if name not in self.fields:
                    continue
                if name in _WIDEN:  # stored small; torch indexes and compares these in these dtypes
                    value = value.astype(_WIDEN[name])
                item[name] = value if isinstance(value, str) else torch.from_numpy(value)
        return item

    def teacher_scores(self, end: int, *, start: int = 0) -> np.ndarray:
        """[end - start, 4] the teacher's own score on each of the split's windows `start`..`end` - 1 (format 8 on:
        TEACHER_SCORE_COLUMNS; NaN for a window the caching pass did not score; `end` past the split: to its end),
        read from the shards that hold them, checked on open."""
        if not 0 <= start <= end:
            raise ValueError(f"teacher_scores: windows {start}..{end} are not a range (0 <= start <= end)")
        end = min(end, self.length)
        start = min(start, end)
        first = max(0, int(np.searchsorted(self.starts, start, side="right")) - 1)
        parts = []
        for j in range(first, int(np.searchsorted(self.starts, end, side="left"))):
            try:
                parts.append(self._file(j).f["teacher_score"][:])
            except (OSError, KeyError) as e:
                raise KDError(
                    f"shard {self.files[j].decode()} of cache {self.root}: its teacher scores cannot be read "
                    f"({str(e).splitlines()[0]}); the cache is damaged: run python -m kd.cache verify {self.root}, "
                    "or re-cache"
                ) from None
        if not parts:
            return np.zeros((0, len(TEACHER_SCORE_COLUMNS)))
        offset = start - int(self.starts[first])
        return np.concatenate(parts)[offset : offset + end - start]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


_WIDEN = {"loss_mask": np.bool_, "segments": np.int64}


@dataclass(frozen=True)
class TeacherReference:
    """The teacher's own score (kd.textscore.score_record) on the text a student's evals read: the first `windows`
    windows of a split. `note` is empty when both are over the same windows; a cache older than format 8 kept the
    score per shard only, so a capped eval is compared with the score on the whole split, and `note` says so."""

    score: dict
    windows: int
    note: str = ""


class TeacherCache:
    """A finished cache directory: `info` (the typed manifest, kd.cache.manifest.Manifest) plus `split(name)`
    readers. `manifest` is the JSON as read, which the shard readers check their shards against."""

    def __init__(self, path: str | Path, check: bool = True):
        self.root, self.check = Path(path), check
        self.manifest = read_manifest(self.root)
        self.info = Manifest.of(self.manifest)

    def split(self, name: str, fields: Iterable[str] = CacheSplit.TENSOR_FIELDS) -> CacheSplit:
        return CacheSplit(self.root, self.manifest, name, fields, self.check)

    def teacher_reference(self, split: str, max_sequences: int | None) -> TeacherReference | None:
        """The teacher's score on the first `max_sequences` windows of `split` (None: all), as a student evaluated
        with that cap (train.eval_max_sequences) reads them; None when the caching pass recorded no score."""
        info = self.info.splits.get(split)
        if info is None or not info.teacher_score:
            return None
        n = info.num_sequences
        if max_sequences is None or max_sequences >= n:
            return TeacherReference(info.teacher_score, n)
        rows = (
            self.split(split, ()).teacher_scores(max_sequences)
            if self.info.format_version >= WINDOW_SCORES_SINCE
            else None
        )
        if rows is None or np.isnan(rows).any():  # per shard only: the whole split's score, said to be so
            return TeacherReference(info.teacher_score, n, eval_text_differs(max_sequences, n))
        nats, tokens, chars, nbytes = rows.sum(0)
        return TeacherReference(score_record(float(nats), int(tokens), int(chars), int(nbytes)), max_sequences)

    @property
    def top_k(self) -> int:
        return self.info.top_k

    @property
    def hidden_layers(self) -> list[int]:
        return self.info.hidden_layers

    @property
    def seq_len(self) -> int:
        return self.info.seq_len
