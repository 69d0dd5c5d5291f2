"""Checking and describing a cache: `verify` (every checksum, shape and log-prob sanity) and `summary` (info)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from kd.cache.basis import BASIS_FILE, HiddenBasis
from kd.cache.codecs import describe
from kd.cache.format import (
    FORMAT,
    META_ATTR,
    TEACHER_SCORE_COLUMNS,
    WINDOW_SCORES_SINCE,
    dataset_mismatch,
    field_stores,
)
from kd.cache.manifest import Manifest
from kd.cache.reader import ShardRows, read_manifest, shard_records
from kd.errors import KDError
from kd.io import sha256_file


def _check_block(lp: np.ndarray, ids: np.ndarray, vocab: int) -> str | None:
    """Sanity of one sequence's stored log-probs/ids [T, k]; returns a description of the first problem."""
    lp32 = lp.astype(np.float32)
    if not np.isfinite(lp32).all():
        return "log-probs are not finite"
    if (lp32 > 0).any():
        return "log-probs are positive"
    if (np.diff(lp32, axis=-1) > 0).any():
        return "log-probs are not sorted in descending order"
    mass = np.exp(lp32).sum(-1)
    if (mass > 1 + 1e-3).any():
        return f"probabilities sum to {mass.max():.6f} > 1 + 1e-3"
    if (ids.astype(np.int64) >= vocab).any() or (ids.astype(np.int64) < 0).any():
        return f"token ids outside [0, {vocab})"
    if ids.shape[-1] > 1 and (np.diff(np.sort(ids, axis=-1), axis=-1) == 0).any():
        return "a position repeats a token id in its top-k"
    return None


def _check_sequence(row, stores: dict, vocab: int, n_samples: int) -> str | None:
    """Decode one sequence of an open shard (`row`: ShardRows.row) through every field's Store, each row checked
    against its checksum, and check the values; returns the first problem."""
    decoded = {name: value for store in stores.values() for name, value in zip(store.outputs, store.decode(row))}
    problem = _check_block(decoded["topk_logprobs"], decoded["topk_ids"], vocab)
    if (
        problem is None
        and "hidden_states" in decoded
        and not np.isfinite(decoded["hidden_states"].astype(np.float32)).all()
    ):
        problem = "hidden states are not finite"
    if problem is None and "sample_ids" in decoded:
        ids, counts = decoded["sample_ids"], decoded["sample_counts"]
        if (counts.sum(-1) != n_samples).any() or (ids >= vocab).any():
            problem = f"sampled counts do not sum to {n_samples} or sampled ids are out of range"
    return problem


def verify(path: str | Path, log=print) -> list[str]:
    """Re-check a cache; returns the problems found (empty when the cache is sound). Stops at the first bad shard."""
    import h5py

    root = Path(path)
    manifest = read_manifest(root)  # as read: each shard's datasets are checked against it (dataset_mismatch)
    info = Manifest.of(manifest)
    T, vocab, n_samples, specs = info.seq_len, info.teacher.vocab_size, info.sample_n, info.codecs
    basis = None
    if specs["hidden_states"]["name"] == "lowrank" and info.hidden_layers:  # no layers stored: no basis fitted
        try:
            basis = HiddenBasis.load(root / BASIS_FILE, specs["hidden_states"].get("basis_sha256"))
        except KDError as e:
            return [str(e)]
        log(f"ok {BASIS_FILE}: rank {basis.rank}, variance kept {basis.variance_kept()}")
    stores = field_stores(specs, info.dims, basis)
    for split, split_info in info.splits.items():
        # the teacher's per-window scores summed (format 8 on), and the windows a writer had no teacher to score
        expected_next, scores, unscored = 0, np.zeros(len(TEACHER_SCORE_COLUMNS)), 0
        try:
            records = shard_records(root, manifest, split)
        except KDError as e:
            return [str(e)]
        for shard in records:
            p = root / shard["file"]
            where = f"shard {shard['file']}"
            if not p.exists():
                return [f"{where}: file is missing"]
            if sha256_file(p) != shard["sha256"]:
                return [f"{where}: sha256 does not match the manifest (the file changed or is damaged)"]
            try:
                f = h5py.File(p, "r")
            except OSError as e:
                return [f"{where}: not a readable HDF5 file ({e})"]
            with f:
                n = shard["num_sequences"]
                problem = dataset_mismatch(f, manifest, n)
                if problem:
                    return [f"{where}: {problem}"]
                meta = json.loads(f.attrs[META_ATTR])
                if meta.get("format_version") != info.format_version or meta.get("split") != split:
                    return [f"{where}: its metadata does not match the manifest"]
                seq_index = f["sequence_index"][:]
                if shard["first_sequence"] != expected_next or not np.array_equal(
                    seq_index, np.arange(expected_next, expected_next + n)
                ):
                    return [f"{where}: sequence indices are not contiguous from {expected_next}"]
                lengths = f["lengths"][:]
                if int(lengths.sum()) != shard["num_tokens"] or (lengths < 2).any() or (lengths > T).any():
                    return [f"{where}: lengths are inconsistent with the manifest"]
                if "teacher_score" in f:
                    rows_score = f["teacher_score"][:]
                    recorded = ~np.isnan(rows_score).all(axis=1)  # NaN rows: "not recorded"
                    got = rows_score[recorded]
                    if not np.isfinite(got).all() or (got < 0).any() or (got[:, 1:] != np.round(got[:, 1:])).any():
                        return [f"{where}: its teacher scores are not sums (finite, >= 0, whole counts)"]
                    if (got[:, 1] > lengths[recorded] - 1).any():  # at most tokens 1 .. L-1 are scored
                        return [f"{where}: its teacher scores count more targets than its windows hold"]
                    scores += got.sum(0)
                    unscored += int((~recorded).sum())
                problem = next(filter(None, (store.check_shard(f) for store in stores.values())), None)
                if problem:
                    return [f"{where}: {problem}"]
                try:
                    rows = ShardRows(f)
                except ValueError as e:
                    return [f"{where}: {e}"]
                for i in range(n):
                    try:
                        problem = _check_sequence(rows.row(i), stores, vocab, n_samples)
                    except (ValueError, IndexError) as e:  # a truncated or garbled packed field
                        problem = f"cannot decode: {e}"
                    if problem:
                        return [f"{where}, sequence {int(seq_index[i])} of split {split}: {problem}"]
            expected_next += n
            log(f"ok {shard['file']}: {n} sequences, {shard['num_tokens']} tokens")
        if expected_next != split_info.num_sequences:
            return [f"split {split}: shards hold {expected_next} sequences, manifest says {split_info.num_sequences}"]
        total = split_info.teacher_score
        if (
            info.format_version >= WINDOW_SCORES_SINCE and total
        ):  # the windows' scores add up to the split's, kept in the manifest
            if unscored:
                return [
                    f"split {split}: {unscored} window(s) carry no teacher score, and the manifest gives the split's"
                ]
            nats, *counts = scores
            want = [total[c] for c in TEACHER_SCORE_COLUMNS[1:]]  # tokens, characters, bytes
            if counts != want or not math.isclose(nats, total["nats"], rel_tol=1e-9, abs_tol=1e-6):
                return [
                    f"split {split}: the windows' teacher scores (nats {nats:.6f}, counts {[int(c) for c in counts]}) "
                    f"do not add up to the manifest's (nats {total['nats']:.6f}, counts {want})"
                ]
    return []


def summary(path: str | Path) -> str:
    m = Manifest.of(read_manifest(path))
    t = m.teacher
    lines = [
        f"{FORMAT} v{m.format_version} at {path}",
        f"teacher   {t.name_or_path} ({t.model_type}, vocab {t.vocab_size}, hidden {t.hidden_size}, dtype {t.dtype})",
        f"tokenizer fingerprint {m.tokenizer.fingerprint[:16]}...",
        f"stored    top-{m.top_k} ids+log-probs, hidden layers {m.hidden_layers}, seq_len {m.seq_len}, "
        f"sampled targets n={m.sample_n}",
        "codecs    " + ", ".join(f"{k}: {describe(v)}" for k, v in m.codecs.items()),
    ]
    if m.chat is not None:
        c = m.chat
        lines.append(
            f"chat      loss on {c.loss_mask} tokens, {c.packing} packing ({c.attention}), template: "
            f"{c.template}; {m.ingest.get('truncated', 0)} conversations cut to seq_len, "
            f"{m.ingest.get('dropped', 0)} dropped"
        )
    for split, info in m.splits.items():
        lines.append(
            f"{split:<9} {info.num_sequences} sequences, {info.num_tokens} tokens, {info.num_shards} shards, "
            f"{info.num_documents} documents"
        )
        score = info.teacher_score
        if score:  # kd/textscore.py: comparable with any student's eval, whatever its tokenizer (chat: loss tokens)
            lines.append(
                f"          teacher's own score: CE {score['ce_per_token']:.4f} nats/token, "
                f"{score['bits_per_char']:.4f} bits/char, {score['bits_per_byte']:.4f} bits/byte "
                f"({score['tokens']} targets, {score['chars']} characters)"
            )
    lines.append(f"size      {m.bytes} bytes, {m.bytes_per_token:.0f} bytes/token")
    return "\n".join(lines)
