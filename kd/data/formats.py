"""Data formats: how a document read from a source (kd/data/sources.py) becomes what a split's packer takes, as
entries of one ingest path (kd/data/ingest.py `process_unit`). A new format is one DataFormat in FORMATS plus its
tests (tests/test_ingest.py enumerates FORMATS).

  text  a document is its text: the train/eval hash is taken of it, empty ones are counted and skipped, batches are
        tokenized in a background thread, and documents are packed end to end with a separator (kd.data.pack.Packer)
  chat  a document is a conversation (data.format=chat): the hash is taken of its canonical JSON, it is rendered and
        masked with its template as it is read (kd.data.chat.render), one that keeps nothing for the loss is dropped,
        and it is packed whole (kd.data.pack.ChatPacker)
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from kd.data.chat import BadConversation, render
from kd.data.pack import MIN_WINDOW_TOKENS, PIECE_CHARS, ChatPacker, Packer, document_pieces, tokenize
from kd.data.sources import NUL_IN_TEXT, BadRecord


@dataclass(frozen=True)
class DocumentPiece:
    """Characters [start, end) of a text document longer than kd.data.pack.PIECE_CHARS, which is tokenized piece
    by piece (its own payload in the batches) and packed as the one document it is."""

    document: str
    start: int
    end: int

    @property
    def text(self) -> str:
        return self.document[self.start : self.end]

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == len(self.document)


class DataFormat:
    """One format's steps of the ingest, in the order process_unit takes them: `is_empty` (counted and skipped
    before anything else), `split_key` (what the train/eval hash is taken of), `prepare` (the payload a batch
    carries; None to drop the document, a BadRecord for one that cannot be used), `tokenize` (a batch of payloads ->
    a Future of (ids per document, per-document extras or None)), `add` (one document into its split's packer),
    and the counts a unit records (`unit_counts`). `spec` is the run's kd.data.ingest.IngestSpec. A payload may be
    tokenized in pieces (`pieces`: DocumentPiece payloads in its place), each then going through `size`,
    `tokenize` and `add` as a payload of its own."""

    name = ""

    def packer(self, spec):
        raise NotImplementedError

    def is_empty(self, document) -> bool:
        return False

    def split_key(self, document) -> str:
        raise NotImplementedError

    def prepare(self, document, where: str, spec, tokenizer):
        raise NotImplementedError

    def pieces(self, payload) -> list:
        """The payloads one document is tokenized as: itself, or its DocumentPieces."""
        return [payload]

    def size(self, payload) -> int:
        """Characters of a payload: the batch's size and the unit's statistics."""
        raise NotImplementedError

    def tokenize(self, pool: ThreadPoolExecutor, tokenizer, payloads: list, spec) -> Future:
        raise NotImplementedError

    def add(self, packer, ids: list[int], extra, payload, spec) -> None:
        raise NotImplementedError

    def unit_counts(self, packers: dict, dropped: int) -> dict:
        return {}


class Text(DataFormat):
    name = "text"

    def packer(self, spec):
        return Packer(spec.seq_len, spec.sep_id, spec.pad_id, spec.store_text, spec.sep_text)

    def is_empty(self, document) -> bool:
        return not document.strip()

    def split_key(self, document) -> str:
        return document

    def prepare(self, document, where, spec, tokenizer):
        if spec.store_text and "\x00" in document:  # a .txt document (records are checked as they are read)
            line = document.count("\n", 0, document.index("\x00")) + 1
            return BadRecord(f"{where}, line {line}: {NUL_IN_TEXT}")
        return document

    def pieces(self, payload) -> list:
        # a long document in pieces: the tokenizer's memory grows with the text of one call (kd.data.pack)
        if len(payload) <= PIECE_CHARS:
            return [payload]
        return [DocumentPiece(payload, a, b) for a, b in document_pieces(payload, PIECE_CHARS)]

    def size(self, payload) -> int:
        return len(payload) if isinstance(payload, str) else payload.end - payload.start

    def tokenize(self, pool, tokenizer, payloads, spec) -> Future:
        # the tokenizer (Rust, GIL released, on all cores) works on this batch while the ingest packs the last one
        texts = [p if isinstance(p, str) else p.text for p in payloads]
        return pool.submit(tokenize, tokenizer, texts, len(texts), spec.store_text)

    def add(self, packer, ids, extra, payload, spec) -> None:
        # extra: the document's character offsets when the text is kept (cross-tokenizer students align on them)
        if isinstance(payload, str):
            packer.add(ids, extra, payload if spec.store_text else None)
            return
        text = payload.document if spec.store_text else None
        packer.add(ids, extra, text, start=payload.start, first=payload.first, last=payload.last)


class Chat(DataFormat):
    name = "chat"

    def packer(self, spec):
        return ChatPacker(spec.seq_len, spec.pad_id, spec.chat["packing"], spec.store_text)

    def split_key(self, document) -> str:
        return json.dumps(document, ensure_ascii=False, sort_keys=True)

    def prepare(self, document, where, spec, tokenizer):
        try:
            rendered = render(tokenizer, document, spec.chat["template"], spec.chat["loss_mask"], spec.store_text)
        except BadConversation as e:
            return BadRecord(f"{where}: {e}")
        if len(rendered.input_ids) < MIN_WINDOW_TOKENS or not any(rendered.mask[1 : spec.seq_len]):
            return None  # nothing the loss counts survives the cut to seq_len (a target is token 1 on)
        record = None
        if spec.store_text:  # what a student with another tokenizer is aligned on (kd/align.py)
            record = {
                "turns": document,
                "text": rendered.text,
                "offsets": rendered.offsets,
                "contents": rendered.contents,
            }
        return rendered, record

    def size(self, payload) -> int:
        return len(payload[0].text)

    def tokenize(self, pool, tokenizer, payloads, spec) -> Future:
        # conversations arrive rendered and tokenized: their batch is ready at once
        done = Future()
        done.set_result(([r.input_ids for r, _ in payloads], [(r.mask, record) for r, record in payloads]))
        return done

    def add(self, packer, ids, extra, payload, spec) -> None:
        packer.add(ids, *extra)  # extra: (the loss mask, the conversation's text record or None)

    def unit_counts(self, packers, dropped) -> dict:
        # conversations cut to seq_len (tokens lost), dropped (nothing left in the loss), tokens of the windows
        return {
            "chat": {
                "truncated": sum(p.truncated for p in packers.values()),
                "tokens_cut": sum(p.tokens_cut for p in packers.values()),
                "dropped": dropped,
                "window_tokens": sum(p.window_tokens for p in packers.values()),
            }
        }


FORMATS: dict[str, DataFormat] = {f.name: f for f in (Text(), Chat())}
