"""Tokenize documents in batches and pack them on the fly into fixed-length windows.

Documents are joined with a separator token (after every document) and the stream is cut into `seq_len` windows.
The packer holds only the tokens not yet emitted (less than one window plus the current batch), never the corpus.
`finish()` emits the last, partial window when it has at least 2 tokens (one input and one target); it is padded
and its valid length recorded, so no text is silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kd.errors import KDError

MIN_WINDOW_TOKENS = 2  # a window needs one input and one target token


def tokenize(tokenizer, texts: list[str], batch: int = 256,
             offsets: bool = False) -> tuple[list[list[int]], list[np.ndarray] | None]:
    """Token ids per text and, with `offsets`, their [n, 2] character offsets (else None). One batched call of the
    fast tokenizer per `batch` texts (its Rust core parallelises a batch over cores). Offsets need a fast
    (`tokenizers`-backed) tokenizer; a slow one is refused."""
    if offsets and not getattr(tokenizer, "is_fast", False):
        raise KDError(f"tokenizer {type(tokenizer).__name__} gives no character offsets (not a fast tokenizer): "
                      "character spans need a `tokenizers`-backed (fast) tokenizer; use one, or set cache.store_text=false")
    ids: list[list[int]] = []
    spans: list[np.ndarray] = []
    for i in range(0, len(texts), batch):
        # No BOS/EOS from the tokenizer: documents are joined explicitly by the packer.
        enc = tokenizer(texts[i:i + batch], add_special_tokens=False, return_offsets_mapping=offsets,
                        return_attention_mask=False)
        ids.extend(enc["input_ids"])
        if offsets:
            spans.extend(np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in enc["offset_mapping"])
    return ids, spans if offsets else None


@dataclass
class Windows:
    """A batch of packed windows. input_ids [n, T] int32 (padding = pad_id), lengths [n] valid tokens, doc_starts [n]
    documents whose first token is in the window; with text: each window's text and every token's [start, end)
    character span in it (separators span the separator's own string; padding the empty string at the end)."""

    input_ids: np.ndarray
    lengths: np.ndarray
    doc_starts: np.ndarray
    texts: list[str] | None = None
    spans: np.ndarray | None = None  # [n, T, 2] int32

    def __len__(self) -> int:
        return len(self.lengths)


class Packer:
    """Streaming packer of one split. `add(ids, offsets, text)` per document, then `take()` the full windows."""

    def __init__(self, seq_len: int, sep_id: int, pad_id: int, with_text: bool, sep_text: str = ""):
        self.T, self.sep_id, self.pad_id, self.with_text, self.sep_text = seq_len, sep_id, pad_id, with_text, sep_text
        # pending stream: token ids, per token its document (-1 = separator; a running number), character offsets
        # in that document, and whether it is a document's first token; texts of the documents still referenced
        self._parts: list[tuple[np.ndarray, ...]] = []
        self._ids = np.zeros(0, np.int64)
        self._doc = np.zeros(0, np.int64)
        self._offs = np.zeros((0, 2), np.int64)
        self._first = np.zeros(0, bool)
        self._texts: dict[int, str] = {}
        self._next_doc = 0
        self.windows_emitted = 0

    def add(self, ids: list[int], offsets: np.ndarray | None = None, text: str | None = None) -> None:
        n = len(ids)
        d = self._next_doc
        self._next_doc += 1
        first = np.zeros(n + 1, bool)
        first[0] = n > 0
        doc = np.full(n + 1, d, np.int64)
        doc[-1] = -1
        offs = np.zeros((n + 1, 2), np.int64)
        if self.with_text:
            offs[:n] = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            self._texts[d] = text
        self._parts.append((np.asarray(list(ids) + [self.sep_id], np.int64), doc, offs, first))

    def pending_tokens(self) -> int:
        return len(self._ids) + sum(len(p[0]) for p in self._parts)

    def _gather(self) -> None:
        if self._parts:
            parts = [(self._ids, self._doc, self._offs, self._first)] + self._parts
            self._ids, self._doc, self._offs, self._first = (np.concatenate([p[i] for p in parts]) for i in range(4))
            self._parts = []

    def take(self, final: bool = False, limit: int | None = None) -> Windows:
        """Every full window pending (at most `limit`); with `final`, also the partial rest (>= 2 tokens)."""
        self._gather()
        n_full, rest = divmod(len(self._ids), self.T)
        if limit is not None:
            n_full = min(n_full, limit)
        n = n_full + (1 if final and n_full * self.T < len(self._ids) and rest >= MIN_WINDOW_TOKENS
                      and (limit is None or n_full < limit) else 0)
        used = min(n * self.T, len(self._ids))
        ids = np.full((n, self.T), self.pad_id, np.int32)
        flat = self._ids[:used]
        ids.reshape(-1)[:used] = flat
        lengths = np.minimum(self.T, used - np.arange(n) * self.T).astype(np.int32)
        starts = (np.add.reduceat(self._first[:used].astype(np.int32), np.arange(n) * self.T).astype(np.int32) if n
                  else np.zeros(0, np.int32))
        texts, spans = None, None
        if self.with_text:
            texts, spans = [], np.zeros((n, self.T, 2), np.int32)
            for i in range(n):
                a, b = i * self.T, i * self.T + int(lengths[i])
                text, spans[i, : b - a] = window_text(self._doc[a:b], self._offs[a:b], self._texts, self.sep_text)
                spans[i, b - a:] = len(text)
                texts.append(text)
        if final:
            used = len(self._ids)  # a 1-token rest has no target: dropped
        self._ids, self._doc, self._offs, self._first = (a[used:] for a in (self._ids, self._doc, self._offs, self._first))
        if self.with_text:
            live = set(np.unique(self._doc[self._doc >= 0]).tolist())
            self._texts = {d: t for d, t in self._texts.items() if d in live}
        self.windows_emitted += n
        return Windows(ids, lengths, starts, texts, spans)


def window_text(doc_of: np.ndarray, offs: np.ndarray, doc_texts, sep_text: str) -> tuple[str, np.ndarray]:
    """The text of one window (runs of tokens from one document, their source text; separators as `sep_text`)
    and each token's [start, end) span in it. A window may start mid-document: its text starts at the first token."""
    pieces, spans, pos = [], np.zeros((len(doc_of), 2), dtype=np.int64), 0
    j = 0
    while j < len(doc_of):
        if doc_of[j] < 0:
            spans[j] = (pos, pos + len(sep_text))
            pieces.append(sep_text)
            pos += len(sep_text)
            j += 1
            continue
        e = j
        while e < len(doc_of) and doc_of[e] == doc_of[j]:
            e += 1
        seg_start, seg_end = int(offs[j, 0]), int(offs[j:e, 1].max())
        spans[j:e] = offs[j:e] - seg_start + pos
        pieces.append(doc_texts[int(doc_of[j])][seg_start:seg_end])
        pos += seg_end - seg_start
        j = e
    return "".join(pieces), spans


def pack(token_lists: list[list[int]], seq_len: int, sep_id: int, pad_id: int) -> Windows:
    """All windows of a list of token lists at once (for tests and small uses; the ingest streams through Packer)."""
    p = Packer(seq_len, sep_id, pad_id, with_text=False)
    for toks in token_lists:
        p.add(toks)
    return p.take(final=True)
