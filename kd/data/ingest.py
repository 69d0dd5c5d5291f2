"""The ingest stage: documents -> per-document train/eval split -> tokenized, packed windows on disk, unit by unit.

Every process runs `run_ingest` together. Units (kd/data/sources.py) are taken in order, in ROUNDS of one unit per
process: in a round, process r tokenizes and packs the r-th unit into `DIR/ingest/<unit>.h5` (written under a
temporary name, fsynced, renamed), then all processes exchange per-unit window counts (one small all-gather). So:
- no process reads or tokenizes more than its own units, and memory is one tokenizer batch plus less than one
  window of pending tokens per split: nothing grows with the corpus;
- the caps stop reading early: a unit stops tokenizing a split once it alone holds `max_*_sequences` windows of
  it, and once the units before a round hold the cap, later units skip that split (and a source that feeds only
  that split is not read at all);
- the window sequence of a split is the units' windows in unit order, so it never depends on the number of
  processes, and a resume re-uses every finished unit file (its input's size and mtime re-checked) and
  re-tokenizes only the rest.

The split is decided per document, from a keyed hash of its text: document -> eval iff
blake2b(text, key = split_seed) / 2^64 < eval_fraction. No global view (no permutation of all documents) is
needed, and identical documents always land on the same side. An explicit held-out source (`data.eval_files`,
`data.eval_dataset_split`) instead makes every main document a training document.

Chat (data.format=chat): a document is a conversation, split by the same hash of its canonical JSON, rendered and
masked (kd/data/chat.py) as it is read, and packed whole (kd.data.pack.ChatPacker); the unit files then also hold
each token's loss_mask and segment. A conversation the template rejects is a bad record (data.bad_records).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd.data.chat import ChatFields
from kd.data.formats import FORMATS, DocumentPiece
from kd.data.pack import Windows
from kd.data.sources import BadRecord, Records, Unit, unit_documents
from kd.dist import gather_rows
from kd.errors import KDError
from kd.io import disk_error, h5_image, h5_in_memory, json_sha256, write_bytes_durable

INGEST_DIR = "ingest"
# Every document goes to one of these splits (document_split); the cache keeps them apart, shard by shard.
SPLITS = ("train", "eval")
UNIT_FORMAT = "kd-ingest-unit"
UNIT_FORMAT_VERSION = 1
# One tokenizer call per this many documents or characters, whichever comes first: large enough for the Rust
# tokenizer to spread a batch over cores, small enough to bound memory (a few MB of text and its tokens).
BATCH_DOCUMENTS = 512
BATCH_CHARS = 2_000_000
# chat: conversations cut to seq_len, the tokens cut, conversations dropped (nothing left in the loss), the tokens
# of the windows written (their padding is the rest)
CHAT_COUNTS = ("truncated", "tokens_cut", "dropped", "window_tokens")


@dataclass
class IngestSpec:
    """What the windows depend on (its hash names the ingest; any change invalidates finished units)."""

    seq_len: int
    sep_id: int
    pad_id: int
    sep_text: str
    store_text: bool
    text_field: str
    decode_errors: str
    bad_records: str  # error | skip (data.bad_records)
    eval_fraction: float
    split_seed: int
    caps: dict  # split -> max windows or None
    vocab_size: int
    tokenizer_fingerprint: str
    unit_bytes: int
    # data.format=chat: {fields: [messages, prompt, completion], loss_mask, packing, template (the Jinja text, or
    # None for the tokenizer's own)}; None for text
    chat: dict | None = None

    def content_hash(self) -> str:
        d = {k: v for k, v in self.__dict__.items() if not (k == "chat" and v is None)}  # text: hashes as before
        return json_sha256(d)

    @property
    def format(self) -> str:
        """The data format's name (kd/data/formats.py): chat when the chat settings are given."""
        return "text" if self.chat is None else "chat"

    @property
    def records(self) -> Records:
        chat = None if self.chat is None else ChatFields(*self.chat["fields"])
        return Records(self.text_field, chat, refuse_nul=self.store_text)


def document_split(text: str, seed: int, eval_fraction: float) -> str:
    """'eval' iff the keyed hash of the document's text falls below eval_fraction (see the module docstring)."""
    key = seed.to_bytes(8, "little", signed=True)
    h = int.from_bytes(
        hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=key).digest(), "little"
    )
    return "eval" if h < eval_fraction * 2.0**64 else "train"


def windows_fingerprint(input_ids: np.ndarray, lengths: np.ndarray) -> str:
    """sha256 of a run of windows (ids as int64, then lengths): what the teacher saw."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(input_ids, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(lengths, dtype=np.int64).tobytes())
    return h.hexdigest()


# ---- one unit's window file --------------------------------------------------------------------------------------


class UnitWriter:
    """Collects windows per split in an in-memory HDF5 file (kd.io.h5_in_memory: a full disk then fails one plain
    write, cleanly); `commit` adds the metadata and writes DIR/ingest/<unit>.h5.tmp-PID, fsyncs and renames."""

    def __init__(self, path: Path, spec: IngestSpec):
        import h5py

        self.path, self.spec = path, spec
        self.tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        self.f = h5_in_memory(str(self.tmp))
        T = spec.seq_len
        for split in SPLITS:
            g = self.f.create_group(split)
            g.create_dataset("input_ids", (0, T), np.int32, maxshape=(None, T), chunks=(64, T))
            g.create_dataset("lengths", (0,), np.int32, maxshape=(None,), chunks=(4096,))
            g.create_dataset("doc_starts", (0,), np.int32, maxshape=(None,), chunks=(4096,))
            if spec.store_text:
                g.create_dataset("text", (0,), h5py.string_dtype("utf-8"), maxshape=(None,), chunks=(256,))
                g.create_dataset("token_spans", (0, T, 2), np.int32, maxshape=(None, T, 2), chunks=(64, T, 2))
            if spec.chat is not None:
                g.create_dataset("loss_mask", (0, T), np.uint8, maxshape=(None, T), chunks=(64, T))
                g.create_dataset("segments", (0, T), np.uint16, maxshape=(None, T), chunks=(64, T))

    def append(self, split: str, w: Windows) -> None:
        if not len(w):
            return
        g = self.f[split]
        n0, n = g["lengths"].shape[0], len(w)
        fields = {"input_ids": w.input_ids, "lengths": w.lengths, "doc_starts": w.doc_starts}
        if self.spec.store_text:
            fields.update(text=np.array(w.texts, dtype=object), token_spans=w.spans)
        if self.spec.chat is not None:
            fields.update(loss_mask=w.loss_mask, segments=w.segments)
        try:
            for name, arr in fields.items():
                g[name].resize(n0 + n, axis=0)
                g[name][n0 : n0 + n] = arr
        except (OSError, RuntimeError) as e:  # in memory: out of memory, or a bug
            raise KDError(f"building ingest unit {self.path.name} failed ({e})") from None

    def commit(self, meta: dict) -> dict:
        try:
            self.f.attrs["kd_meta"] = json.dumps(meta, sort_keys=True)
            write_bytes_durable(self.tmp, h5_image(self.f))
            os.replace(self.tmp, self.path)
        except KDError as e:
            raise KDError(f"{e} (finished units are kept)") from None
        except OSError as e:
            self.tmp.unlink(missing_ok=True)
            raise KDError(f"finishing {self.path} failed: {disk_error(e)} (finished units are kept)") from None
        return meta

    def abort(self) -> None:
        try:
            if self.f.id.valid:
                self.f.close()
        except (OSError, RuntimeError):
            pass  # an in-memory file: nothing to flush
        self.tmp.unlink(missing_ok=True)


def finished_unit(path: Path, config_hash: str, input_state: str | None) -> dict | None:
    """The metadata of a finished unit file made by this ingest config from unchanged input, else None (redo it)."""
    import h5py

    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            meta = json.loads(f.attrs["kd_meta"])
    except (OSError, KeyError, json.JSONDecodeError):
        return None
    if meta.get("format") != UNIT_FORMAT or meta.get("config_hash") != config_hash:
        return None
    if input_state is not None and meta.get("input") != input_state:
        return None  # the files it was read from changed since: re-read them
    return meta


def process_unit(
    unit: Unit,
    spec: IngestSpec,
    tokenizer,
    skip: dict,
    forced_split: str | None,
    path: Path,
    progress: Callable[[int, int], None],
) -> dict:
    """Tokenize and pack one unit into `path`; returns its metadata (window counts per split, document counts).
    `skip[split]` is true when earlier units already hold that split's cap: its documents are not tokenized.
    What a document is and how it is packed is its format's (kd/data/formats.py)."""
    fmt = FORMATS[spec.format]
    packers = {s: fmt.packer(spec) for s in SPLITS}
    stopped = dict(skip)
    docs = {s: 0 for s in SPLITS}
    tokens = {s: 0 for s in SPLITS}
    empty, chars, bad, dropped, long_documents = 0, 0, 0, 0, 0
    examples = {"empty": [], "bad": []}  # the first few, for the summary: which files (records) they were
    writer = UnitWriter(path, spec)

    def pack_batch(batch: list[tuple[str, object]], tokenized) -> None:
        ids, extra = tokenized.result()
        added, added_docs = {s: 0 for s in SPLITS}, 0
        for i, (split, payload) in enumerate(batch):
            toks = ids[i]
            piece = isinstance(payload, DocumentPiece)  # a piece without tokens may still end its document
            if stopped[split] or not (toks or piece):  # a split may have reached its cap since the batch was read
                continue
            fmt.add(packers[split], toks, extra[i] if extra is not None else None, payload, spec)
            begins = not piece or payload.first
            docs[split] += begins
            tokens[split] += len(toks)
            added[split] += len(toks)
            added_docs += begins
        for split in SPLITS:
            if added[split]:
                windows = packers[split].take()
                if len(windows) and int(windows.input_ids.max()) >= spec.vocab_size:
                    raise KDError(
                        f"the tokenizer produced id {int(windows.input_ids.max())} >= the teacher's vocab_size "
                        f"({spec.vocab_size}): tokenizer and model do not belong together"
                    )
                writer.append(split, windows)
                cap = spec.caps[split]
                if cap is not None and packers[split].windows_emitted >= cap:
                    stopped[split] = True  # this unit alone holds the cap: later windows are never used
        progress(added_docs, sum(added.values()))

    def bad_record(message: str) -> None:
        nonlocal bad
        if spec.bad_records == "error":
            raise KDError(f"{message}; fix the record, or set data.bad_records=skip to skip and count such records")
        bad += 1
        examples["bad"] += [message][: 3 - len(examples["bad"])]

    # A two-stage pipeline: a batch is tokenized (the text format: in a background thread, by the Rust tokenizer
    # on all cores) while this thread packs and writes the batch before it and reads the next documents. Packing
    # order, and so the windows, are those of the sequential loop.
    documents = unit_documents(unit, spec.records, spec.decode_errors)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kd-tokenize")
    pending = None

    def submit(batch: list[tuple[str, object]]) -> None:
        """Start tokenizing `batch`, then pack the batch before it while that runs."""
        nonlocal pending
        submitted = (batch, fmt.tokenize(pool, tokenizer, [payload for _, payload in batch], spec))
        if pending is not None:
            pack_batch(*pending)
        pending = submitted

    try:
        batch: list[tuple[str, object]] = []
        batch_chars = 0
        for document, where in documents:
            if isinstance(document, BadRecord):
                bad_record(document.message)
                continue
            if fmt.is_empty(document):
                empty += 1
                examples["empty"] += [where][: 3 - len(examples["empty"])]
                continue
            split = forced_split or document_split(fmt.split_key(document), spec.split_seed, spec.eval_fraction)
            if stopped[split]:
                if all(stopped.values()):
                    break
                continue
            payload = fmt.prepare(document, where, spec, tokenizer)
            if isinstance(payload, BadRecord):
                bad_record(payload.message)
                continue
            if payload is None:
                dropped += 1
                continue
            pieces = fmt.pieces(payload)
            long_documents += len(pieces) > 1
            for piece in pieces:
                size = fmt.size(piece)
                batch.append((split, piece))
                chars += size
                batch_chars += size
                if len(batch) >= BATCH_DOCUMENTS or batch_chars >= BATCH_CHARS:
                    submit(batch)
                    batch, batch_chars = [], 0
        if batch:
            submit(batch)
        if pending is not None:
            pack_batch(*pending)
        for split in SPLITS:
            if not stopped[split]:
                writer.append(split, packers[split].take(final=True))
        if unit.documents_fn is not None:  # a shared stream (Hugging Face) must be consumed to the unit's end
            for _ in documents:
                pass
        meta = {
            "format": UNIT_FORMAT,
            "format_version": UNIT_FORMAT_VERSION,
            "config_hash": spec.content_hash(),
            "unit": unit.name,
            "input": unit.input_state(),
            "windows": {s: packers[s].windows_emitted for s in SPLITS},
            "documents": docs,
            "tokens": tokens,
            "skipped": {s: bool(skip[s]) for s in SPLITS},
            "empty_documents": empty,
            "bad_records": bad,
            "long_documents": long_documents,
            "examples": examples,
            "chars": chars,
            **fmt.unit_counts(packers, dropped),
        }
        return writer.commit(meta)
    except BaseException:
        writer.abort()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---- the whole stage ---------------------------------------------------------------------------------------------


class WindowIndex:
    """The windows of each split, in order, across unit files, capped. `read(split, a, b)` returns windows [a, b)."""

    def __init__(self, directory: Path, units: list[tuple[str, dict]], caps: dict):
        self.dir = directory
        self.entries = {s: [(name, meta["windows"][s]) for name, meta in units if meta["windows"][s]] for s in SPLITS}
        self.starts = {s: np.cumsum([0] + [n for _, n in self.entries[s]]) for s in SPLITS}
        self.num_sequences = {
            s: int(self.starts[s][-1]) if caps[s] is None else min(int(self.starts[s][-1]), caps[s]) for s in SPLITS
        }

    def read(self, split: str, a: int, b: int, fields: Iterable[str]) -> dict:
        import h5py

        if not 0 <= a <= b <= self.num_sequences[split]:
            raise IndexError(f"windows [{a}, {b}) of {split} ({self.num_sequences[split]})")
        starts, parts = self.starts[split], {f: [] for f in fields}
        u = int(np.searchsorted(starts, a, side="right") - 1)
        pos = a
        while pos < b:
            name, n = self.entries[split][u]
            lo, hi = pos - int(starts[u]), min(b, int(starts[u]) + n) - int(starts[u])
            with h5py.File(self.dir / f"{name}.h5", "r") as f:
                for field in fields:
                    parts[field].append(f[split][field][lo:hi])
            pos += hi - lo
            u += 1
        out = {}
        for field, arrs in parts.items():
            if field == "text":
                out[field] = [t.decode("utf-8") if isinstance(t, bytes) else t for arr in arrs for t in arr]
            else:
                out[field] = np.concatenate(arrs)
        return out


def run_ingest(
    accelerator,
    sources: list[tuple[Iterable[Unit], str | None]],
    spec: IngestSpec,
    tokenizer,
    out: Path,
    progress: Callable[[int, int], None],
    on_unit: Callable[[Unit], None],
    log: Callable[[str], None],
) -> tuple[WindowIndex, dict]:
    """Ingest every source (units, forced split or None) on all processes; returns the window index and totals.
    A failure on one process (bad input) stops every process at the end of the round with one error."""
    rank, world = accelerator.process_index, accelerator.num_processes
    directory = out / INGEST_DIR
    config_hash = spec.content_hash()
    totals = {s: 0 for s in SPLITS}
    finished: list[tuple[str, dict]] = []  # (unit name, metadata) in unit order, every unit of every process
    stats = {
        "units": 0,
        "reused": 0,
        "documents": 0,
        "split_documents": {s: 0 for s in SPLITS},
        "empty_documents": 0,
        "bad_records": 0,
        "long_documents": 0,
        "tokens": 0,
        "chars": 0,
        **{k: 0 for k in CHAT_COUNTS},
    }
    t0, named_empty = time.time(), False
    for source_code, (units, forced) in enumerate(sources):
        it = iter(units)
        exhausted = False
        while not exhausted:
            skip = {s: spec.caps[s] is not None and totals[s] >= spec.caps[s] for s in SPLITS}
            needed = [forced] if forced else list(SPLITS)
            if all(skip[s] for s in needed):
                break  # nothing this source could add is used: do not read the rest of it
            round_units: list[Unit] = []
            for _ in range(world):
                u = next(it, None)
                if u is None:
                    exhausted = True
                    break
                round_units.append(u)
            if not round_units:
                break
            row = [source_code, -1] + [0] * (10 + len(CHAT_COUNTS))
            error = None
            try:
                for k, unit in enumerate(round_units):
                    if k != rank:
                        unit.skip_stream()  # another process's unit
                        continue
                    path = directory / f"{unit.name}.h5"
                    meta = finished_unit(path, config_hash, unit.input_state())
                    reused = meta is not None
                    if reused:
                        unit.skip_stream()
                    else:
                        if unit.documents_fn is None and path.exists():
                            log(f"[ingest] {unit.name}: its input changed or its file is not this config's: re-reading")
                        meta = process_unit(unit, spec, tokenizer, skip, forced, path, progress)
                    on_unit(unit)
                    row = [
                        source_code,
                        unit.index,
                        meta["windows"]["train"],
                        meta["windows"]["eval"],
                        meta["documents"]["train"],
                        meta["documents"]["eval"],
                        meta["empty_documents"],
                        sum(meta["tokens"].values()),
                        meta["chars"],
                        meta.get("bad_records", 0),
                        meta.get("long_documents", 0),
                        *(meta.get("chat", {}).get(k, 0) for k in CHAT_COUNTS),
                        2 if reused else 1,
                    ]
                    examples = meta.get("examples", {})
                    if examples.get("bad"):
                        log(
                            f"[ingest] {unit.name}: {meta['bad_records']} record(s) without usable text skipped "
                            f"(data.bad_records=skip), e.g. {examples['bad'][0]}"
                        )
                    if examples.get("empty") and not named_empty:  # once per process: name a few
                        named_empty = True
                        log(f"[ingest] empty documents skipped, e.g. {', '.join(examples['empty'])}")
            except KDError as e:
                error = e
                row[-1] = -1
            rows = gather_rows(accelerator, row)
            if (rows[:, -1] < 0).any():
                if error is not None:
                    raise error
                bad = int(np.nonzero(rows[:, -1] < 0)[0][0])
                raise KDError(f"ingest failed on process {bad} (its error is printed above)")
            for r in rows[rows[:, 1] >= 0]:
                name = f"{['main', 'eval'][source_code]}-{int(r[1]):06d}"
                meta = {
                    "windows": {"train": int(r[2]), "eval": int(r[3])},
                    "documents": {"train": int(r[4]), "eval": int(r[5])},
                }
                finished.append((name, meta))
                for s in SPLITS:
                    totals[s] += meta["windows"][s]
                stats["units"] += 1
                stats["reused"] += int(r[-1] == 2)
                for k, v in zip(CHAT_COUNTS, r[11:-1]):
                    stats[k] += int(v)
                stats["bad_records"] += int(r[9])
                stats["long_documents"] += int(r[10])
                stats["documents"] += int(r[4] + r[5])
                for s, n in zip(SPLITS, (r[4], r[5])):
                    stats["split_documents"][s] += int(n)
                stats["empty_documents"] += int(r[6])
                stats["tokens"] += int(r[7])
                stats["chars"] += int(r[8])
    stats["seconds"] = time.time() - t0
    return WindowIndex(directory, finished, spec.caps), stats
