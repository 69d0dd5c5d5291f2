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
from pathlib import Path

import numpy as np
import torch

from kd.data.chat import render
from kd.errors import KDError
from kd.models import tokenizer_fingerprint

ALIGN_FORMAT_VERSION = 1


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
    ends_arr = np.asarray(ends, dtype=np.int64)
    teacher_end = {int(spans[t, 1]): t for t in range(length)}  # later positions overwrite: the last one wins
    pos = np.full(len(ids), -1, dtype=np.int64)
    for s in range(len(ids)):
        if s + 1 < len(ids) and ends_arr[s + 1] == ends_arr[s]:
            continue  # not the last token ending here: its prefix ends inside a character
        pos[s] = teacher_end.get(int(ends_arr[s]), -1)
    return ids, pos


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


def build_alignment(
    cache, split: str, student_tok, student_sep_id: int, pad_id: int, chat_template: str | None = None
) -> dict[str, np.ndarray]:
    """Alignment arrays of one split: ids [N, Ts], lengths [N], teacher_pos [N, Ts] (Ts = longest student window);
    a chat cache's also loss_mask and segments [N, Ts], the student's own (`chat_template` renders them)."""

    reader = cache.split(split, ("input_ids", "text", "token_spans"))
    chat = cache.info.chat
    rows = []
    for i in range(len(reader)):
        it = reader[i]
        if chat is not None:
            rows.append(
                align_chat_window(
                    it["text"],
                    it["token_spans"].numpy(),
                    int(it["length"]),
                    student_tok,
                    chat_template,
                    chat.loss_mask,
                )
            )
            continue
        rows.append(
            align_window(
                it["text"],
                it["token_spans"].numpy(),
                it["input_ids"].numpy(),
                int(it["length"]),
                cache.info.tokenizer.separator_id,
                student_tok,
                student_sep_id,
            )
        )
    Ts = max(len(r[0]) for r in rows)
    ids = np.full((len(rows), Ts), pad_id, dtype=np.int64)
    pos = np.full((len(rows), Ts), -1, dtype=np.int64)
    lengths = np.zeros(len(rows), dtype=np.int64)
    out = {"input_ids": ids, "lengths": lengths, "teacher_pos": pos}
    if chat is not None:
        out["loss_mask"] = np.zeros((len(rows), Ts), bool)
        out["segments"] = np.zeros((len(rows), Ts), np.int64)
    for i, (r_ids, r_pos, *extra) in enumerate(rows):
        ids[i, : len(r_ids)], pos[i, : len(r_pos)], lengths[i] = r_ids, r_pos, len(r_ids)
        if extra:
            out["loss_mask"][i, : len(r_ids)], out["segments"][i, : len(r_ids)] = extra
    return out


def load_or_build(
    cache, student_tok, student_sep: str, fallback_dir: Path, is_main: bool, wait, chat_template: str | None = None
) -> dict:
    """{split: arrays} for every split, from <cache>/alignments/<student fingerprint>.npz (built by the main
    process if missing; `wait` is a barrier). Falls back to `fallback_dir` when the cache directory is read-only.
    A chat cache's student conversations are rendered with `chat_template` (None: the student tokenizer's own)."""
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
    candidates = [cache.root / "alignments" / f"{key}.npz", Path(fallback_dir) / f"alignment-{key}.npz"]
    if is_main and not any(p.exists() for p in candidates):
        arrays = {}
        for split in cache.info.splits:
            for name, a in build_alignment(cache, split, student_tok, sep_id, sep_id, chat_template).items():
                arrays[f"{split}/{name}"] = a
        arrays["meta"] = np.frombuffer(
            json.dumps(
                {"format_version": ALIGN_FORMAT_VERSION, "student_fingerprint": fp, "separator": student_sep}
            ).encode(),
            dtype=np.uint8,
        )
        for path in candidates:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npz")
                np.savez(tmp, **arrays)
                os.replace(tmp, path)
                break
            except OSError:
                continue
        else:
            raise KDError(f"cannot write the alignment file to {candidates[0].parent} or {candidates[1].parent}")
    wait()
    path = next(p for p in candidates if p.exists())
    names = ("input_ids", "lengths", "teacher_pos") + (("loss_mask", "segments") if chat else ())
    with np.load(path) as z:
        return {split: {name: z[f"{split}/{name}"] for name in names} for split in cache.info.splits}


class AlignedSplit(torch.utils.data.Dataset):
    """A cache split seen by a student with another tokenizer: student ids; the teacher's top-k (ids mapped to
    student ids, -1 = no identical student token) and hidden states at each student position's aligned teacher
    position; kd_mask marks the aligned positions."""

    def __init__(self, base, arrays: dict, mapping: np.ndarray):
        self.base, self.arrays, self.mapping = base, arrays, torch.from_numpy(mapping)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        pos = torch.from_numpy(self.arrays["teacher_pos"][i])
        g = pos.clamp(min=0)
        out = {
            "input_ids": torch.from_numpy(self.arrays["input_ids"][i]),
            "length": torch.tensor(int(self.arrays["lengths"][i])),
            "sequence_index": item["sequence_index"],
            "kd_mask": pos >= 0,
        }
        if "loss_mask" in self.arrays:  # a chat cache: the student's own assistant mask and conversations
            out["loss_mask"] = torch.from_numpy(self.arrays["loss_mask"][i])
            out["segments"] = torch.from_numpy(self.arrays["segments"][i])
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
