"""Text in, packed token windows out: the teacher cache's input side.

Documents come from local text/json/jsonl/csv/parquet files or a Hugging Face hub dataset. They are split into
train and eval BY DOCUMENT (a seeded permutation of document indices), before packing, so no eval window can
share text with a training window. Each split is tokenized, documents are joined with the tokenizer's EOS
token, and the stream is cut into `seq_len` windows. The last, partial window of a split is kept (its valid
length is recorded and the rest padded) when it has at least 2 tokens, so no text is silently dropped.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd.assets import resolve_path
from kd.errors import KDError

# datasets builder per file extension; a .txt file is one document (sample_by="document").
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
MIN_WINDOW_TOKENS = 2  # a window needs one input and one target token


@dataclass
class PackedSplit:
    """Token windows of one split. input_ids: [N, seq_len] int64 (padding = pad_id); lengths: [N] valid tokens."""

    input_ids: np.ndarray
    lengths: np.ndarray
    documents: list[int]  # indices of the source documents in this split
    # With text: each window's text and every token's [start, end) character span in it (separators span the
    # separator token's own string; padding spans the empty string at the end), so any other tokenizer can
    # re-tokenize the window and be aligned to these tokens later (cross-tokenizer KD, kd/align.py).
    texts: list[str] | None = None
    spans: np.ndarray | None = None  # [N, seq_len, 2] int32

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.input_ids, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.lengths, dtype=np.int64).tobytes())
        return h.hexdigest()


def expand_files(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        path = resolve_path(pattern)
        matches = sorted(glob.glob(path)) if glob.has_magic(path) else ([path] if os.path.exists(path) else [])
        if not matches:
            raise KDError(f"data file(s) not found: {pattern}" + (f" (resolved to {path})" if path != pattern else ""))
        files.extend(matches)
    exts = {Path(f).suffix.lower() for f in files}
    unknown = exts - set(BUILDERS)
    if unknown:
        raise KDError(f"unsupported data file type(s) {sorted(unknown)}; use one of {sorted(BUILDERS)}")
    if len({BUILDERS[e] for e in exts}) > 1:
        raise KDError(f"data files mix formats {sorted(exts)}; use one format per config")
    return files


def load_documents(files: list[str], dataset: str | None, dataset_config: str | None, dataset_split: str,
                   text_field: str) -> list[str]:
    """Return the documents' texts, in a deterministic order, empty ones removed."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if files:
        paths = expand_files(files)
        builder = BUILDERS[Path(paths[0]).suffix.lower()]
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=paths, split="train", **kwargs)
        except Exception as e:  # datasets raises many types for unreadable files
            raise KDError(f"could not read data files {paths[:3]}{'...' if len(paths) > 3 else ''}: {e}") from None
        where = f"files {files}"
    elif dataset:
        try:
            ds = datasets.load_dataset(dataset, dataset_config, split=dataset_split)
        except Exception as e:
            raise KDError(f"could not load dataset '{dataset}' (config {dataset_config}, split {dataset_split}): {e}") from None
        where = f"dataset {dataset}"
    else:
        raise KDError("no data given: set data.files (local files) or data.dataset (a hub dataset name)")
    if text_field not in ds.column_names:
        raise KDError(f"text field '{text_field}' is not in {where}; its columns are {ds.column_names}. Set data.text_field")
    texts = [t for t in ds[text_field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise KDError(f"{where} holds no non-empty text in field '{text_field}'")
    return texts


def split_documents(n_docs: int, eval_documents: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic document-level split: (train indices, eval indices), each in the original order."""
    n_eval = eval_documents if eval_documents > 0 else int(round(eval_fraction * n_docs))
    n_eval = max(n_eval, 1)
    if n_eval >= n_docs:
        raise KDError(
            f"the eval split takes {n_eval} of {n_docs} documents, leaving none for training; "
            "lower data.eval_documents / data.eval_fraction or add documents"
        )
    order = np.random.default_rng(seed).permutation(n_docs)
    eval_idx = sorted(int(i) for i in order[:n_eval])
    eval_set = set(eval_idx)
    return [i for i in range(n_docs) if i not in eval_set], eval_idx


def pack(token_lists: list[list[int]], documents: list[int], seq_len: int, sep_id: int, pad_id: int,
         max_sequences: int | None = None, offsets: list[np.ndarray] | None = None, doc_texts: list[str] | None = None,
         sep_text: str = "") -> PackedSplit:
    """Join documents with `sep_id` and cut into [N, seq_len] windows (last partial window padded with pad_id).
    With `offsets` (per document, [n_tokens, 2] character offsets) and `doc_texts`, also each window's text and spans."""
    stream = np.fromiter((t for toks in token_lists for t in (*toks, sep_id)), dtype=np.int64)
    n_full, rest = divmod(len(stream), seq_len)
    n = n_full + (1 if rest >= MIN_WINDOW_TOKENS else 0)
    if max_sequences is not None:
        n = min(n, max_sequences)
    ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    for i in range(n):
        chunk = stream[i * seq_len:(i + 1) * seq_len]
        ids[i, : len(chunk)] = chunk
        lengths[i] = len(chunk)
    if offsets is None:
        return PackedSplit(ids, lengths, documents)
    # the same stream with, per token, its document (-1 = separator) and character offsets in that document
    doc_of = np.fromiter((d for j, toks in enumerate(token_lists) for d in (*([j] * len(toks)), -1)), dtype=np.int64)
    offs = np.concatenate([np.concatenate([np.asarray(o, dtype=np.int64).reshape(-1, 2), [[0, 0]]]) for o in offsets])
    texts, spans = [], np.zeros((n, seq_len, 2), dtype=np.int32)
    for i in range(n):
        a, b = i * seq_len, i * seq_len + int(lengths[i])
        text, spans[i, : b - a] = window_text(doc_of[a:b], offs[a:b], doc_texts, sep_text)
        spans[i, b - a:] = len(text)
        texts.append(text)
    return PackedSplit(ids, lengths, documents, texts, spans)


def window_text(doc_of: np.ndarray, offs: np.ndarray, doc_texts: list[str], sep_text: str) -> tuple[str, np.ndarray]:
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


def tokenize(tokenizer, texts: list[str], batch: int = 256,
             offsets: bool = False) -> tuple[list[list[int]], list[np.ndarray] | None]:
    """Token ids per text and, with `offsets`, their [n, 2] character offsets (else None). Offsets need a fast
    (`tokenizers`-backed) tokenizer; a slow one is refused."""
    if offsets and not getattr(tokenizer, "is_fast", False):
        raise KDError(f"tokenizer {type(tokenizer).__name__} gives no character offsets (not a fast tokenizer): "
                      "character spans need a `tokenizers`-backed (fast) tokenizer; use one, or set cache.store_text=false")
    ids: list[list[int]] = []
    spans: list[np.ndarray] = []
    for i in range(0, len(texts), batch):
        # No BOS/EOS from the tokenizer: documents are joined explicitly in `pack`.
        enc = tokenizer(texts[i:i + batch], add_special_tokens=False, return_offsets_mapping=offsets)
        ids.extend(enc["input_ids"])
        if offsets:
            spans.extend(np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in enc["offset_mapping"])
    return ids, spans if offsets else None
