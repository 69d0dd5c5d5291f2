"""Checking and describing a cache: `verify` (every checksum, shape and log-prob sanity) and `summary` (info)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kd.cache.basis import BASIS_FILE, HiddenBasis
from kd.cache.codecs import describe, sample_codec
from kd.cache.format import (
    FORMAT,
    META_ATTR,
    Dims,
    coded_fields,
    dataset_mismatch,
    field_codecs,
    field_shapes,
    manifest_codecs,
)
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


def _check_sequence(row, fields: dict, samples, shapes: dict, vocab: int, n_samples: int) -> str | None:
    """Decode one sequence of an open shard (`row`: ShardRows.row; `fields`: name -> codec; `samples`: the sampled
    targets' codec, or None) and check it; returns the first problem."""
    decoded = {name: codec.decode(row, name, shapes[name]) for name, codec in fields.items()}
    problem = _check_block(decoded["topk_logprobs"], decoded["topk_ids"], vocab)
    if (
        problem is None
        and "hidden_states" in decoded
        and not np.isfinite(decoded["hidden_states"].astype(np.float32)).all()
    ):
        problem = "hidden states are not finite"
    if problem is None and samples is not None:
        ids, counts = samples.decode(row)
        if (counts.sum(-1) != n_samples).any() or (ids >= vocab).any():
            problem = f"sampled counts do not sum to {n_samples} or sampled ids are out of range"
    return problem


def verify(path: str | Path, log=print) -> list[str]:
    """Re-check a cache; returns the problems found (empty when the cache is sound). Stops at the first bad shard."""
    import h5py

    root = Path(path)
    manifest = read_manifest(root)
    T, vocab = manifest["seq_len"], manifest["teacher"]["vocab_size"]
    n_samples = manifest.get("sample_n", 0)
    specs, shapes = manifest_codecs(manifest), field_shapes(manifest)
    basis = None
    if specs["hidden_states"]["name"] == "lowrank":
        try:
            basis = HiddenBasis.load(root / BASIS_FILE, specs["hidden_states"].get("basis_sha256"))
        except KDError as e:
            return [str(e)]
        log(f"ok {BASIS_FILE}: rank {basis.rank}, variance kept {basis.variance_kept()}")
    dims = Dims.of(manifest)
    fields = field_codecs(specs, [f.name for f in coded_fields(dims)], basis)
    samples = sample_codec(specs["samples"], T, n_samples) if n_samples else None
    for split, info in manifest["splits"].items():
        expected_next = 0
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
                if meta.get("format_version") != manifest["format_version"] or meta.get("split") != split:
                    return [f"{where}: its metadata does not match the manifest"]
                seq_index = f["sequence_index"][:]
                if shard["first_sequence"] != expected_next or not np.array_equal(
                    seq_index, np.arange(expected_next, expected_next + n)
                ):
                    return [f"{where}: sequence indices are not contiguous from {expected_next}"]
                lengths = f["lengths"][:]
                if int(lengths.sum()) != shard["num_tokens"] or (lengths < 2).any() or (lengths > T).any():
                    return [f"{where}: lengths are inconsistent with the manifest"]
                problem = samples.check_shard(f) if samples is not None else None
                if problem:
                    return [f"{where}: {problem}"]
                try:
                    rows = ShardRows(f)
                except ValueError as e:
                    return [f"{where}: {e}"]
                for i in range(n):
                    try:
                        problem = _check_sequence(rows.row(i), fields, samples, shapes, vocab, n_samples)
                        for ds in ("text", "token_spans"):  # not decoded above, but checksummed like the rest
                            if ds in rows.col:
                                rows.get(ds, i)
                    except (ValueError, IndexError) as e:  # a truncated or garbled packed field
                        problem = f"cannot decode: {e}"
                    if problem:
                        return [f"{where}, sequence {int(seq_index[i])} of split {split}: {problem}"]
            expected_next += n
            log(f"ok {shard['file']}: {n} sequences, {shard['num_tokens']} tokens")
        if expected_next != info["num_sequences"]:
            return [f"split {split}: shards hold {expected_next} sequences, manifest says {info['num_sequences']}"]
    return []


def summary(path: str | Path) -> str:
    m = read_manifest(path)
    lines = [
        f"{FORMAT} v{m['format_version']} at {path}",
        f"teacher   {m['teacher']['name_or_path']} ({m['teacher']['model_type']}, vocab {m['teacher']['vocab_size']}, "
        f"hidden {m['teacher']['hidden_size']}, dtype {m['teacher']['dtype']})",
        f"tokenizer fingerprint {m['tokenizer']['fingerprint'][:16]}...",
        f"stored    top-{m['top_k']} ids+log-probs, hidden layers {m['hidden_layers']}, seq_len {m['seq_len']}, "
        f"sampled targets n={m.get('sample_n', 0)}",
        "codecs    " + ", ".join(f"{k}: {describe(v)}" for k, v in manifest_codecs(m).items()),
    ]
    if "chat" in m:
        c, ing = m["chat"], m.get("ingest", {})
        lines.append(
            f"chat      loss on {c['loss_mask']} tokens, {c['packing']} packing ({c['attention']}), template: "
            f"{c['template']}; {ing.get('truncated', 0)} conversations cut to seq_len, {ing.get('dropped', 0)} dropped"
        )
    for split, info in m["splits"].items():
        lines.append(
            f"{split:<9} {info['num_sequences']} sequences, {info['num_tokens']} tokens, "
            f"{info['shard_index']['num_shards'] if 'shard_index' in info else len(info['shards'])} shards, "
            f"{info.get('num_documents', len(info.get('documents', [])))} documents"
        )
        score = info.get("teacher_score")
        if score:  # kd/textscore.py: comparable with any student's eval, whatever its tokenizer (chat: loss tokens)
            lines.append(
                f"          teacher's own score: CE {score['ce_per_token']:.4f} nats/token, "
                f"{score['bits_per_char']:.4f} bits/char, {score['bits_per_byte']:.4f} bits/byte "
                f"({score['tokens']} targets, {score['chars']} characters)"
            )
    lines.append(f"size      {m['bytes']} bytes, {m['bytes_per_token']:.0f} bytes/token")
    return "\n".join(lines)
