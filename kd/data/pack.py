"""Tokenize documents in batches and pack them on the fly into fixed-length windows.

Documents are joined with a separator token (after every document) and the stream is cut into `seq_len` windows.
The packer holds only the tokens not yet emitted (less than one window plus the current batch), never the corpus.
`finish()` emits the last, partial window when it has at least 2 tokens (one input and one target); it is padded
and its valid length recorded, so no text is silently dropped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from kd.errors import KDError

MIN_WINDOW_TOKENS = 2  # a window needs one input and one target token


def tokenize(
    tokenizer, texts: list[str], batch: int = 256, offsets: bool = False
) -> tuple[list[list[int]], list[np.ndarray] | None]:
    """Token ids per text and, with `offsets`, their [n, 2] character offsets (else None). One batched call of the
    fast tokenizer per `batch` texts (its Rust core parallelises a batch over cores). Offsets need a fast
    (`tokenizers`-backed) tokenizer; a slow one is refused."""
    if offsets and not getattr(tokenizer, "is_fast", False):
        raise KDError(
            f"tokenizer {type(tokenizer).__name__} gives no character offsets (not a fast tokenizer): "
            "character spans need a `tokenizers`-backed (fast) tokenizer; use one, or set cache.store_text=false"
        )
    backend = getattr(tokenizer, "backend_tokenizer", None)
    ids: list[list[int]] = []
    spans: list[np.ndarray] = []
    for i in range(0, len(texts), batch):
        # No BOS/EOS from the tokenizer: documents are joined explicitly by the packer.
        if backend is not None:
            # the `tokenizers` object itself, as transformers' fast tokenizers call it (same ids), without the
            # per-token conversion into Python dicts that costs ~10% of the ingest
            encs = backend.encode_batch(texts[i : i + batch], add_special_tokens=False)
            ids.extend(e.ids for e in encs)
            if offsets:
                spans.extend(_offsets_array(e.offsets) for e in encs)
            continue
        enc = tokenizer(
            texts[i : i + batch], add_special_tokens=False, return_offsets_mapping=offsets, return_attention_mask=False
        )
        ids.extend(enc["input_ids"])
        if offsets:
            spans.extend(_offsets_array(o) for o in enc["offset_mapping"])
    return ids, spans if offsets else None


# A document longer than this is tokenized in pieces of at most this many characters (document_pieces): the fast
# tokenizer's memory grows with the text of one call (~200 bytes per character with offsets: a 12 MB document took
# 2.4 GB), and one document is one call. Pieces of a document are packed end to end as the one document they are.
PIECE_CHARS = 100_000


def document_pieces(text: str, max_chars: int = PIECE_CHARS) -> list[tuple[int, int]]:
    """[start, end) character ranges, end to end over `text`, each at most `max_chars` long. A cut is placed where
    tokenizers split anyway, so that the pieces' tokens are the whole text's: before a space between two words (the
    space starts the next word's token, as in byte-level BPE and SentencePiece), else after a line break, else (a
    run of max_chars / 2 characters with neither, e.g. text without spaces) at the limit itself."""
    pieces, start, n = [], 0, len(text)
    while n - start > max_chars:
        end, lo = start + max_chars, start + max_chars // 2
        cut = text.rfind(" ", lo, end)
        while cut > lo and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", lo, cut)
        if cut <= lo:
            newline = text.rfind("\n", lo, end - 1)
            cut = newline + 1 if newline >= lo else end
        pieces.append((start, cut))
        start = cut
    pieces.append((start, n))
    return pieces


def _offsets_array(pairs) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(pairs), dtype=np.int64, count=2 * len(pairs)).reshape(-1, 2)


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
    # chat windows (ChatPacker): per token, whether the loss counts it as a target, and its conversation's number
    # in the window (1, 2, ...; 0 = padding): tokens attend only within their conversation
    loss_mask: np.ndarray | None = None  # [n, T] uint8
    segments: np.ndarray | None = None  # [n, T] uint16

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
        self._open_doc: int | None = None  # a document whose later pieces are still to come
        self.windows_emitted = 0

    def add(
        self,
        ids: list[int],
        offsets: np.ndarray | None = None,
        text: str | None = None,
        *,
        start: int = 0,
        first: bool = True,
        last: bool = True,
    ) -> None:
        """One document, or one piece of a document tokenized in pieces (document_pieces): `first` starts a new
        document (`text` is then the whole document's text), a later piece continues it (its `offsets` are in
        the piece, which starts at character `start` of the document), and `last` ends it with the separator."""
        n, end = len(ids), int(last)
        if first:
            self._next_doc += 1
        d = self._next_doc - 1
        self._open_doc = None if last else d  # its text stays referenced until its last piece (take)
        if n + end == 0:
            return
        is_first = np.zeros(n + end, bool)
        is_first[0] = first and n > 0
        doc = np.full(n + end, d, np.int64)
        doc[n:] = -1
        offs = np.zeros((n + end, 2), np.int64)
        if self.with_text:
            offs[:n] = np.asarray(offsets, dtype=np.int64).reshape(-1, 2) + start
            if first:
                self._texts[d] = text
        tokens = np.asarray(ids, np.int64) if not last else np.asarray(list(ids) + [self.sep_id], np.int64)
        self._parts.append((tokens, doc, offs, is_first))

    def _gather(self) -> None:
        if self._parts:
            parts = [(self._ids, self._doc, self._offs, self._first)] + self._parts
            self._ids, self._doc, self._offs, self._first = (np.concatenate([p[i] for p in parts]) for i in range(4))
            self._parts = []

    def take(self, final: bool = False) -> Windows:
        """Every full window pending; with `final`, also the partial rest (if it has >= 2 tokens)."""
        self._gather()
        n_full, rest = divmod(len(self._ids), self.T)
        n = n_full + (1 if final and rest >= MIN_WINDOW_TOKENS else 0)
        used = min(n * self.T, len(self._ids))
        ids = np.full((n, self.T), self.pad_id, np.int32)
        flat = self._ids[:used]
        ids.reshape(-1)[:used] = flat
        lengths = np.minimum(self.T, used - np.arange(n) * self.T).astype(np.int32)
        starts = (
            np.add.reduceat(self._first[:used].astype(np.int32), np.arange(n) * self.T).astype(np.int32)
            if n
            else np.zeros(0, np.int32)
        )
        texts, spans = None, None
        if self.with_text:
            texts, spans = window_texts(self._doc[:used], self._offs[:used], self.T, self._texts, self.sep_text)
        if final:
            used = len(self._ids)  # a 1-token rest has no target: dropped
        self._ids, self._doc, self._offs, self._first = (
            a[used:] for a in (self._ids, self._doc, self._offs, self._first)
        )
        if self.with_text:
            live = set(np.unique(self._doc[self._doc >= 0]).tolist()) | {self._open_doc}
            self._texts = {d: t for d, t in self._texts.items() if d in live}
        self.windows_emitted += n
        return Windows(ids, lengths, starts, texts, spans)


def window_texts(
    doc_of: np.ndarray, offs: np.ndarray, T: int, doc_texts, sep_text: str
) -> tuple[list[str], np.ndarray]:
    """The text of each window of a token stream cut every T tokens, and each token's [start, end) span in its
    window's text (padding: the empty span at the end). A window's text is its runs of tokens from one document
    (that document's text from the run's first token to its last token's end) and its separators (`sep_text`), so
    a window that starts mid-document starts at its first token. Vectorised over runs and tokens; Python touches
    each run once (a window holds a few), never each token.

    doc_of [N]: each token's document (-1 = separator); offs [N, 2]: character offsets in that document."""
    N = len(doc_of)
    n = -(-N // T)
    spans = np.zeros((n, T, 2), np.int32)
    if N == 0:
        return [], spans
    window = np.arange(N) // T
    change = np.ones(N, bool)
    change[1:] = (doc_of[1:] != doc_of[:-1]) | (doc_of[1:] < 0) | (window[1:] != window[:-1])
    run_start = np.flatnonzero(change)
    run_doc, run_window = doc_of[run_start], window[run_start]
    is_sep = run_doc < 0
    seg_start = np.where(is_sep, 0, offs[run_start, 0])
    seg_end = np.where(is_sep, len(sep_text), np.maximum.reduceat(offs[:, 1], run_start))
    seg_len = seg_end - seg_start
    before = np.cumsum(seg_len) - seg_len  # characters of all earlier runs
    first_run = np.searchsorted(run_window, np.arange(n))
    pos = before - before[first_run][run_window]  # where each run starts in its window's text
    run_of = np.cumsum(change) - 1
    tok_spans = np.where(
        is_sep[run_of, None],
        np.stack([pos[run_of], pos[run_of] + len(sep_text)], 1),
        offs - seg_start[run_of, None] + pos[run_of, None],
    )
    spans.reshape(-1, 2)[:N] = tok_spans
    ends = np.append(first_run[1:], len(run_start))
    texts = []
    for w in range(n):
        pieces = [
            sep_text if d < 0 else doc_texts[d][a:b]
            for d, a, b in zip(
                run_doc[first_run[w] : ends[w]].tolist(),
                seg_start[first_run[w] : ends[w]].tolist(),
                seg_end[first_run[w] : ends[w]].tolist(),
            )
        ]
        texts.append("".join(pieces))
    valid = np.minimum(T, N - np.arange(n) * T)
    lengths = np.array([len(t) for t in texts], np.int32)
    pad = np.arange(T)[None, :] >= valid[:, None]
    spans[pad] = np.repeat(lengths, T - valid)[:, None]
    return texts, spans


def pack(token_lists: list[list[int]], seq_len: int, sep_id: int, pad_id: int) -> Windows:
    """All windows of a list of token lists at once (for tests and small uses; the ingest streams through Packer)."""
    p = Packer(seq_len, sep_id, pad_id, with_text=False)
    for toks in token_lists:
        p.add(toks)
    return p.take(final=True)


# Windows a first-fit packer keeps open at once: bounds its memory (a few windows of ids) while finding room for
# short conversations; on the offline chat set, 64 open windows pack as tightly as unbounded first-fit.
OPEN_WINDOWS = 64


class ChatPacker:
    """Whole conversations into windows, never split across two, each keeping its own positions and attention
    (`segments`). `first_fit`: each conversation goes into the first open window with room for it; when
    OPEN_WINDOWS are open and none has room, the fullest one is emitted. `one_per_window`: each conversation alone
    in a right-padded window. A conversation longer than the window is cut to its first seq_len tokens (counted in
    `truncated` / `tokens_cut`; the caller drops one whose kept part has nothing in the loss)."""

    def __init__(self, seq_len: int, pad_id: int, packing: str, with_text: bool = False):
        if packing not in ("first_fit", "one_per_window"):
            raise KDError(f"unknown data.packing {packing!r}; choose first_fit or one_per_window")
        self.T, self.pad_id, self.packing, self.with_text = seq_len, pad_id, packing, with_text
        # per open window, its conversations in order: (ids, mask, text record or None)
        self._open: list[list[tuple]] = []
        self._room: list[int] = []
        self._done: list[list[tuple]] = []
        self.windows_emitted = self.window_tokens = 0
        self.truncated = self.tokens_cut = 0

    def add(self, ids: list[int], mask: list[bool], text: dict | None = None) -> None:
        """One rendered conversation (ids and per-token loss mask; at least MIN_WINDOW_TOKENS ids). With text
        (`with_text`): {turns, text, offsets: each token's [start, end) in text, contents: each turn's content span}
        (kd.data.chat.render with contents=True), kept for aligning students with other tokenizers (chat_window_text)."""
        if len(ids) > self.T:
            self.truncated += 1
            self.tokens_cut += len(ids) - self.T
            ids, mask = ids[: self.T], mask[: self.T]
        n = len(ids)
        conv = (ids, mask, text)
        if self.packing == "one_per_window":
            self._done.append([conv])
            return
        j = next((j for j, room in enumerate(self._room) if room >= n), None)
        if j is None:
            if len(self._open) >= OPEN_WINDOWS:
                k = min(range(len(self._room)), key=self._room.__getitem__)  # the fullest (first of equals)
                self._done.append(self._open.pop(k))
                self._room.pop(k)
            self._open.append([])
            self._room.append(self.T)
            j = len(self._open) - 1
        self._open[j].append(conv)
        self._room[j] -= n
        if self._room[j] < MIN_WINDOW_TOKENS:  # nothing fits any more
            self._done.append(self._open.pop(j))
            self._room.pop(j)

    def take(self, final: bool = False) -> Windows:
        """The windows completed so far; with `final`, also every open one (in the order they were opened)."""
        if final:
            self._done += self._open
            self._open, self._room = [], []
        done, self._done = self._done, []
        n, T = len(done), self.T
        ids = np.full((n, T), self.pad_id, np.int32)
        loss = np.zeros((n, T), np.uint8)
        seg = np.zeros((n, T), np.uint16)
        lengths = np.zeros(n, np.int32)
        texts, spans = ([], np.zeros((n, T, 2), np.int32)) if self.with_text else (None, None)
        for w, convs in enumerate(done):
            pos = 0
            for c, (cids, cmask, _) in enumerate(convs):
                ids[w, pos : pos + len(cids)] = cids
                loss[w, pos : pos + len(cids)] = cmask
                seg[w, pos : pos + len(cids)] = c + 1
                pos += len(cids)
            lengths[w] = pos
            if self.with_text:
                text, spans[w] = chat_window_text([(len(cids), t) for cids, _, t in convs], T)
                texts.append(text)
        self.windows_emitted += n
        self.window_tokens += int(lengths.sum())
        starts = np.array([len(c) for c in done], np.int32)
        return Windows(ids, lengths, starts, texts, spans, loss_mask=loss, segments=seg)


def chat_window_text(convs: list[tuple[int, dict]], T: int) -> tuple[str, np.ndarray]:
    """A chat window's stored text and its tokens' character spans, from its conversations (kept tokens, text
    record). The text is JSON: {"text": the conversations' rendered texts end to end, "conversations": [{"turns",
    "start": where its text begins, "contents": each turn's content span, "kept_end": where its last kept token
    ends (a conversation cut to the window ends early)}]}, all offsets into "text"; token spans index "text" too,
    padding the empty span at its end. kd/align.py re-renders the turns with a student's own template and aligns
    the two renderings on the contents."""
    import json

    spans = np.zeros((T, 2), np.int32)
    parts, records, base, pos = [], [], 0, 0
    for n, t in convs:
        offs = np.asarray(t["offsets"][:n], np.int64).reshape(-1, 2)
        spans[pos : pos + n] = offs + base
        records.append(
            {
                "turns": t["turns"],
                "start": base,
                "contents": [[base + a, base + b] for a, b in t["contents"]],
                "kept_end": base + int(offs[-1, 1]),
            }
        )
        parts.append(t["text"])
        base += len(t["text"])
        pos += n
    spans[pos:] = base
    return json.dumps({"text": "".join(parts), "conversations": records}, ensure_ascii=False), spans


def segment_positions(segments):
    """Position ids that restart at 0 at each conversation of a chat window: segments [B, T] (torch) -> [B, T]
    int64. Padding (segment 0) counts on as its own run, which no valid token attends to. Transformers' masks read
    a restart of the positions as the start of another sequence and attend only within it (the trainer checks that
    the student's model honours this: kd.train.model.packing_fallback_reason)."""
    import torch

    B, T = segments.shape
    t = torch.arange(T, device=segments.device).expand(B, T)
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(start, t, torch.zeros_like(t)).cummax(dim=1).values
    return t - first
