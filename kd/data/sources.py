"""Documents in: local files of any size and count, or a Hugging Face dataset, read as a stream of UNITS.

A unit is a piece of the corpus that is tokenized and packed on its own, by one process, into one window file: the
unit of parallel work, of resume and of progress. Unit boundaries depend only on the data and `data.unit_bytes`,
never on the number of processes, which is what makes an N-process cache equal the one-process cache.

Local files: the files (sorted per pattern, patterns in order) are laid end to end in one virtual byte space, cut
every `unit_bytes` bytes. An uncompressed JSON-lines file is cut at those points (a record belongs to the unit that
holds its first byte; a reader seeks to its range and never reads another unit's bytes); any other file (a .txt
document, compressed files, CSV, JSON arrays, Parquet) belongs whole to the unit that holds its first byte. So
100,000 small files share a few units, and a 50 GB .jsonl is read by many processes at once, each reading only
its own byte ranges. Planning needs one `stat` per file, nothing else.

Hugging Face datasets (a hub name, a local data folder, or a `save_to_disk` folder), streamed or memory-mapped:
units are runs of consecutive documents holding at least `unit_bytes` characters. Such a stream can only be read
in order, so every process iterates it and tokenizes only its own units (say so to users: use local files to
spread the reading too). Streaming and non-streaming reads give the same documents, so the same cache.

Each document is (text, where): `where` names the file and line for error messages. A record that holds no usable
text (not a JSON object, no text field, a non-string value, not valid JSON) is yielded as a `BadRecord` in place of
its text, so that one place (kd/data/ingest.py) applies `data.bad_records`: refuse naming it, or skip and count.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from kd.data.chat import BadConversation, ChatFields, conversation
from kd.errors import KDError
from kd.paths import resolve_path

COMPRESSIONS = ("", ".gz", ".zst")


class BadRecord:
    """Stands in for the text of a record that has none usable; `message` names the file and line (or record)."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


def file_format(path: str) -> tuple[str, str]:
    """(format, compression) of a data file from its name, e.g. 'a.jsonl.zst' -> ('.jsonl', '.zst')."""
    name = path.lower()
    comp = next((c for c in COMPRESSIONS[1:] if name.endswith(c)), "")
    base = name[: len(name) - len(comp)] if comp else name
    fmt = os.path.splitext(base)[1]
    if fmt not in READERS or (comp and not READERS[fmt].compressible):
        raise KDError(
            f"unsupported data file {path}: use {', '.join(READERS)} (text formats optionally compressed "
            "as .gz or .zst)"
        )
    return fmt, comp


def expand_files(patterns: list[str], what: str = "data.files") -> list[str]:
    """Every pattern's matches, sorted per pattern, in pattern order; each file once."""
    files: list[str] = []
    for pattern in patterns:
        path = resolve_path(pattern)
        matches = sorted(glob.glob(path)) if glob.has_magic(path) else ([path] if os.path.exists(path) else [])
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise KDError(
                f"{what}: file(s) not found: {pattern}" + (f" (resolved to {path})" if path != pattern else "")
            )
        files.extend(m for m in matches if m not in files)
    for f in files:
        file_format(f)
    return files


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of one file (a whole non-splittable file has start 0, end = its size)."""

    path: str
    start: int
    end: int


@dataclass
class Unit:
    """One unit of ingest work. `source` is 'main' or 'eval' (an explicit held-out source); `index` is its position
    in its source's unit sequence (units of a source may be numbered with gaps: empty byte ranges have none)."""

    source: str
    index: int
    pieces: list[Piece] = field(default_factory=list)  # local files
    documents_fn: Callable[[], Iterator[tuple[str, str]]] | None = None  # Hugging Face streams

    @property
    def name(self) -> str:
        return f"{self.source}-{self.index:06d}"

    def input_state(self) -> str | None:
        """A digest of what the unit was read from (path, byte range, size, mtime of each piece), to tell on resume
        whether a finished unit's input changed since. A digest, not the list: a unit may hold 100,000 small files.
        None for a dataset stream (nothing to stat)."""
        if not self.pieces:
            return None
        h = hashlib.sha256()
        for p in self.pieces:
            st = os.stat(p.path)
            h.update(json.dumps([p.path, p.start, p.end, st.st_size, st.st_mtime_ns]).encode())
        return h.hexdigest()

    def skip_stream(self) -> None:
        """Read past this unit's documents without using them: a dataset stream is shared by the units in order, so
        a process that does not tokenize a unit must still consume it. Local file units need nothing."""
        if self.documents_fn is not None:
            for _ in self.documents_fn():
                pass


def plan_file_units(files: list[str], unit_bytes: int, source: str) -> list[Unit]:
    """Cut the files' virtual byte space every `unit_bytes` bytes (see the module docstring)."""
    units: dict[int, Unit] = {}
    offset = 0
    for path in files:
        size = os.path.getsize(path)
        if size == 0:  # read as one empty document, so that it is counted and named, never silently dropped
            units.setdefault(offset // unit_bytes, Unit(source, offset // unit_bytes)).pieces.append(Piece(path, 0, 0))
            continue
        fmt, comp = file_format(path)
        if READERS[fmt].splittable and not comp:
            for u in range(offset // unit_bytes, (offset + size - 1) // unit_bytes + 1):
                a, b = max(u * unit_bytes - offset, 0), min((u + 1) * unit_bytes - offset, size)
                units.setdefault(u, Unit(source, u)).pieces.append(Piece(path, a, b))
        else:
            u = offset // unit_bytes
            units.setdefault(u, Unit(source, u)).pieces.append(Piece(path, 0, size))
        offset += size
    return [units[u] for u in sorted(units)]


# ---- reading one piece --------------------------------------------------------------------------------------


def _decode(raw: bytes, errors: str, path: str, line_of: Callable[[int], int]) -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise KDError(
            f"{path}, line {line_of(e.start)}: invalid UTF-8 (byte 0x{raw[e.start]:02x}); fix or re-encode "
            "the file (e.g. `iconv -f latin1 -t utf-8`), or set data.decode_errors=replace to read invalid "
            "bytes as U+FFFD"
        ) from None


def _line_number(path: str, byte_offset: int) -> int:
    """1-based line number of a byte offset: counted only when an error needs it."""
    with _open_binary(path) as f:
        n, left = 1, byte_offset
        while left > 0 and (chunk := f.read(min(left, 1 << 20))):
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


def _open_binary(path: str):
    comp = file_format(path)[1]
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp == ".zst":
        try:
            import zstandard
        except ImportError:
            raise KDError(
                f"reading {path} needs the zstandard package: pip install zstandard (or pip install -e '.[zstd]')"
            ) from None
        return io.BufferedReader(_CheckedZstd(path, zstandard.ZstdDecompressor()), 1 << 20)
    return open(path, "rb")


class _CheckedZstd(io.RawIOBase):
    """A zstd file's decompressed bytes, frame after frame, raising EOFError if the file ends inside a frame:
    zstandard's own stream reader returns a silent end there, so a truncated file read as fewer documents, or
    none. (gzip raises EOFError itself.)"""

    def __init__(self, path: str, decompressor):
        self.file, self.decompressor = open(path, "rb"), decompressor
        self.frame, self.pending, self.started = decompressor.decompressobj(), b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.pending:
            chunk = self.file.read(1 << 20)
            if not chunk:
                if self.started and not self.frame.eof:
                    raise EOFError("the compressed stream ends inside a frame")
                return 0
            self.started = True
            out = self.frame.decompress(chunk)
            while self.frame.eof and self.frame.unused_data:  # the next frame of a multi-frame file
                rest, self.frame = self.frame.unused_data, self.decompressor.decompressobj()
                out += self.frame.decompress(rest)
            self.pending = out
        n = min(len(b), len(self.pending))
        b[:n], self.pending = self.pending[:n], self.pending[n:]
        return n

    def close(self) -> None:
        self.file.close()
        super().close()


# HDF5's variable-length strings end at a NUL: the stored text (cache.store_text) cannot hold one
NUL_IN_TEXT = (
    "the text holds a NUL character (\\x00), which the cache's stored text cannot hold (or set cache.store_text=false)"
)


@dataclass(frozen=True)
class Records:
    """What a document is read as from a record: its text (`text_field`), or with `chat` (kd.data.chat.ChatFields)
    its conversation, a checked list of {role, content} turns (kd.data.chat.conversation)."""

    text_field: str = "text"
    chat: ChatFields | None = None
    refuse_nul: bool = False  # the text is stored (cache.store_text): a NUL in it is a bad record

    @property
    def columns(self) -> list[str]:
        """The fields (columns) a record is read from."""
        if self.chat is None:
            return [self.text_field]
        return [self.chat.messages, self.chat.prompt, self.chat.completion]

    def take(self, record, where: Callable[[], str]):
        """The record's document ('' for a null text; the turns of a conversation), or a BadRecord. `where` is
        called only for a message: counting lines is costly in a unit that starts mid-file."""
        document = self.document(record, where)
        if self.refuse_nul and not isinstance(document, BadRecord) and "\x00" in str(document):
            return BadRecord(f"{where()}: {NUL_IN_TEXT}")
        return document

    def document(self, record, where: Callable[[], str]):
        if self.chat is not None:
            try:
                return conversation(record, self.chat)
            except BadConversation as e:
                return BadRecord(f"{where()}: {e}")
        if not isinstance(record, dict):
            return BadRecord(
                f"{where()}: a record must be a JSON object with field '{self.text_field}', got {type(record).__name__}"
            )
        if self.text_field not in record:
            return BadRecord(
                f"{where()}: text field '{self.text_field}' is not in the record (its fields: "
                f"{sorted(record)[:10]}); set data.text_field if it is another"
            )
        return _text_value(record[self.text_field], self.text_field, where)


def _text_value(value, text_field: str, where: Callable[[], str]) -> str | BadRecord:
    if value is not None and not isinstance(value, str):
        return BadRecord(f"{where()}: field '{text_field}' holds {type(value).__name__} {str(value)[:40]!r}, not text")
    return value or ""


def data_records(data) -> Records:
    """The Records a DataConfig reads: its text field, or with data.format=chat its conversation fields."""
    if data.format != "chat":
        return Records(data.text_field)
    return Records(data.text_field, ChatFields(data.messages_field, data.prompt_field, data.completion_field))


def document_chars(doc) -> int:
    """Characters of a document as read: its text, or a conversation's contents (0 for a BadRecord)."""
    if isinstance(doc, str):
        return len(doc)
    if isinstance(doc, list):
        return sum(len(t["content"]) for t in doc)
    return 0


def as_records(fields: str | Records) -> Records:
    """A text field name (the plain-text reading) or Records as they are."""
    return Records(fields) if isinstance(fields, str) else fields


def _json_lines(f, path: str, records: Records, errors: str, first_byte: int, end: int | None, first_line: int | None):
    """Records of a JSON-lines stream from `first_byte` until a record would start at or after `end`. Line numbers
    are counted when the stream starts at line `first_line`; a unit that starts mid-file counts them only for an
    error message."""
    pos, line_no = first_byte, first_line
    while end is None or pos < end:
        raw = f.readline()
        if not raw:
            break
        start, pos = pos, pos + len(raw)
        if raw.strip():

            def line_of(_offset: int = 0, start=start, line_no=line_no) -> int:
                return line_no if line_no is not None else _line_number(path, start)

            text = _decode(raw, errors, path, line_of)
            raw = None  # a long line is held once, not three times (bytes, text, record) while it is used
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                record = BadRecord(f"{path}, line {line_of()}: not valid JSON ({e.msg})")
            text = None
            if isinstance(record, BadRecord):
                yield record, path
            else:
                yield records.take(record, lambda: f"{path}, line {line_of()}"), path
            record = None
        if line_no is not None:
            line_no += 1


def _read_jsonl(piece: Piece, records: Records, errors: str, comp: str) -> Iterator[tuple[str, str]]:
    """One JSON record per line. Uncompressed, a piece is a byte range: it starts at the first record beginning in
    it (a record cut by the range's start belongs to the piece before) and ends with the record that crosses its
    end; compressed, the file is streamed whole."""
    path = piece.path
    if comp:
        with _open_binary(path) as f:
            head = f.read(1 << 16)  # through a raw stream, as _read_json does
            yield from _json_lines(io.BufferedReader(_Prefixed(head, f)), path, records, errors, 0, None, 1)
        return
    with open(path, "rb") as f:
        first, first_line = piece.start, (1 if piece.start == 0 else None)
        if piece.start > 0:
            f.seek(piece.start - 1)
            if f.read(1) != b"\n":  # mid-record: that record belongs to the previous unit
                first += len(f.readline())
        f.seek(first)
        yield from _json_lines(f, path, records, errors, first, piece.end, first_line)


def _read_json(piece: Piece, records: Records, errors: str, comp: str) -> Iterator[tuple[str, str]]:
    """One JSON array of records (read whole: use .jsonl for big data), or JSON lines under a .json name."""
    path = piece.path
    with _open_binary(path) as f:
        head = f.read(1 << 16)
        if head.lstrip()[:1] == b"[":
            raw = head + f.read()
            try:
                items = json.loads(_decode(raw, errors, path, lambda o: raw[:o].count(b"\n") + 1))
            except json.JSONDecodeError as e:
                raise KDError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
            for i, record in enumerate(items):
                yield records.take(record, lambda i=i: f"{path}, record {i + 1}"), path
        else:
            yield from _json_lines(io.BufferedReader(_Prefixed(head, f)), path, records, errors, 0, None, 1)


def _read_txt(piece: Piece, records: Records, errors: str, comp: str) -> Iterator[tuple[str, str]]:
    """One plain document per file."""
    path = piece.path
    with _open_binary(path) as f:
        if records.chat is not None:
            raise KDError(
                f"{path}: a .txt file is one plain document, not conversation records; give chat data as "
                ".jsonl/.json/.parquet records (or set data.format=text)"
            )
        raw = f.read()
    text = _decode(raw, errors, path, lambda o: raw[:o].count(b"\n") + 1)
    raw = None  # a large file's text is held once while it is used
    yield text, path


def _read_csv(piece: Piece, records: Records, errors: str, comp: str) -> Iterator[tuple[str, str]]:
    """A header row naming the columns, one record per row (chat: prompt/completion columns)."""
    path, text_field = piece.path, records.text_field
    with _open_binary(path) as f:
        text = io.TextIOWrapper(f, encoding="utf-8", errors=errors, newline="")
        reader = csv.DictReader(text)
        try:
            for row in reader:
                if records.chat is not None:  # prompt/completion columns
                    yield records.take(row, lambda n=reader.line_num: f"{path}, line {n}"), path
                    continue
                if text_field not in row:
                    raise KDError(
                        f"{path}: text field '{text_field}' is not a CSV column (columns: "
                        f"{reader.fieldnames}); set data.text_field"
                    )
                yield row[text_field] or "", path
        except UnicodeDecodeError:
            raise KDError(
                f"{path}, near line {reader.line_num + 1}: invalid UTF-8; fix or re-encode the file, or "
                "set data.decode_errors=replace"
            ) from None
        except csv.Error as e:
            raise KDError(f"{path}, line {reader.line_num}: not valid CSV ({e})") from None


def _read_parquet(piece: Piece, records: Records, errors: str, comp: str) -> Iterator[tuple[str, str]]:
    """Columnar records, read a batch of rows at a time and only the columns the records use."""
    import pyarrow.parquet as pq  # an optional dependency of this reader alone

    path, text_field = piece.path, records.text_field
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise KDError(f"{path}: not a readable Parquet file ({e})") from None
    columns = [c for c in records.columns if c in pf.schema_arrow.names]
    if records.chat is None and text_field not in columns:
        raise KDError(
            f"{path}: text field '{text_field}' is not a column (columns: {pf.schema_arrow.names}); set data.text_field"
        )
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        for record in batch.to_pylist():
            row += 1
            yield records.take(record, lambda r=row: f"{path}, row {r}"), path


@dataclass(frozen=True)
class FileReader:
    """How one kind of data file is read: `read(piece, records, errors, compression)` yields (the text, or a
    record's conversation, path) for every record of the piece, empty ones included. `compressible`: .gz/.zst
    versions are read (streamed through the decompressor). `splittable`: an uncompressed file may be cut into byte
    ranges read by different processes (plan_file_units); otherwise a file is one piece."""

    read: Callable[[Piece, Records, str, str], Iterator[tuple[str, str]]]
    compressible: bool = True
    splittable: bool = False


# The file readers by suffix: a new format is one entry here plus its tests (tests/test_config_and_data.py reads
# the same documents through every entry)
READERS: dict[str, FileReader] = {
    ".txt": FileReader(_read_txt),
    ".json": FileReader(_read_json),
    ".jsonl": FileReader(_read_jsonl, splittable=True),
    ".csv": FileReader(_read_csv),
    ".parquet": FileReader(_read_parquet, compressible=False),
}


def read_piece(piece: Piece, fields: str | Records, errors: str) -> Iterator[tuple[str, str]]:
    """The documents of one piece, in file order, as (text, path) (the text field's name, or Records: a
    conversation's turns in place of the text). Empty texts are yielded too (the caller counts and skips them),
    so every record is accounted for."""
    fmt, comp = file_format(piece.path)
    if piece.end == 0:  # an empty file (see plan_file_units)
        yield "", piece.path
        return
    try:
        yield from READERS[fmt].read(piece, as_records(fields), errors, comp)
    except EOFError as e:  # gzip's, and _CheckedZstd's: never fewer documents in silence
        raise KDError(
            f"{piece.path} ends early ({e}): a truncated or damaged compressed file. Replace it (or decompress "
            "what it holds), or remove it from the data"
        ) from None


class _Prefixed(io.RawIOBase):
    """A binary stream that first returns `head` (bytes already read to sniff the format), then the rest."""

    def __init__(self, head: bytes, rest):
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.rest.read(len(b))
        b[: len(data)] = data
        return len(data)


def unit_documents(unit: Unit, fields: str | Records, errors: str) -> Iterator[tuple[str, str]]:
    if unit.documents_fn is not None:
        return unit.documents_fn()
    return (doc for piece in unit.pieces for doc in read_piece(piece, fields, errors))


# ---- Hugging Face datasets -----------------------------------------------------------------------------------


def open_hf_dataset(name: str, config: str | None, split: str, streaming: bool, fields: str | Records):
    """A hub dataset, a local folder of data files, or a `save_to_disk` folder; streamed or memory-mapped."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    where = f"dataset '{name}' (config {config}, split {split})"
    try:
        local = resolve_path(name)
        if os.path.isdir(local) and (
            os.path.exists(os.path.join(local, "state.json"))
            or os.path.exists(os.path.join(local, "dataset_dict.json"))
        ):
            ds = datasets.load_from_disk(local)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
            if streaming:
                ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(
                local if os.path.isdir(local) else name, config, split=split, streaming=streaming
            )
    except KDError:
        raise
    except Exception as e:  # datasets raises many types for unreadable or unknown datasets
        raise KDError(f"could not load {where}: {e}") from None
    columns, records = ds.column_names, as_records(fields)
    if columns is not None and records.chat is None and records.text_field not in columns:
        raise KDError(
            f"text field '{records.text_field}' is not in {where}; its columns are {columns}. Set data.text_field"
        )
    if columns is not None and records.chat is not None and not set(records.columns) & set(columns):
        raise KDError(
            f"{where} has no conversation column ({', '.join(records.columns)}); its columns are {columns}. Set "
            "data.messages_field (or data.prompt_field and data.completion_field)"
        )
    return ds, where


def plan_hf_units(ds, where: str, fields: str | Records, unit_bytes: int, source: str) -> Iterator[Unit]:
    """Lazy units of consecutive documents holding >= unit_bytes characters. The stream is shared: a unit's
    documents must be consumed (processed or drained) before the next unit is asked for."""
    it = iter(ds)
    records = as_records(fields)
    state = {"pending": None, "record": 0}  # pending: a record read to learn that another unit exists

    def next_record():
        if state["pending"] is not None:
            rec, state["pending"] = state["pending"], None
            return rec
        return next(it, None)

    index = 0
    while True:
        first = next_record()
        if first is None:
            return
        state["pending"] = first

        def documents():
            chars = 0
            while chars < unit_bytes:
                rec = next_record()
                if rec is None:
                    return
                state["record"] += 1
                text = records.take(rec, lambda n=state["record"]: f"{where}, record {n}")
                chars += document_chars(text)
                yield text, where

        yield Unit(source, index, documents_fn=documents)
        index += 1


def config_sources(data) -> tuple[list[tuple[Iterable[Unit], str | None]], int | None]:
    """The sources a `DataConfig` names, each as (its units, the split all its documents go to or None for the
    per-document hash split), and the total input bytes when known (local files). Cheap: nothing is read yet."""
    if data.files:
        main_files = expand_files(data.files)
        total = sum(os.path.getsize(f) for f in main_files)
        if not data.eval_files:
            return [(plan_file_units(main_files, data.unit_bytes, "main"), None)], total
        eval_files = expand_files(data.eval_files, "data.eval_files")
        both = sorted(set(main_files) & set(eval_files))
        if both:
            raise KDError(
                f"{both[0]} is in both data.files and data.eval_files: a held-out file must not be trained on"
            )
        total += sum(os.path.getsize(f) for f in eval_files)
        return [
            (plan_file_units(main_files, data.unit_bytes, "main"), "train"),
            (plan_file_units(eval_files, data.unit_bytes, "eval"), "eval"),
        ], total
    records = data_records(data)
    ds, where = open_hf_dataset(data.dataset, data.dataset_config, data.dataset_split, data.streaming, records)
    sources = [
        (
            plan_hf_units(ds, where, records, data.unit_bytes, "main"),
            "train" if data.eval_dataset_split else None,
        )
    ]
    if data.eval_dataset_split:
        ev, ev_where = open_hf_dataset(
            data.dataset, data.dataset_config, data.eval_dataset_split, data.streaming, records
        )
        sources.append((plan_hf_units(ev, ev_where, records, data.unit_bytes, "eval"), "eval"))
    return sources, None
