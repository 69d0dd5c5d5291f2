"""Cross-tokenizer KD: a student whose tokenizer differs from the teacher's trains against the same cache.

Alignment. A cache made with `cache.store_text` keeps each window's text and every teacher token's character span.
The window is re-tokenized with the student's tokenizer (document by document; between documents the student's
own separator token, spanning the teacher separator's string). A student position s and a teacher position t are
aligned where their tokens END at the same character: both then condition on the same text prefix, so the
teacher's next-token distribution at t and the student's at s predict the same continuation. Where several
tokens end at one character (a multi-byte character split over tokens), only the last of them counts. Student
positions without a partner are masked out of KD (and feature) losses and counted. The alignment is computed
once per (cache, student tokenizer) and stored in the cache directory under alignments/.

Vocabulary mapping. A teacher token maps to the student token with the identical byte string (byte-level BPE
vocabularies are compared as bytes, so space markers such as "Ġ" match; SentencePiece "▁" is a space and
<0xNN> a byte); special tokens map only to special tokens with the same text. The mapping is one-to-one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd.data.chat import render
from kd.dist import agree, broadcast_object
from kd.errors import KDError
from kd.io import disk_error, write_bytes_durable
from kd.models import tokenizer_fingerprint

ALIGN_FORMAT_VERSION = 2  # 2: ragged, memory-mapped arrays in a folder (1: one padded .npz)


# ---- vocabularies -------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the alphabet of every byte-level BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _kind(tokenizer) -> str:
    # the normalizer's, pre-tokenizer's and decoder's own JSON, not the whole tokenizer's (Qwen's is 7 MB: a second
    # to parse), and unescaped: the "▁" of a Replace rule (Llama 2's and Gemma's conversions) is read as itself
    backend = tokenizer.backend_tokenizer
    parts = (backend.normalizer, backend.pre_tokenizer, backend.decoder)
    text = "".join(part.__getstate__().decode() for part in parts if part is not None)
    if "ByteLevel" in text:
        return "byte_level"
    if "Metaspace" in text or "▁" in text:
        return "sentencepiece"
    return "other"


def token_bytes(tokenizer) -> tuple[list[bytes | None], dict[str, int]]:
    """(bytes of each regular token id, or None; {special token text: id}). Needs a fast tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        raise KDError(
            f"the student tokenizer {type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer: "
            "cross-tokenizer alignment needs character offsets; load it with use_fast=True"
        )
    kind = _kind(tokenizer)
    decoder = {c: b for b, c in _bytes_to_unicode().items()}
    specials = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    out: list[bytes | None] = []
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if tok is None or i in specials.values():
            out.append(None)
        elif kind == "byte_level" and all(c in decoder for c in tok):
            out.append(bytes(decoder[c] for c in tok))
        elif kind == "sentencepiece" and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            out.append(bytes([int(tok[3:5], 16)]))
        elif kind == "sentencepiece":
            out.append(tok.replace("▁", " ").encode("utf-8"))
        else:  # an added non-special token, or an unknown scheme: its decoded text
            out.append(tokenizer.convert_tokens_to_string([tok]).encode("utf-8"))
    return out, specials


def vocab_map(teacher_tok, student_tok, teacher_vocab_size: int) -> np.ndarray:
    """[teacher_vocab_size] int64: the student id of each teacher id with an identical string, else -1.
    Ids past the teacher tokenizer (padding rows of the teacher's logits) are -1."""
    t_bytes, t_special = token_bytes(teacher_tok)
    s_bytes, s_special = token_bytes(student_tok)
    index: dict[bytes, int] = {}
    for j, b in enumerate(s_bytes):
        if b is not None:
            index.setdefault(b, j)
    mapping = np.full(teacher_vocab_size, -1, dtype=np.int64)
    used: set[int] = set()
    for i, b in enumerate(t_bytes[:teacher_vocab_size]):
        j = index.get(b) if b is not None else None
        if j is not None and j not in used:  # one-to-one, so no student probability is counted twice
            mapping[i] = j
            used.add(j)
    for text, i in t_special.items():
        if text in s_special and i < teacher_vocab_size and s_special[text] not in used:
            mapping[i] = s_special[text]
            used.add(s_special[text])
    return mapping


# ---- alignment ----------------------------------------------------------------------------------------------


def align_window(
    text: str,
    spans: np.ndarray,
    teacher_ids: np.ndarray,
    length: int,
    teacher_sep_id: int,
    student_tok,
    student_sep_id: int,
) -> tuple[list[int], np.ndarray]:
    """Re-tokenize one cached window with the student tokenizer: (student ids, teacher position per student
    position, -1 where none)."""
    spans = np.asarray(spans[:length])
    seps = [t for t in range(length) if int(teacher_ids[t]) == teacher_sep_id]
    pieces, cursor = [], 0
    for t in seps:
        pieces.append((text[cursor : int(spans[t, 0])], cursor, None))
        pieces.append(("", 0, (student_sep_id, int(spans[t, 1]))))
        cursor = int(spans[t, 1])
    pieces.append((text[cursor:], cursor, None))
    ids: list[int] = []
    ends: list[int] = []
    segments = [p[0] for p in pieces if p[2] is None]
    enc = student_tok(segments, add_special_tokens=False, return_offsets_mapping=True) if segments else None
    k = 0
    for _seg, base, sep in pieces:
        if sep is not None:
            ids.append(sep[0])
            ends.append(sep[1])
            continue
        ids.extend(enc["input_ids"][k])
        ends.extend(base + int(e) for _, e in enc["offset_mapping"][k])
        k += 1
    return ids, _positions_ending_at(np.asarray(ends, dtype=np.int64), spans[:, 1])


def _positions_ending_at(student_ends: np.ndarray, teacher_ends: np.ndarray) -> np.ndarray:
    """Per student token, the last teacher position whose token ends at the same character, or -1; -1 also for a
    student token followed by one ending at the same character (its prefix ends inside a character)."""
    pos = np.full(len(student_ends), -1, np.int64)
    if len(teacher_ends) == 0:
        return pos
    # the last teacher position per end: the first occurrence in the reversed order
    ends, first_reversed = np.unique(teacher_ends[::-1], return_index=True)
    last = len(teacher_ends) - 1 - first_reversed
    k = np.minimum(np.searchsorted(ends, student_ends), len(ends) - 1)
    found = ends[k] == student_ends
    pos[found] = last[k[found]]
    pos[:-1][student_ends[1:] == student_ends[:-1]] = -1
    return pos


def align_chat_window(text: str, spans: np.ndarray, length: int, student_tok, template: str | None, mask: str):
    """A cached chat window (its JSON text, kd.data.pack.chat_window_text) seen by a student with another tokenizer:
    each conversation re-rendered with the student's template (`template`; None = its tokenizer's own) and
    tokenized, with its own loss mask; the conversations end to end. (student ids, teacher position per student
    position or -1, loss mask, segments.)

    Aligned on the messages: a student token ending at character j of a turn's content (j = 0 included: the end
    of the template's text before it) is aligned to the teacher token ending at the same character of that
    content in the teacher's rendering, if one does. Both then condition on the same messages up to there;
    template text (role headers, a default system prompt) aligns to nothing, and so has CE but no KD. A
    conversation the cache cut to the window is cut at the same point of the same message."""
    window = json.loads(text)
    spans = np.asarray(spans[:length])
    teacher_end = {int(spans[t, 1]): t for t in range(length)}  # later positions overwrite: the last one wins
    ids: list[int] = []
    pos: list[int] = []
    keep: list[bool] = []
    seg: list[int] = []
    for c, conv in enumerate(window["conversations"]):
        turns, t_contents, kept_end = conv["turns"], conv["contents"], conv["kept_end"]
        r = render(student_tok, turns, template, mask, contents=True)
        s_contents = r.contents
        cut = _student_cut(kept_end, t_contents, s_contents)
        n = sum(1 for _, e in r.offsets if e <= cut)
        ends = [e for _, e in r.offsets[:n]]
        for s in range(n):
            p = -1
            if not (s + 1 < n and ends[s + 1] == ends[s]):  # only the last token ending inside a character
                for (ts, _), (cs, ce) in zip(t_contents, s_contents):
                    if cs <= ends[s] <= ce:
                        p = teacher_end.get(ts + ends[s] - cs, -1)
                        break
            pos.append(p)
        ids.extend(r.input_ids[:n])
        keep.extend(r.mask[:n])
        seg.extend([c + 1] * n)
    return ids, np.asarray(pos, np.int64), np.asarray(keep, bool), np.asarray(seg, np.int64)


def _student_cut(kept_end: int, t_contents, s_contents) -> float:
    """Where the student's rendering of a conversation stops: everything if the teacher kept its whole last message,
    else the same character of the message the teacher's window ends in (or the end of the last whole message)."""
    if not t_contents or kept_end >= t_contents[-1][1]:
        return float("inf")
    cut = 0
    for (ts, te), (cs, ce) in zip(t_contents, s_contents):
        if ts <= kept_end <= te:
            return cs + kept_end - ts
        if te <= kept_end:
            cut = ce
    return cut


# the arrays of one split's alignment, ragged (window i's student positions are [offsets[i], offsets[i + 1]) of each
# flat array) and in the narrowest dtype that holds them: 8 bytes per student token, no padding
ARRAYS = {"input_ids": np.int32, "teacher_pos": np.int32, "loss_mask": np.bool_, "segments": np.int32}
CHAT_ONLY = ("loss_mask", "segments")
BLOCK = 4096  # windows aligned between two writes to the split's files: bounds the build's memory


@dataclass(frozen=True)
class Alignment:
    """One split's alignment: window i's student ids, teacher position per student position (-1: none) and, for a
    chat cache, the student's loss mask and conversations, at [offsets[i], offsets[i + 1]) of the flat arrays.
    Read from disk they are memory-mapped: a 10^9-token corpus's 8 GB are paged in as windows are read, and shared
    by the processes of a launch, not copied into each."""

    offsets: np.ndarray  # int64 [N + 1]
    arrays: dict[str, np.ndarray]  # name -> flat [total] (ARRAYS; CHAT_ONLY ones for a chat cache only)
    max_len: int  # the longest window's student length: every item is padded to it
    pad_id: int  # what pads the student ids (the separator: a real token, masked out of every loss)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def window(self, i: int) -> dict[str, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {name: arr[a:b] for name, arr in self.arrays.items()}


def _aligned_windows(cache, split: str, student_tok, student_sep_id: int, chat_template: str | None, part):
    """Each window of the `part` = (index, count)-th of `count` contiguous shares of `split`, aligned: (ids,
    teacher_pos) or, for a chat cache, (ids, teacher_pos, mask, segments)."""
    reader = cache.split(split, ("input_ids", "text", "token_spans"))
    chat, sep = cache.info.chat, cache.info.tokenizer.separator_id
    index, count = part
    for i in range(len(reader) * index // count, len(reader) * (index + 1) // count):
        it = reader[i]
        spans, length = it["token_spans"].numpy(), int(it["length"])
        if chat is not None:
            yield align_chat_window(it["text"], spans, length, student_tok, chat_template, chat.loss_mask)
        else:
            yield align_window(it["text"], spans, it["input_ids"].numpy(), length, sep, student_tok, student_sep_id)


def build_alignment(
    cache,
    split: str,
    student_tok,
    student_sep_id: int,
    folder: Path,
    chat_template: str | None = None,
    part: tuple[int, int] = (0, 1),
) -> dict:
    """Align the windows of one split (all of them, or the `part` = (index, count)-th contiguous share: one process's
    of a launch) and write them to `folder` (<split>.<name>.bin, raw, in ARRAYS' dtypes), a block of windows at a
    time: memory stays one block's (and 8 bytes per window) whatever the corpus. Returns the split's record for
    meta.json (counts, the longest window)."""
    names = list(ARRAYS) if cache.info.chat is not None else [n for n in ARRAYS if n not in CHAT_ONLY]
    offsets, max_len, block = array("q", [0]), 0, []  # 8 bytes per window
    files = {name: open(folder / f"{split}.{name}.bin", "wb") for name in names}
    try:

        def flush() -> None:
            for k, name in enumerate(names):
                np.concatenate([np.asarray(row[k], ARRAYS[name]) for row in block]).tofile(files[name])
            block.clear()

        for row in _aligned_windows(cache, split, student_tok, student_sep_id, chat_template, part):
            offsets.append(offsets[-1] + len(row[0]))
            max_len = max(max_len, len(row[0]))
            block.append(row)
            if len(block) == BLOCK:
                flush()
        if block:
            flush()
        for f in files.values():  # on disk before meta.json says the alignment is complete
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    write_bytes_durable(folder / f"{split}.offsets.bin", np.frombuffer(offsets, np.int64).tobytes())
    return {"windows": len(offsets) - 1, "tokens": offsets[-1], "max_len": max_len, "arrays": names}


def read_alignment(folder: Path, split: str, record: dict, pad_id: int) -> Alignment:
    """One split of a built alignment, memory-mapped; a file whose size is not what meta.json says (a truncated
    copy) is refused with what to do."""

    def mapped(name: str, dtype, count: int) -> np.ndarray:
        path = folder / f"{split}.{name}.bin"
        size = path.stat().st_size if path.exists() else -1
        if size != count * np.dtype(dtype).itemsize:
            raise KDError(
                f"the cross-tokenizer alignment file {path} holds {size} bytes where {count} x "
                f"{np.dtype(dtype).itemsize} were written: it is damaged or incomplete. Delete {folder} and the "
                "next run builds it again"
            )
        return np.memmap(path, dtype, "r", shape=(count,)) if count else np.zeros(0, dtype)

    offsets = mapped("offsets", np.int64, record["windows"] + 1)
    arrays = {name: mapped(name, ARRAYS[name], record["tokens"]) for name in record["arrays"]}
    return Alignment(offsets, arrays, record["max_len"], pad_id)


def merge_parts(folder: Path, split: str, parts: list[tuple[Path, dict]]) -> dict:
    """One split's arrays in `folder`, from the processes' parts (folder, record) in their order: their files end to
    end, their offsets shifted by the tokens before them. Returns the split's record."""
    names = parts[0][1]["arrays"]
    for name in names:
        with open(folder / f"{split}.{name}.bin", "wb") as out:
            for part, _ in parts:
                with open(part / f"{split}.{name}.bin", "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
    offsets, tokens = [np.zeros(1, np.int64)], 0
    for part, record in parts:
        offsets.append(np.fromfile(part / f"{split}.offsets.bin", np.int64)[1:] + tokens)
        tokens += record["tokens"]
    write_bytes_durable(folder / f"{split}.offsets.bin", np.concatenate(offsets).tobytes())
    return {
        "windows": sum(r["windows"] for _, r in parts),
        "tokens": tokens,
        "max_len": max(r["max_len"] for _, r in parts),
        "arrays": names,
    }


def load_or_build(
    cache, student_tok, student_sep: str, fallback_dir: Path, accelerator, chat_template: str | None = None
) -> dict[str, Alignment]:
    """{split: Alignment} for every split, from the folder <cache>/alignments/<key>/, or <fallback_dir> when the
    cache directory is read-only. Built if missing by every process of the launch, each an equal share of the
    windows, then put end to end by the main process: a 10^9-token corpus is ~4 M windows at ~1 ms each, and built
    by the main process alone the others would wait ~70 minutes at the next collective (NCCL's timeout is 10);
    in equal shares they arrive together. A chat cache's student conversations are rendered with `chat_template`
    (None: the student tokenizer's own)."""
    fp = tokenizer_fingerprint(student_tok)
    chat = cache.info.chat is not None
    key = hashlib.sha256(
        json.dumps(
            [
                fp,
                student_sep,
                cache.info.splits["train"].fingerprint,
                cache.info.splits["eval"].fingerprint,
            ]
            # a chat alignment also depends on the student's template; text alignments keep their old keys
            + (
                [hashlib.sha256((chat_template or student_tok.chat_template or "").encode()).hexdigest()]
                if chat
                else []
            )
        ).encode()
    ).hexdigest()[:20]
    sep_id = student_tok.convert_tokens_to_ids(student_sep)
    if sep_id is None or sep_id == student_tok.unk_token_id:
        raise KDError(
            f"the student tokenizer has no token {student_sep!r} to put between documents; "
            "set loss.cross_tokenizer_separator to one of its special tokens"
        )
    candidates = [cache.root / "alignments" / key, Path(fallback_dir) / f"alignment-{key}"]

    def built() -> Path | None:
        return next((p for p in candidates if (p / "meta.json").exists()), None)

    def plan() -> tuple[str | None, str | None]:
        """On the main process: (a new build folder, or None when built already; an error, or None)."""
        if built() is not None:
            return None, None
        for folder in candidates:
            tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
            try:
                tmp.mkdir(parents=True)
                return str(tmp), None
            except OSError:
                continue  # read-only: the next candidate
        return None, f"cannot write the alignment to {candidates[0].parent} or {candidates[1].parent}"

    tmp, error = broadcast_object(accelerator, plan)
    if error:
        raise KDError(error)
    if tmp is not None:
        tmp, count, index = Path(tmp), accelerator.num_processes, accelerator.process_index
        part = tmp / f"part-{index}" if count > 1 else tmp

        def build_part() -> None:
            try:
                part.mkdir(exist_ok=True)
                records = {
                    split: build_alignment(cache, split, student_tok, sep_id, part, chat_template, (index, count))
                    for split in cache.info.splits
                }
                (part / "part.json").write_text(json.dumps(records))
            except OSError as e:
                raise KDError(f"cannot write the alignment to {tmp}: {disk_error(e)}") from None

        def publish() -> None:
            if not accelerator.is_main_process:
                return
            folder = tmp.with_name(tmp.name.rsplit(".tmp-", 1)[0])
            try:
                parts = [tmp / f"part-{i}" for i in range(count)] if count > 1 else [tmp]
                records = [json.loads((p / "part.json").read_text()) for p in parts]
                if count > 1:
                    splits = {s: merge_parts(tmp, s, [(p, r[s]) for p, r in zip(parts, records)]) for s in records[0]}
                    for p in parts:
                        shutil.rmtree(p)
                else:
                    splits = records[0]
                    (tmp / "part.json").unlink()
                meta = {
                    "format_version": ALIGN_FORMAT_VERSION,
                    "student_fingerprint": fp,
                    "separator": student_sep,
                    "separator_id": sep_id,
                    "processes": count,
                    "splits": splits,
                }
                # last: a folder with it is complete
                write_bytes_durable(tmp / "meta.json", json.dumps(meta, indent=1).encode())
                tmp.rename(folder)  # atomic
            except (OSError, KDError) as e:
                if not (folder / "meta.json").exists():  # else another launch published the same alignment first
                    shutil.rmtree(tmp, ignore_errors=True)
                    if isinstance(e, KDError):
                        raise
                    raise KDError(f"cannot write the alignment to {folder}: {disk_error(e)}") from None
                shutil.rmtree(tmp, ignore_errors=True)

        try:
            agree(accelerator, build_part)  # a failure on any process stops every process
        except KDError:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        agree(accelerator, publish)
    folder = built()
    if folder is None:
        raise KDError(f"the alignment is in neither {candidates[0]} nor {candidates[1]} after it was built")
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("format_version") != ALIGN_FORMAT_VERSION:
        raise KDError(
            f"the alignment in {folder} has format {meta.get('format_version')}, this kd reads "
            f"{ALIGN_FORMAT_VERSION}: delete that folder and the next run builds it again"
        )
    return {
        split: read_alignment(folder, split, meta["splits"][split], meta["separator_id"]) for split in cache.info.splits
    }


class AlignedSplit(torch.utils.data.Dataset):
    """A cache split seen by a student with another tokenizer: student ids; the teacher's top-k (ids mapped to
    student ids, -1 = no identical student token) and hidden states at each student position's aligned teacher
    position; kd_mask marks the aligned positions."""

    def __init__(self, base, alignment: Alignment, mapping: np.ndarray):
        if len(alignment) != len(base):
            raise KDError(f"the alignment has {len(alignment)} windows and the cache split {len(base)}")
        self.base, self.alignment, self.mapping = base, alignment, torch.from_numpy(mapping)

    def __len__(self) -> int:
        return len(self.base)

    @property
    def starts(self) -> np.ndarray:
        """The first window of each cache shard (window i is the cache's window i): train.shuffle=shards reads it."""
        return self.base.starts

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        w, T = self.alignment.window(i), self.alignment.max_len
        n = len(w["input_ids"])

        def padded(name: str, fill, dtype: torch.dtype) -> torch.Tensor:  # every item the split's longest length
            out = torch.full((T,), fill, dtype=dtype)
            out[:n] = torch.from_numpy(np.array(w[name])).to(dtype)  # a copy: the mapped file is read-only
            return out

        pos = padded("teacher_pos", -1, torch.int64)
        g = pos.clamp(min=0)
        out = {
            "input_ids": padded("input_ids", self.alignment.pad_id, torch.int64),
            "length": torch.tensor(n),
            "sequence_index": item["sequence_index"],
            "kd_mask": pos >= 0,
        }
        if "loss_mask" in w:  # a chat cache: the student's own assistant mask and conversations
            out["loss_mask"] = padded("loss_mask", False, torch.bool)
            out["segments"] = padded("segments", 0, torch.int64)
        if "topk_ids" in item:
            out["topk_ids"] = self.mapping[item["topk_ids"][g]]
            out["topk_logprobs"] = item["topk_logprobs"][g].float()
        if "hidden_states" in item:
            out["hidden_states"] = item["hidden_states"][:, g]
        return out


def coverage(split: AlignedSplit, max_sequences: int = 64) -> dict[str, float]:
    """Share of student positions aligned, and share of the teacher's top-k probability mass (at aligned positions)
    whose token has an identical student token, over the first sequences of a split."""
    aligned = total = 0
    mass_mapped = mass_all = 0.0
    for i in range(min(len(split), max_sequences)):
        it = split[i]
        n = int(it["length"])
        mask = it["kd_mask"][:n]
        aligned += int(mask.sum())
        total += n
        p = it["topk_logprobs"][:n][mask].exp()
        mass_all += float(p.sum())
        mass_mapped += float((p * (it["topk_ids"][:n][mask] >= 0)).sum())
    return {"aligned_share": aligned / max(total, 1), "mapped_mass_share": mass_mapped / max(mass_all, 1e-12)}
