"""The caching pass's plan before it runs (`kd cache --dry-run`): how many windows, shards and bytes a config will
write, and whether the disk holds them, from the teacher's config.json, the corpus's file sizes and a small sample
of it tokenized: no weights loaded, nothing written to the output directory.

How: the first ~`SAMPLE_BYTES` of every source are ingested exactly as the pass would (the same split, formats and
packing: kd.data.ingest.process_unit) into a temporary folder, and the windows per input byte found there are
scaled to the source's size. A source no bigger than the sample is ingested whole, so its counts are the pass's own.
Bytes per window come from the shard format (kd.cache.format.sequence_bytes: exact for the fixed-size fields; the
sampled targets' and the text's share estimated, see there) plus HDF5's chunk index.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kd.cache.format import SPLITS, Dims, row_datasets, sequence_bytes
from kd.data.ingest import IngestSpec, process_unit
from kd.data.sources import Unit, plan_file_units

SAMPLE_BYTES = 4 << 20  # input sampled per source: a few seconds of tokenizing
# HDF5's own bytes beside the data, as (estimate, bound), measured on shards of 8 and of 193-370 sequences of 32
# tokens: ~32 KiB per shard (the datasets' headers and first index nodes) and ~80 bytes of chunk index per sequence
# and dataset chunked one sequence per chunk (every row dataset but the ragged sampled targets' bytes and the text's
# variable-length strings); the bounds are the format's own (kd.cache.format.shard_sequences: 1 KiB per chunk).
# Format 8's contiguous teacher_score adds ~1 KiB of header per shard (its data is in sequence_bytes).
CHUNK_INDEX_BYTES = (80, 1024)
NOT_PER_SEQUENCE_CHUNKS = ("sample_bytes", "text")
SHARD_OVERHEAD = (33 << 10, 64 << 10)


def cache_bytes(meta: dict, sequences: int, shards: int) -> tuple[int, int]:
    """(estimate, bound) of the bytes `sequences` sequences take in `shards` shards of the cache `meta` describes:
    the stored fields (kd.cache.format.sequence_bytes) plus HDF5's chunk index and per-shard structures."""
    rows = row_datasets(meta["codecs"], Dims.of(meta))
    chunked = len([r for r in rows if r not in NOT_PER_SEQUENCE_CHUNKS])
    return tuple(
        int(sequences * (b + index * chunked) + shards * overhead)
        for b, index, overhead in zip(sequence_bytes(meta), CHUNK_INDEX_BYTES, SHARD_OVERHEAD)
    )


@dataclass(frozen=True)
class CachePlan:
    """What a cache config will write, estimated. `windows`/`tokens` per split after the caps; bytes as (estimate,
    upper bound); `exact` when every source was small enough to be ingested whole."""

    input_bytes: int | None
    sampled_bytes: int
    exact: bool
    windows: dict[str, int]
    tokens: dict[str, int]
    sequences_per_shard: int
    shards: int
    bytes: tuple[int, int]
    free_bytes: int
    output_dir: Path

    @property
    def bytes_per_token(self) -> float:
        return self.bytes[0] / max(sum(self.tokens.values()), 1)

    def lines(self) -> list[str]:
        gib = 2**30
        scope = "ingested whole: exact" if self.exact else f"{self.sampled_bytes / 2**20:.1f} MiB sampled, scaled"
        size = "unknown (a streamed dataset)" if self.input_bytes is None else f"{self.input_bytes / 2**20:,.1f} MiB"
        fits = (
            "fits"
            if self.bytes[1] <= self.free_bytes
            else "may NOT fit"
            if self.bytes[0] <= self.free_bytes
            else "does NOT fit"
        )
        return [
            f"input       {size} ({scope})",
            "windows     " + ", ".join(f"{s} {self.windows[s]:,} ({self.tokens[s]:,} tokens)" for s in SPLITS),
            f"shards      {self.shards:,} of up to {self.sequences_per_shard:,} sequences",
            f"cache       {self.bytes[0] / gib:,.3f} GiB (up to {self.bytes[1] / gib:,.3f}), {self.bytes_per_token:,.0f} "
            "bytes per token",
            f"disk        {self.free_bytes / gib:,.1f} GiB free at {self.output_dir}: {fits}",
            "not estimated: time (it depends on the device; bench/bench_cache.py measures tokens/s), the ingest "
            "windows kept while the pass runs (deleted at the end), and for a streamed dataset its size",
        ]


def source_sample(units: list[Unit], spec: IngestSpec) -> tuple[list[Unit], int, int, bool]:
    """(the first units of one local source holding >= SAMPLE_BYTES of input, their input bytes, the source's, and
    whether they are the whole source). A source that fits the sample is cut as the pass cuts it."""
    total = sum(p.end - p.start for u in units for p in u.pieces)
    if total <= SAMPLE_BYTES:
        return units, total, total, True
    files = list(dict.fromkeys(p.path for u in units for p in u.pieces))
    sample, size = [], 0
    for unit in plan_file_units(files, min(SAMPLE_BYTES, spec.unit_bytes), units[0].source):
        sample.append(unit)
        size += sum(p.end - p.start for p in unit.pieces)
        if size >= SAMPLE_BYTES:
            break
    return sample, size, total, False


def plan_cache(meta: dict, spec: IngestSpec, tokenizer, sources: list, output_dir: Path) -> CachePlan:
    """The plan of a cache with this description (kd.cache.manifest.cache_metadata), ingest spec and sources
    (kd.data.sources.config_sources)."""
    uncapped = dataclasses.replace(spec, caps={s: None for s in SPLITS})
    windows = {s: 0.0 for s in SPLITS}
    tokens = {s: 0.0 for s in SPLITS}
    sampled, all_bytes, exact = 0, 0, True
    work = Path(tempfile.mkdtemp(prefix="kd-plan-"))
    try:
        for units, forced in sources:
            units = list(units)
            if not units:
                continue
            if units[0].documents_fn is not None:  # a dataset stream: its first unit, its size unknown
                sample, size, total, whole = units[:1], 0, None, False
            else:
                sample, size, total, whole = source_sample(units, spec)
            got = {"windows": {s: 0 for s in SPLITS}, "tokens": {s: 0 for s in SPLITS}, "chars": 0}
            for unit in sample:
                m = process_unit(
                    unit,
                    uncapped,
                    tokenizer,
                    {s: False for s in SPLITS},
                    forced,
                    work / f"{unit.name}.h5",
                    lambda *a: None,
                )
                for s in SPLITS:
                    got["windows"][s] += m["windows"][s]
                    got["tokens"][s] += m["tokens"][s]
                got["chars"] += m["chars"]
            if total is None:  # a stream: report the sample's own counts and say the size is unknown
                scale, all_bytes = 1.0, None
            else:
                size = size or 1
                scale = total / size
                all_bytes = None if all_bytes is None else all_bytes + total
            sampled += size or got["chars"]
            exact = exact and whole
            if forced is None and not whole:  # a sample holds few documents: the hash split's shares are expected
                share = {"train": 1 - spec.eval_fraction, "eval": spec.eval_fraction}
                for key in ("windows", "tokens"):
                    got[key] = {s: sum(got[key].values()) * share[s] for s in SPLITS}
            for s in SPLITS:
                windows[s] += got["windows"][s] * scale
                tokens[s] += got["tokens"][s] * scale
    finally:
        shutil.rmtree(work, ignore_errors=True)
    capped = {}
    for s in SPLITS:
        w = round(windows[s])
        cap = spec.caps[s]
        capped[s] = w if cap is None else min(w, cap)
        tokens[s] = round(tokens[s] * capped[s] / w) if w else 0
    per_shard = meta["sequences_per_shard"]
    shards = sum(-(-capped[s] // per_shard) for s in SPLITS)
    total_bytes = cache_bytes(meta, sum(capped.values()), shards)
    probe = output_dir
    while not probe.exists():  # the nearest existing folder: the disk the cache will be written to
        probe = probe.parent
    return CachePlan(
        input_bytes=all_bytes,
        sampled_bytes=sampled,
        exact=exact,
        windows=capped,
        tokens={s: int(tokens[s]) for s in SPLITS},
        sequences_per_shard=per_shard,
        shards=shards,
        bytes=total_bytes,
        free_bytes=shutil.disk_usage(probe).free,
        output_dir=output_dir,
    )
