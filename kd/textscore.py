"""Tokenizer-free scores: bits per character and per UTF-8 byte of the text a model predicted.

CE per token cannot be compared across tokenizers (a token is a different amount of text), bits per character can.
One definition serves the teacher (scored once in the caching pass, kept in the manifest), the student (every eval)
and `python -m kd.evaluate`, so the three compare directly:

    bits per character = (sum over the scored targets of -ln p(target)) / ln 2 / (characters of those targets)

The scored targets of a window of L valid tokens are tokens 1 .. L-1 (each predicted from the tokens before it):
exactly the positions eval/ce averages over (in chat windows: the loss-masked tokens that are not the first of
their conversation, `chat_targets`; their characters are those of the rendered template text, end-of-turn markers
included, so chat figures compare between models rendered with the same template). Window edges: token 0 of a window is not a target, so its characters
are not counted. Padding: never a target. Separators (the token between documents): a target like any other
(predicting where a document ends is part of modelling the text) that counts as ONE character and one byte; the
other targets count the characters (bytes) of their decoded text, decoded window by window (a character split
across a window edge decodes as U+FFFD: one character, three bytes).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kd.data.pack import Packer, document_pieces
from kd.data.sources import BadRecord, expand_files, plan_file_units, unit_documents
from kd.errors import KDError
from kd.losses.chunked import HeadInput, chunk_logits
from kd.models import head_fallback_reason


def chat_targets(loss_mask, segments) -> np.ndarray:
    """[n, T] bool: the tokens of chat windows that are scored targets: in the loss mask, and not the first token
    of their conversation (it is predicted from nothing of its own conversation). The same rule as the trainer's
    kd.train.step.positions (in torch, per predicting position t = target - 1): change both together."""
    mask, seg = np.asarray(loss_mask, bool), np.asarray(segments)
    out = mask.copy()
    out[:, 0] = False
    out[:, 1:] &= seg[:, 1:] == seg[:, :-1]
    return out


def target_text_units(tokenizer, input_ids, lengths, sep_id: int | None, scored=None) -> np.ndarray:
    """[characters, UTF-8 bytes] of the scored targets (tokens 1 .. L-1) of each window: [n, 2] int64. `scored`
    ([n, T] bool, e.g. chat_targets) names the scored target tokens instead; their text is decoded together."""
    ids = np.asarray(input_ids)
    lengths = np.asarray(lengths).reshape(-1)
    texts, seps = [], []
    for i, (row, length) in enumerate(zip(ids, lengths)):
        targets = row[1 : int(length)] if scored is None else row[np.asarray(scored[i], bool)]
        is_sep = targets == sep_id if sep_id is not None else np.zeros(len(targets), bool)
        seps.append(int(is_sep.sum()))
        texts.append(targets[~is_sep].tolist())
    decoded = tokenizer.batch_decode(texts, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return np.array([[len(t) + s, len(t.encode("utf-8")) + s] for t, s in zip(decoded, seps)], dtype=np.int64)


def batch_text_units(tokenizer, batch: dict, sep_id: int | None) -> np.ndarray:
    """[characters, bytes] of a cache batch's scored targets, summed: a chat batch's (`segments`, `loss_mask`) are
    its chat_targets, decoded as they are (no separator in chat windows); a text batch's are tokens 1 .. L-1."""
    ids, lengths = batch["input_ids"].numpy(), batch["length"].numpy()
    if "segments" in batch:
        scored = chat_targets(batch["loss_mask"].numpy(), batch["segments"].numpy())
        return target_text_units(tokenizer, ids, lengths, None, scored).sum(0)
    return target_text_units(tokenizer, ids, lengths, sep_id).sum(0)


def bits_per_unit(nats: float, units: float) -> float:
    return nats / math.log(2) / units if units > 0 else float("nan")


def score_record(nats: float, tokens: int, chars: int, nbytes: int) -> dict:
    """The record kept in the manifest (teacher) and printed by evaluations: sums and the three rates."""
    return {
        "ce_per_token": nats / tokens if tokens else float("nan"),
        "bits_per_char": bits_per_unit(nats, chars),
        "bits_per_byte": bits_per_unit(nats, nbytes),
        "nats": nats,
        "tokens": tokens,
        "chars": chars,
        "bytes": nbytes,
    }


# ---- scoring a model on text packed as the caching pass packs it (kd.evaluate --text, train.extra_eval_files) ----


def eval_text_differs(eval_max_sequences: int | None, num_sequences: int) -> str:
    """Empty when the student's evals score the whole eval split, as the teacher's score of a cache older than format
    8 does (kept per split only); else what each was scored on, to print after the two figures, and the way to the
    same windows. Counted in windows, not tokens: with another tokenizer than the teacher's the two token counts
    differ over the same text."""
    if eval_max_sequences is None or eval_max_sequences >= num_sequences:
        return ""
    return (
        f" (the teacher on all {num_sequences:,} eval windows, the student on the first {eval_max_sequences:,}: "
        "train.eval_max_sequences; a cache of format 8 on, cache.overwrite=true, keeps the teacher's score per window)"
    )


def text_windows(tok, files: list[str], seq_len: int, text_field: str = "text", max_sequences: int | None = None):
    """Text files packed into windows of `seq_len` tokens with the tokenizer's EOS between documents, as the caching
    pass packs them (the first `max_sequences` windows, or all): (kd.data.pack.Windows, the separator id)."""
    sep = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
    if sep is None:
        raise KDError("the tokenizer has no EOS (or pad) token to put between documents")
    packer = Packer(seq_len, sep, sep, False)
    for unit in plan_file_units(expand_files(files, "text files"), 1 << 62, "main"):
        for text, _ in unit_documents(unit, text_field, "strict"):
            if isinstance(text, BadRecord):
                raise KDError(text.message)
            if not text.strip():
                continue
            for a, b in document_pieces(text):  # a long document in pieces, as the caching pass tokenizes it
                packer.add(tok(text[a:b], add_special_tokens=False)["input_ids"], first=a == 0, last=b == len(text))
    windows = packer.take(final=True)
    if max_sequences is not None:
        windows = type(windows)(windows.input_ids[:max_sequences], windows.lengths[:max_sequences], windows.doc_starts)
    if not len(windows):
        raise KDError(f"no text to evaluate in {files} (at least 2 tokens are needed)")
    return windows, sep


def score_windows(
    lm, tok, windows, sep: int, batch_size: int = 8, chunk: int = 128, fused: bool | None = None
) -> np.ndarray:
    """[nats, scored tokens, characters, bytes] of a causal LM on packed windows (kd/textscore.py's definition).
    Where the LM head can run apart from the body (kd.models.head_fallback_reason), the logits are computed
    `chunk` positions at a time and never whole, as in training. `fused`: that decision when the caller has made
    it already (the trainer's DistillModel.fused_head, probed once per run); None probes the model here."""
    if fused is None:
        fused = head_fallback_reason(lm) is None
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    nats, tokens = 0.0, 0
    for a in range(0, len(windows), batch_size):
        ids = torch.from_numpy(windows.input_ids[a : a + batch_size].astype(np.int64)).to(device)
        lengths = torch.from_numpy(windows.lengths[a : a + batch_size].astype(np.int64)).to(device)
        B, T = ids.shape
        # position t predicts ids[t + 1]; right padding: no valid position sees it
        scored = (torch.arange(T, device=device)[None, :] < (lengths[:, None] - 1)).reshape(-1)
        targets = torch.roll(ids, -1, dims=1).reshape(-1)
        with torch.no_grad():
            if fused:
                h = lm.base_model(input_ids=ids).last_hidden_state
                head = lm.get_output_embeddings()
                x = HeadInput(h.reshape(B * T, -1), head.weight, head.bias)
            else:
                x = lm(input_ids=ids).logits.reshape(B * T, -1)
            for s in range(0, B * T, chunk):
                rows = slice(s, s + chunk)
                lp = torch.log_softmax(chunk_logits(x, rows), -1).gather(1, targets[rows, None])[:, 0]
                nats -= float(lp[scored[rows]].double().sum())
        tokens += int(scored.sum())
    lm.train(was_training)
    chars, nbytes = target_text_units(tok, windows.input_ids, windows.lengths, sep).sum(0)
    return np.array([nats, tokens, chars, nbytes], dtype=np.float64)
