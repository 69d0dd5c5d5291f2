"""The teacher cache: a directory of self-describing HDF5 shards plus `manifest.json`.

Layout of DIR (format version 8; versions 1 to 7 are still read; docs/formats.md lists what each added):
    cache_config.json        resolved config of the run that writes DIR (written once the input is ingested; re-runs are
                             checked against it)
    ingest/, .lock           only while the cache is being built: the packed windows (kd/data/ingest.py), and the
                             writing run's flock (kd/io.py)
    manifest.json            written last, by rank 0, once every shard is complete: the cache is usable iff it exists;
                             its `codecs` record says how each field is stored (see kd/cache/codecs.py)
    hidden_basis.h5          only with the `lowrank` hidden-state codec: the per-layer basis (kd/cache/basis.py),
                             written before any shard
    train-00000.h5 ...       shards; shard j holds sequences [j*S, (j+1)*S) of its split (S: the manifest's
                             sequences_per_shard, from cache.shard_bytes or given)
    train-00000.json ...     sidecar per shard: sha256, counts and config hash; written before the shard's rename
    train-shards.npy ...     per split, one binary record per shard (format.SHARD_RECORD), written with the manifest
    eval-00000.h5 ...

Fields of each sequence, as the reader returns them (T = seq_len, k = top_k, L = stored layers, H = teacher hidden):
    input_ids       [T]          token ids (plain uint16 when the vocabulary fits, else int32); padding past `length`
    lengths         [N]          (per shard) int32 valid tokens per sequence (only a split's last window is short)
    sequence_index  [N]          (per shard) int64 index of each sequence within its split
    topk_ids        [T, k]       sorted by descending probability; plain, or `bitpack` ([N, bytes] uint8 on disk)
    topk_logprobs   [T, k]       log p(token | prefix) under the FULL teacher softmax at T=1, so the tail mass
                                 1 - sum(exp(topk_logprobs)) is exact up to rounding; plain fp16/fp32, or `q8`
                                 (uint8 plus `topk_logprobs_q8` [N, T, 2] fp32 anchor and step per position)
    hidden_states   [L, T, H]    only when layers are stored; layer j is hidden_states[j] of the HF
                                 `output_hidden_states` tuple (0 = embeddings); plain fp16/fp32, `q8` per token,
                                 or `lowrank` (coefficients [L, T, r] on the cache's basis; decoded to [L, T, H])
    sample_ids      [T, n]       only when sample_n > 0: distinct ids among n draws from the full teacher
    text            str          only when store_text: the window's text (documents' text, separators as the
                                 separator token's string), for re-tokenizing it with another tokenizer
    token_spans     [T, 2]       only when store_text: [start, end) character span of each teacher token in `text`
    sample_counts   [T, n]       distribution (T = 1), most frequent first, counts sum to n, 0 = padding. On disk
                                 plain [N, T, n] arrays, or `ragged`: one byte string per sequence in `sample_bytes`
                                 with [start, end) in `sample_offsets` [N + 1]
    loss_mask       [T]          only in a chat cache (format 7 on): the tokens the losses count
    segments        [T]          only in a chat cache: each token's conversation in its window (1, 2, ...; 0 = padding)
    teacher_score   [N, 4]       (per shard, format 8 on) float64 the teacher's own score on each window: nats on its
                                 scored targets, their count, characters and bytes (kd/textscore.py)
Position t's targets describe the token at t+1. Every fixed-size dataset is chunked one sequence per chunk, so
reading sequence i touches one chunk per dataset. `checksums` [N, D] uint64 holds kd.cache.checksum of each
sequence's row of each of the D datasets its attribute `rows` names, and its attribute `whole` the checksums of the
whole-shard datasets (lengths, sequence_index, sample_offsets, teacher_score); the reader checks both (ShardRows).
Each shard's attribute `kd_meta` (JSON) repeats the cache-wide metadata plus the shard's own split, index and counts.

Commands:
    python -m kd.cache info DIR      summary of a cache
    python -m kd.cache verify DIR    re-check checksums, shapes and log-prob sanity; exit 1 at the first bad shard
    python -m kd.cache export DIR OUT   the splits as a Hugging Face datasets folder of Parquet files (kd/cache/export.py)

Modules: format.py (constants, the table of fields, what a shard holds), codecs.py (the codec registry and
each field's Store),
basis.py (the low-rank basis), writer.py (ShardWriter), reader.py (TeacherCache, CacheSplit), verify.py
(verify, summary), export.py, __main__.py (the commands).
"""

from __future__ import annotations

from kd.cache import codecs  # noqa: F401
from kd.cache.basis import BASIS_FILE, BasisFit, HiddenBasis  # noqa: F401
from kd.cache.format import (  # noqa: F401
    CONFIG_FILE,
    FIELDS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MAX_OPEN_FILES,
    META_ATTR,
    SHARD_DATASETS,
    SHARD_RECORD,
    SPLITS,
    WINDOW_SCORES_SINCE,
    checksum,
    dataset_mismatch,
    field_stores,
    manifest_codecs,
    row_datasets,
    sequence_bytes,
    shard_index_name,
    shard_name,
    shard_sequences,
    sidecar_path,
    stored_fields,
)
from kd.cache.reader import (  # noqa: F401
    CacheSplit,
    ShardRows,
    TeacherCache,
    TeacherReference,
    read_manifest,
    shard_records,
    shard_table,
)
from kd.cache.verify import summary, verify  # noqa: F401
from kd.cache.writer import ShardWriter, complete_shard_info, write_shard_index  # noqa: F401
from kd.io import sha256_file, write_json_atomic  # noqa: F401
