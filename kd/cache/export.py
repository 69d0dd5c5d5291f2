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
    teacher_nats     float64                (format 8 on) the teacher's own score on the window: its nats on
    teacher_scored_tokens, teacher_chars,   the scored targets, their count, the characters and bytes they
    teacher_bytes    int64                  cover (null where the caching pass scored none); summed over rows
                                            that have one: the teacher's CE per token and bits per character there

Position t describes the teacher's prediction of token t+1, as HF logits do. The column names and shapes of the
top-k targets are those of axolotl's KD plugin datasets (`target_token_ids`, `target_logprobs`, `target_mask`,
per position). Hidden states are not exported (hundreds of bytes per token; read them with kd.cache.TeacherCache).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kd.cache.format import TEACHER_SCORE_COLUMNS, WINDOW_SCORES_SINCE
from kd.cache.manifest import Manifest
from kd.cache.reader import TeacherCache
from kd.data.pack import segment_positions
from kd.errors import KDError
from kd.io import staged_dir

EXPORT_FORMAT = "kd-teacher-cache-export"


# values per record batch: a batch's rows are built as flat numpy arrays and handed to Arrow whole, so memory is
# ~this many values per column whatever --rows-per-file (4,096 rows of 256 x top-256 are 268 M values; built as
# Python lists they took ~3 GB per 1,000 rows here). Also far below list<...>'s 32-bit offsets.
BATCH_VALUES = 1 << 22


# the export's column of each TEACHER_SCORE_COLUMNS entry: its nats, scored tokens, characters and bytes
SCORE_FIELDS = tuple(f"teacher_{c}" if c != "tokens" else "teacher_scored_tokens" for c in TEACHER_SCORE_COLUMNS)


@dataclass(frozen=True)
class Columns:
    """Which optional column groups a cache exports (module docstring): what its manifest says it holds."""

    samples: bool
    text: bool
    chat: bool
    score: bool  # format 8 on: the teacher's score per window

    @classmethod
    def of(cls, info: Manifest) -> Columns:
        return cls(
            bool(info.sample_n), info.store_text, info.chat is not None, info.format_version >= WINDOW_SCORES_SINCE
        )


def _schema(cols: Columns):
    import pyarrow as pa

    per_position = lambda t: pa.list_(pa.list_(t))  # noqa: E731
    fields = [
        ("sequence_index", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("target_token_ids", per_position(pa.int32())),
        ("target_logprobs", per_position(pa.float32())),
        ("target_mask", per_position(pa.int8())),
    ]
    if cols.samples:
        fields += [("sample_ids", per_position(pa.int32())), ("sample_counts", per_position(pa.int32()))]
    if cols.text:
        fields += [("text", pa.string()), ("token_spans", per_position(pa.int32()))]
    if cols.chat:
        fields += [("loss_mask", pa.list_(pa.int8())), ("position_ids", pa.list_(pa.int32()))]
    if cols.score:
        fields += [(name, pa.float64() if i == 0 else pa.int64()) for i, name in enumerate(SCORE_FIELDS)]
    return pa.schema(fields)


def _lists(sizes, values):
    """A list<...> Arrow array: consecutive runs of `sizes` elements of `values` (a numpy array, or an Arrow list
    array for lists of lists)."""
    import pyarrow as pa

    offsets = np.zeros(len(sizes) + 1, np.int32)
    np.cumsum(sizes, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values) if isinstance(values, np.ndarray) else values)


def _batch(items: list[dict], schema, cols: Columns, scores: np.ndarray | None):
    """One record batch of decoded rows, padding removed (module docstring), built from flat arrays; `scores`: the
    rows' teacher scores [len(items), 4] where cols.score."""
    import pyarrow as pa

    lengths = [int(it["length"]) for it in items]

    def flat(name: str, dtype) -> np.ndarray:  # [sum of lengths, ...]: every row's positions end to end
        return np.concatenate([it[name][:n].numpy() for it, n in zip(items, lengths)]).astype(dtype)

    def per_position(values_2d: np.ndarray):  # [positions, k] -> list<list<...>> per row
        k = values_2d.shape[1]
        return _lists(lengths, _lists(np.full(len(values_2d), k), values_2d.reshape(-1)))

    topk_ids = flat("topk_ids", np.int32)
    columns = {
        "sequence_index": pa.array([int(it["sequence_index"]) for it in items], pa.int64()),
        "input_ids": _lists(lengths, flat("input_ids", np.int32)),
        "target_token_ids": per_position(topk_ids),
        "target_logprobs": per_position(flat("topk_logprobs", np.float32)),
        "target_mask": per_position(np.ones_like(topk_ids, np.int8)),
    }
    if cols.samples:  # the drawn ids present at each position (count > 0), most frequent first, as stored
        ids, counts = flat("sample_ids", np.int32), flat("sample_counts", np.int32)
        present = counts > 0
        sizes = present.sum(1)
        columns["sample_ids"] = _lists(lengths, _lists(sizes, ids[present]))
        columns["sample_counts"] = _lists(lengths, _lists(sizes, counts[present]))
    if cols.text:
        columns["text"] = pa.array([it["text"] for it in items], pa.string())
        columns["token_spans"] = per_position(flat("token_spans", np.int32))
    if cols.chat:
        columns["loss_mask"] = _lists(lengths, flat("loss_mask", np.int8))
        positions = [segment_positions(it["segments"][None, :n])[0].numpy() for it, n in zip(items, lengths)]
        columns["position_ids"] = _lists(lengths, np.concatenate(positions).astype(np.int32))
    if cols.score:  # NaN rows (windows the caching pass did not score) become nulls, not a NaN and garbage counts
        unscored = np.isnan(scores).any(1)
        for i, name in enumerate(SCORE_FIELDS):
            values = scores[:, i] if i == 0 else np.nan_to_num(scores[:, i]).astype(np.int64)
            columns[name] = pa.array(values, mask=unscored)
    return pa.RecordBatch.from_arrays([columns[f.name].cast(f.type) for f in schema], schema=schema)


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
    cols = Columns.of(info)
    fields = (
        ["input_ids", "topk_ids", "topk_logprobs"]
        + (["sample_ids", "sample_counts"] if cols.samples else [])
        + (["text", "token_spans"] if cols.text else [])
        + (["loss_mask", "segments"] if cols.chat else [])
    )
    schema = _schema(cols)
    per_batch = max(1, BATCH_VALUES // (info.seq_len * max(info.top_k, info.sample_n, 1)))
    # built at OUT.partial and renamed when whole (kd.io.staged_dir): an export stopped by a full disk or Ctrl-C
    # leaves nothing that loads as a partial dataset, and nothing that blocks the re-run
    with staged_dir(out) as tmp:
        for split in splits:
            reader = cache.split(split, fields)
            (tmp / split).mkdir(parents=True)
            n_files = max(1, -(-len(reader) // rows_per_file))
            for f in range(n_files):
                first, end = f * rows_per_file, min((f + 1) * rows_per_file, len(reader))
                with pq.ParquetWriter(tmp / split / f"data-{f:05d}-of-{n_files:05d}.parquet", schema) as writer:
                    for a in range(first, end, per_batch):  # none for an empty split: a file of no rows
                        b = min(a + per_batch, end)
                        scores = reader.teacher_scores(b, start=a) if cols.score else None
                        writer.write_batch(_batch([reader[i] for i in range(a, b)], schema, cols, scores))
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
