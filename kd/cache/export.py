"""Export a teacher cache as a Hugging Face `datasets` folder of Parquet files with plain columns.

    python -m kd.cache export DIR OUT [--splits train eval] [--rows-per-file 4096]

OUT/<split>/data-NNNNN.parquet plus OUT/README.md whose YAML header maps each folder to its split, so that
`datasets.load_dataset(OUT)` returns the splits by name (and pandas/pyarrow read the files directly). One row per
cached sequence, every column decoded (no kd codec is needed to read it), padding removed (T = `length`):

    sequence_index   int64                  the sequence's index in its split
    input_ids        list<int32>   [T]      teacher token ids
    target_token_ids list<list<int32>> [T][k]  the teacher's top-k ids at each position, most probable first
    target_logprobs  list<list<float32>> [T][k] their log-probs under the full softmax at temperature 1
    target_mask      list<list<int8>> [T][k]  1 for every stored entry (all of them; kept for trainers that expect it)
    sample_ids       list<list<int32>> [T][m_t]  (caches with sampled targets) distinct drawn ids, most frequent first
    sample_counts    list<list<int32>> [T][m_t]  their counts, summing to sample_n at every position
    text, token_spans                        (caches with text) the window's text and each token's [start, end)
    loss_mask        list<int8>    [T]      (chat caches) 1 where the token is a training target (the assistant's)
    position_ids     list<int32>   [T]      (chat caches) positions restarting at each packed conversation: a
                                            conversation attends only within its own run of positions

Position t describes the teacher's prediction of token t+1, as HF logits do. The column names and shapes of the
top-k targets are those of axolotl's KD plugin datasets (`target_token_ids`, `target_logprobs`, `target_mask`,
per position). Hidden states are not exported (hundreds of bytes per token; read them with kd.cache.TeacherCache).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from kd.cache.manifest import Manifest
from kd.cache.reader import TeacherCache
from kd.data.pack import segment_positions
from kd.errors import KDError
from kd.io import staged_dir

EXPORT_FORMAT = "kd-teacher-cache-export"


def _row(item: dict, with_samples: bool, with_text: bool, with_chat: bool = False) -> dict:
    n = int(item["length"])
    row = {
        "sequence_index": int(item["sequence_index"]),
        "input_ids": item["input_ids"][:n].numpy().astype(np.int32),
        "target_token_ids": item["topk_ids"][:n].numpy().astype(np.int32),
        "target_logprobs": item["topk_logprobs"][:n].float().numpy(),
    }
    row["target_mask"] = np.ones_like(row["target_token_ids"], dtype=np.int8)
    if with_samples:
        ids, counts = item["sample_ids"][:n].numpy(), item["sample_counts"][:n].numpy()
        present = counts > 0
        row["sample_ids"] = [ids[t][present[t]].astype(np.int32) for t in range(n)]
        row["sample_counts"] = [counts[t][present[t]].astype(np.int32) for t in range(n)]
    if with_text:
        row["text"] = item["text"]
        row["token_spans"] = item["token_spans"][:n].numpy().astype(np.int32)
    if with_chat:
        row["loss_mask"] = item["loss_mask"][:n].numpy().astype(np.int8)
        row["position_ids"] = segment_positions(item["segments"][None, :n])[0].numpy().astype(np.int32)
    return row


def _table(rows: list[dict]):
    import pyarrow as pa

    columns = {}
    for name in rows[0]:
        values = [r[name] for r in rows]
        if name in ("sequence_index", "text"):
            columns[name] = pa.array(values)
        elif name in ("input_ids", "position_ids"):
            columns[name] = pa.array([v.tolist() for v in values], pa.list_(pa.int32()))
        elif name == "loss_mask":
            columns[name] = pa.array([v.tolist() for v in values], pa.list_(pa.int8()))
        else:  # per position: a list of lists
            inner = {"target_logprobs": pa.float32(), "target_mask": pa.int8()}.get(name, pa.int32())
            columns[name] = pa.array([[list(p) for p in v] for v in values], pa.list_(pa.list_(inner)))
    return pa.table(columns)


def export(
    cache_dir: str | Path, out: str | Path, splits: list[str] | None = None, rows_per_file: int = 4096, log=print
) -> Path:
    import pyarrow.parquet as pq

    cache = TeacherCache(cache_dir)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KDError(f"{out} exists and is not a directory; export into a new directory")
    if out.exists() and any(out.iterdir()):
        raise KDError(f"{out} is not empty; export into a new directory")
    info = cache.info  # the typed manifest (kd.cache.manifest.Manifest)
    splits = splits or list(info.splits)
    unknown = sorted(set(splits) - set(info.splits))
    if unknown:
        raise KDError(f"cache {cache_dir} has no split(s) {unknown} (it has {sorted(info.splits)})")
    with_samples, with_text, with_chat = bool(info.sample_n), info.store_text, info.chat is not None
    fields = (
        ["input_ids", "topk_ids", "topk_logprobs"]
        + (["sample_ids", "sample_counts"] if with_samples else [])
        + (["text", "token_spans"] if with_text else [])
        + (["loss_mask", "segments"] if with_chat else [])
    )
    # built at OUT.partial and renamed when whole (kd.io.staged_dir): an export stopped by a full disk or Ctrl-C
    # leaves nothing that loads as a partial dataset, and nothing that blocks the re-run
    with staged_dir(out) as tmp:
        for split in splits:
            reader = cache.split(split, fields)
            (tmp / split).mkdir(parents=True)
            n_files = max(1, -(-len(reader) // rows_per_file))
            for f in range(n_files):
                rows = [
                    _row(reader[i], with_samples, with_text, with_chat)
                    for i in range(f * rows_per_file, min((f + 1) * rows_per_file, len(reader)))
                ]
                pq.write_table(_table(rows), tmp / split / f"data-{f:05d}-of-{n_files:05d}.parquet")
            log(f"[export] {split}: {len(reader)} sequences in {n_files} Parquet file(s)")
        write_readme(tmp, info, splits)
    return out


def write_readme(out: Path, info: Manifest, splits: list[str]) -> None:
    """OUT/README.md: the YAML header mapping each folder to its split, and what the cache was."""
    import yaml

    header = {
        "configs": [{"config_name": "default", "data_files": [{"split": s, "path": f"{s}/*.parquet"} for s in splits]}]
    }
    source = {
        "format_version": info.format_version,
        "teacher": asdict(info.teacher),
        "tokenizer": asdict(info.tokenizer),
        "top_k": info.top_k,
        "sample_n": info.sample_n,
        "seq_len": info.seq_len,
    }
    (out / "README.md").write_text(
        "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n"
        f"Teacher cache exported by kd ({EXPORT_FORMAT}): teacher `{info.teacher.name_or_path}` "
        f"(vocabulary {info.teacher.vocab_size}), top-{info.top_k} log-probs"
        + (f", {info.sample_n} sampled targets per position" if info.sample_n else "")
        + f", windows of {info.seq_len} tokens. Columns: see kd/cache/export.py.\n\nManifest of the source cache:\n\n"
        + "```json\n"
        + json.dumps(source, indent=1)
        + "\n```\n"
    )
