"""How the cache's fields are stored: codecs as a registry, one class per codec (`REGISTRY`, `field_codec`), over
numpy encodings (lowrank decodes with torch), each exact or with a stated error bound, that decode a whole sequence
in a few vectorised operations (no Python loop per token). A field's codec is recorded in the manifest's `codecs` record as a spec
({"name": ..., parameters}); a new codec is one class here plus its round-trip tests.

    bitpack        integer ids at ceil(log2 V) bits each (16 for the 49,152 SmolLM vocabulary, 18 for Qwen's
                   151,936), little-endian bit order, one byte string per sequence. Exact.
    q8             8-bit log-probs/hidden states with one (anchor, step) fp32 pair per vector (per position for
                   log-probs, per token and layer for hidden states): x ~ anchor - q * step, q in 0..255, anchor
                   = the vector's maximum, step = (max - min) / 255. Hidden states round to nearest (within step
                   / 2, the maximum exact). Log-probs use the same rounding with the anchor shifted so the decoded
                   top-k mass equals the true one (`mass`): the tail mass stays exact and never negative; every
                   value within one step. KD-loss error is measured by bench/bench_codecs.py.
    ragged         sampled targets without padding: per position the number m of distinct ids and the number r
                   of them drawn more than once (both at count_bits), then all ids at id_bits, then only the
                   counts of those r ids (a once-drawn id has count 1 implicitly; ids are stored most frequent
                   first, so the repeated ones come first). One variable-length byte string per sequence.
    lowrank        hidden states as coefficients on a per-layer basis fitted on the teacher's own states at the
                   start of the caching pass (kd/cache/basis.py: the mean and the top-r principal directions of
                   each stored layer, in the cache directory, its sha256 in the spec): h ~ mean + c @ U^T, the
                   coefficients c = (h - mean) @ U stored q8 (per token and layer), fp16 or fp32. The error is the
                   variance outside the r directions (`variance_kept` in the spec, per layer) plus the
                   coefficients' rounding; with r = hidden size and fp32 coefficients it is exact up to fp32
                   rounding. The reader decodes to the full hidden size, so every feature loss runs unchanged.
Plain codecs ("plain" with a numpy dtype) store the array as is; format version 1 caches are read as all-plain.
"""

from __future__ import annotations

import math

import numpy as np

from kd.errors import KDError

Q8_LEVELS = 255


def bits_for(num_values: int) -> int:
    """Bits that hold every integer in [0, num_values)."""
    return max(1, math.ceil(math.log2(num_values))) if num_values > 1 else 1


# ---- bit packing --------------------------------------------------------------------------------------------


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative integers (< 2**bits, bits <= 32) -> uint8 bytes, `bits` per value, little-endian bit order."""
    v = np.ascontiguousarray(values, dtype=np.int64).ravel()
    if bits > 32 or bits < 1:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    if v.size and (v.min() < 0 or v.max() >= (1 << bits)):
        raise ValueError(f"values outside [0, 2**{bits}) cannot be packed at {bits} bits")
    as_bytes = v.astype("<u4").view(np.uint8).reshape(-1, 4)  # each value as 4 little-endian bytes
    bit_matrix = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits]  # [n, bits], low bit first
    return np.packbits(bit_matrix.ravel(), bitorder="little")


def unpack_bits(buf: np.ndarray, bits: int, count: int, bit_offset: int = 0) -> np.ndarray:
    """Inverse of `pack_bits`: `count` values of `bits` bits starting `bit_offset` bits into `buf`; int64."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    need = bit_offset + count * bits
    if need > 8 * buf.size:
        raise ValueError(f"packed buffer holds {8 * buf.size} bits, {need} needed: the data is truncated")
    flat = np.unpackbits(np.asarray(buf, dtype=np.uint8), count=need, bitorder="little")[bit_offset:]
    bit_matrix = np.zeros((count, 32), dtype=np.uint8)
    bit_matrix[:, :bits] = flat.reshape(count, bits)
    return np.packbits(bit_matrix, axis=1, bitorder="little").view("<u4").ravel().astype(np.int64)


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


# ---- 8-bit values with a per-vector anchor and step ----------------------------------------------------------


def q8_encode(x: np.ndarray, rounding: str = "nearest") -> tuple[np.ndarray, np.ndarray]:
    """x [..., d] float -> (q [..., d] uint8, params [..., 2] fp32 = (anchor, step)); see the module docstring.

    rounding "nearest": anchor = max(x), every value within step / 2, the maximum exact. "mass" (for log-probs): the
    same q, but the anchor is shifted so that sum(exp(decoded)) equals sum(exp(x)): the cached top-k probability
    mass, and so the tail mass 1 - sum(p), stay exact. Plain rounding can overstate that mass (with a confident
    teacher, past 1: a negative tail) or, rounding down, understate it by a systematic bias. The shift is a
    probability-weighted mean of rounding errors, so every value stays within one step."""
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("q8 cannot encode non-finite values")
    hi, lo = x.max(-1, keepdims=True), x.min(-1, keepdims=True)
    step = (hi - lo) / Q8_LEVELS
    safe = np.where(step > 0, step, 1.0)  # a constant vector: every q is 0, decoded exactly as the anchor
    q = np.clip(np.rint((hi - x) / safe), 0, Q8_LEVELS).astype(np.uint8)
    anchor = hi
    if rounding == "mass":
        x64, dq = x.astype(np.float64), -q.astype(np.float64) * step.astype(np.float64)
        anchor = (_logsumexp(x64) - _logsumexp(dq)).astype(np.float32)
    return q, np.concatenate([anchor, step], axis=-1).astype(np.float32)


def _logsumexp(a: np.ndarray) -> np.ndarray:
    m = a.max(-1, keepdims=True)
    return m + np.log(np.exp(a - m).sum(-1, keepdims=True))


def q8_decode(q: np.ndarray, params: np.ndarray) -> np.ndarray:
    params = np.asarray(params, dtype=np.float32)
    return params[..., :1] - q.astype(np.float32) * params[..., 1:2]


# ---- sampled targets, ragged ---------------------------------------------------------------------------------


def ragged_encode(ids: np.ndarray, counts: np.ndarray, id_bits: int, count_bits: int) -> np.ndarray:
    """One sequence's padded sampled targets (ids, counts [T, n]; counts 0 = padding; most frequent first) -> bytes."""
    counts = np.asarray(counts, dtype=np.int64)
    present = counts > 0
    m = present.sum(-1)
    if (present[:, 1:] & ~present[:, :-1]).any() or (np.diff(counts, axis=-1)[present[:, 1:]] > 0).any():
        raise ValueError("sampled targets must be sorted most frequent first with padding (count 0) last")
    repeated = counts > 1
    r = repeated.sum(-1)
    return np.concatenate(
        [
            pack_bits(np.concatenate([m, r]), count_bits),
            pack_bits(np.asarray(ids)[present], id_bits) if m.sum() else np.zeros(0, np.uint8),
            pack_bits(counts[repeated], count_bits) if r.sum() else np.zeros(0, np.uint8),
        ]
    )


def ragged_decode(
    buf: np.ndarray, seq_len: int, n: int, id_bits: int, count_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `ragged_encode`: (ids [T, n] int64, counts [T, n] int64), padded with id 0 / count 0."""
    T = seq_len
    header_bits = 2 * T * count_bits
    mr = unpack_bits(buf, count_bits, 2 * T)
    m, r = mr[:T], mr[T:]
    total_m, total_r = int(m.sum()), int(r.sum())
    flat_ids = unpack_bits(buf, id_bits, total_m, bit_offset=_byte_aligned(header_bits))
    id_end = _byte_aligned(header_bits) + _byte_aligned(total_m * id_bits)
    flat_counts = unpack_bits(buf, count_bits, total_r, bit_offset=id_end)
    # slot j of position t is present iff j < m[t]; the first r[t] present slots carry stored counts
    slot = np.arange(n)[None, :]
    present = slot < m[:, None]
    ids = np.zeros((T, n), dtype=np.int64)
    ids[present] = flat_ids
    counts = np.where(present, 1, 0).astype(np.int64)
    counts[slot < r[:, None]] = flat_counts
    return ids, counts


def _byte_aligned(bits: int) -> int:
    """pack_bits pads each packed array to whole bytes, so each section starts at a multiple of 8 bits."""
    return 8 * ((bits + 7) // 8)


# ---- codec specs as recorded in the manifest -----------------------------------------------------------------


def codec_specs(
    vocab_size: int,
    id_codec: str,
    logprob_codec: str,
    hidden_codec: str,
    sample_n: int,
    hidden_rank: int = 0,
    hidden_coefficients: str = "q8",
    chat: bool = False,
) -> dict:
    """The manifest's `codecs` record for a new (format version 2 on) cache. A `lowrank` spec gets its basis's
    sha256 and kept variance once the basis is fitted (kd/cache/basis.py)."""
    plain_ids = {"name": "plain", "dtype": "uint16" if vocab_size <= 65536 else "int32"}
    ids = {"name": "bitpack", "bits": bits_for(vocab_size)} if id_codec == "bitpack" else plain_ids

    def values(name: str) -> dict:
        return {"name": "plain", "dtype": {"fp16": "float16", "fp32": "float32"}[name]}

    specs = {
        "input_ids": plain_ids,
        "topk_ids": ids,
        "topk_logprobs": {"name": "q8", "rounding": "mass"} if logprob_codec == "q8" else values(logprob_codec),
        "hidden_states": (
            {"name": "q8", "rounding": "nearest"}
            if hidden_codec == "q8"
            else {"name": "lowrank", "rank": hidden_rank, "coefficients": _LOWRANK_VALUES[hidden_coefficients]}
            if hidden_codec == "lowrank"
            else values(hidden_codec)
        ),
    }
    if chat:  # kd/data/pack.py ChatPacker: a 0/1 flag and a conversation number per token
        specs["loss_mask"] = {"name": "plain", "dtype": "uint8"}
        specs["segments"] = {"name": "plain", "dtype": "uint16"}
    if sample_n:
        specs["samples"] = (
            {"name": "ragged", "id_bits": bits_for(vocab_size), "count_bits": bits_for(sample_n + 1)}
            if id_codec == "bitpack"
            else {"name": "plain", "dtype": plain_ids["dtype"]}
        )
    return specs


_LOWRANK_VALUES = {"q8": "q8", "fp16": "float16", "fp32": "float32"}


def v1_codec_specs(manifest: dict) -> dict:
    """Format version 1 stored everything plain: ids in `id_dtype`, values in `value_dtype`."""
    value = {"name": "plain", "dtype": {"fp16": "float16", "fp32": "float32"}[manifest["value_dtype"]]}
    ids = {"name": "plain", "dtype": manifest["id_dtype"]}
    specs = {"input_ids": ids, "topk_ids": ids, "topk_logprobs": value, "hidden_states": value}
    if manifest.get("sample_n"):
        specs["samples"] = ids
    return specs


def describe(spec: dict) -> str:
    cls = REGISTRY.get(spec["name"]) or SAMPLE_CODECS.get(spec["name"])
    return cls(spec).describe() if cls is not None else spec["name"]


# ---- the registry: one class per codec ------------------------------------------------------------------------


class Codec:
    """One way of storing a field: the HDF5 datasets it takes (each with one row per sequence) and the conversion
    between the field's decoded layout and them. `spec` is the manifest's record for the field."""

    name = ""

    def __init__(self, spec: dict, basis=None):
        self.spec = spec

    def datasets(self, field: str, shape: tuple) -> dict[str, tuple[tuple, np.dtype]]:
        """Dataset name -> (per-sequence shape, dtype) for a field of decoded per-sequence `shape`."""
        raise NotImplementedError

    def encode(self, field: str, batch) -> dict[str, np.ndarray]:
        """A batch [n, ...] in the decoded layout -> each dataset's rows [n, ...]."""
        raise NotImplementedError

    def decode(self, row, field: str, shape: tuple) -> np.ndarray:
        """One sequence, decoded; `row(ds)` returns its row of dataset ds as stored (kd.cache.ShardRows.get).
        Ids come back int64, plain values in their stored dtype, quantised values as fp32."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class Plain(Codec):
    name = "plain"

    def datasets(self, field, shape):
        return {field: (shape, np.dtype(self.spec["dtype"]))}

    def encode(self, field, batch):
        return {field: np.asarray(batch)}

    def decode(self, row, field, shape):
        a = row(field)
        return a.astype(np.int64) if a.dtype.kind in "ui" else a

    def describe(self):
        return self.spec["dtype"]


class BitPack(Codec):
    name = "bitpack"

    def datasets(self, field, shape):
        return {field: ((packed_nbytes(int(np.prod(shape)), self.spec["bits"]),), np.dtype(np.uint8))}

    def encode(self, field, batch):
        return {field: np.stack([pack_bits(b, self.spec["bits"]) for b in np.asarray(batch)])}

    def decode(self, row, field, shape):
        return unpack_bits(row(field), self.spec["bits"], int(np.prod(shape))).reshape(shape)

    def describe(self):
        return f"bitpack {self.spec['bits']} bits"


class Q8(Codec):
    name = "q8"

    def datasets(self, field, shape):
        return {field: (shape, np.dtype(np.uint8)), field + "_q8": (shape[:-1] + (2,), np.dtype(np.float32))}

    def encode(self, field, batch):
        q, params = q8_encode(batch, self.spec.get("rounding", "nearest"))
        return {field: q, field + "_q8": params}

    def decode(self, row, field, shape):
        return q8_decode(row(field), row(field + "_q8"))

    def describe(self):
        return f"q8 (rounding {self.spec.get('rounding', 'nearest')})"


class LowRank(Codec):
    """Hidden states [L, T, H] as coefficients [L, T, r] on a fitted per-layer basis (see the module docstring).
    Encoding accepts a torch tensor and projects on its device (the teacher's GPU), so only [.., r] leaves it."""

    name = "lowrank"

    def __init__(self, spec: dict, basis=None):
        super().__init__(spec)
        self.basis, self._on_device, self._cpu = basis, {}, None
        if spec["coefficients"] not in ("q8", "float16", "float32"):
            raise KDError(f"unknown lowrank coefficient storage {spec['coefficients']!r}: upgrade kd")

    def datasets(self, field, shape):
        L, T, _ = shape
        r = self.spec["rank"]
        if self.spec["coefficients"] == "q8":
            return {field: ((L, T, r), np.dtype(np.uint8)), field + "_q8": ((L, T, 2), np.dtype(np.float32))}
        return {field: ((L, T, r), np.dtype(self.spec["coefficients"]))}

    def _need_basis(self):
        if self.basis is None:
            raise KDError("a lowrank hidden-state codec needs its basis (kd/cache/basis.py); none was given")
        return self.basis

    def coefficients(self, x) -> np.ndarray:
        """Hidden states [n, L, T, H] (numpy, or torch on any device) -> coefficients [n, L, T, r] fp32 numpy."""
        b = self._need_basis()
        if isinstance(x, np.ndarray):
            return np.einsum("nlth,lhr->nltr", x.astype(np.float32) - b.mean[None, :, None, :], b.components)
        import torch

        if x.device not in self._on_device:
            self._on_device[x.device] = (
                torch.from_numpy(b.mean).to(x.device),
                torch.from_numpy(b.components).to(x.device),
            )
        mean, comp = self._on_device[x.device]
        return torch.einsum("nlth,lhr->nltr", x.float() - mean[None, :, None, :], comp).cpu().numpy()

    def encode(self, field, batch):
        c = self.coefficients(batch)
        if self.spec["coefficients"] == "q8":
            q, params = q8_encode(c, "nearest")
            return {field: q, field + "_q8": params}
        return {field: c.astype(self.spec["coefficients"])}

    def decode(self, row, field, shape):
        import torch

        b = self._need_basis()
        c = q8_decode(row(field), row(field + "_q8")) if self.spec["coefficients"] == "q8" else row(field)
        if self._cpu is None:
            self._cpu = (torch.from_numpy(b.mean)[:, None, :], torch.from_numpy(b.components_t))
        mean, comp_t = self._cpu
        # torch, not numpy: a DataLoader worker runs torch on one thread, while numpy's BLAS would start one thread
        # per core in every worker and oversubscribe the cores (measured: 2 workers read slower than 1)
        return torch.baddbmm(mean, torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)), comp_t).numpy()

    def describe(self):
        kept = self.spec.get("variance_kept")
        return f"lowrank r={self.spec['rank']} ({self.spec['coefficients']} coefficients" + (
            f"; variance kept {', '.join(f'{v:.3f}' for v in kept)})" if kept else ")"
        )


REGISTRY = {c.name: c for c in (Plain, BitPack, Q8, LowRank)}


def field_codec(spec: dict, basis=None) -> Codec:
    """The codec object for a field's spec (`basis`: the cache's HiddenBasis, for `lowrank`)."""
    cls = REGISTRY.get(spec["name"])
    if cls is None:
        raise KDError(f"unknown codec {spec['name']!r}: this kd cannot read the cache, upgrade kd")
    return cls(spec, basis)


# ---- how a field of the table lives in a shard ---------------------------------------------------------------


class Store:
    """How one field of the cache's table (kd/cache/format.py FIELDS) lives in a shard of N sequences: the datasets
    it creates, those holding one checksummed row per sequence (`row_datasets`, in the shard's `checksums` column
    order), a batch encoded into rows (`encode`: arrays written with the other fields, and per-sequence byte strings
    that `write_variable` appends), one sequence decoded (`decode`: one array per name in `outputs`, the names the
    reader returns and kd.teacher.TeacherOutputs carries), what a shard must hold (`expected`), the bytes one
    sequence takes (`sequence_bytes`: estimate, bound) and a shard-level check."""

    outputs: tuple[str, ...] = ()

    def row_datasets(self) -> list[str]:
        raise NotImplementedError

    def create(self, f, N: int) -> None:
        raise NotImplementedError

    def encode(self, values: tuple) -> tuple[dict[str, np.ndarray], dict[str, list]]:
        """A batch (one value [n, ...] per output) -> (rows of fixed-shape datasets, per-sequence byte strings)."""
        raise NotImplementedError

    def write_variable(self, f, rows: dict[str, list], cursor: int, used: int) -> int:
        """Store a batch's byte strings (`encode`'s second part) as sequences cursor.. of the shard, after the `used`
        bytes already stored; returns the bytes stored now."""
        return used

    def decode(self, row) -> tuple:
        """One sequence, one array per output; `row(ds)` returns its row of dataset ds as stored."""
        raise NotImplementedError

    def expected(self, N: int) -> dict[str, tuple[tuple, np.dtype | None]]:
        """The datasets of fixed shape a shard of N sequences holds (name -> shape, dtype or None for any)."""
        raise NotImplementedError

    def sequence_bytes(self) -> tuple[int, int]:
        """(estimate, upper bound) of one sequence's stored bytes, its rows' checksums included."""
        raise NotImplementedError

    def check_shard(self, f) -> str | None:
        return None


class Coded(Store):
    """A per-position field [T, ...] stored through a codec of REGISTRY: each of its datasets [N, ...] chunked one
    sequence per chunk."""

    def __init__(self, name: str, codec: Codec, shape: tuple):
        self.name, self.codec, self.shape, self.outputs = name, codec, shape, (name,)
        self.datasets = codec.datasets(name, shape)

    def row_datasets(self):
        return list(self.datasets)

    def create(self, f, N):
        for ds, (shape, dtype) in self.datasets.items():
            f.create_dataset(ds, (N,) + shape, dtype, chunks=(1,) + shape)

    def encode(self, values):
        return self.codec.encode(self.name, values[0]), {}

    def decode(self, row):
        return (self.codec.decode(row, self.name, self.shape),)

    def expected(self, N):
        return {ds: ((N,) + shape, dtype) for ds, (shape, dtype) in self.datasets.items()}

    def sequence_bytes(self):
        size = sum(int(np.prod(shape)) * dtype.itemsize + 8 for shape, dtype in self.datasets.values())
        return size, size


class Utf8Text(Store):
    """A window's text and each token's [start, end) character span in it (kd/align.py aligns it to another
    tokenizer through them): the text one UTF-8 string per sequence (h5py's variable-length strings, checksummed as
    its UTF-8 bytes), the spans [N, T, 2] int32. T = seq_len; the estimate takes 4 bytes of text per token, the bound
    16 (the two checksums within those)."""

    name = "utf8"
    outputs = ("text", "token_spans")

    def __init__(self, seq_len: int = 0):
        self.T = seq_len

    def row_datasets(self):
        return ["text", "token_spans"]

    def create(self, f, N):
        import h5py

        f.create_dataset("text", (N,), h5py.string_dtype("utf-8"))
        f.create_dataset("token_spans", (N, self.T, 2), np.int32, chunks=(1, self.T, 2))

    def encode(self, values):
        texts, spans = values
        return {"token_spans": np.asarray(spans, np.int32)}, {"text": [t.encode("utf-8") for t in texts]}

    def write_variable(self, f, rows, cursor, used):
        blobs = rows["text"]
        f["text"][cursor : cursor + len(blobs)] = blobs
        return used

    def decode(self, row):
        return row("text").decode("utf-8"), row("token_spans").astype(np.int64)

    def expected(self, N):
        return {"text": ((N,), None), "token_spans": ((N, self.T, 2), np.dtype(np.int32))}

    def sequence_bytes(self):
        return self.T * (4 + 8), self.T * (16 + 8)


# ---- sampled targets: one class per codec name of the manifest's `samples` record -------------------------------


class SampleCodec(Store):
    """How a shard stores the sampled targets, (ids, counts) [T, n] per sequence decoded together: the datasets it
    creates, which of them hold one checksummed row per sequence, the rows of a batch (`fixed_rows`: arrays written
    with the other fields; `variable_rows`: per-sequence byte strings, `write_variable` appends them), decoding one
    sequence, what a shard of N sequences must hold, the bytes one sequence takes and a shard-level consistency
    check. `spec` is the manifest's `samples` record; T = seq_len, n = sample_n."""

    name = ""
    outputs = ("sample_ids", "sample_counts")

    def __init__(self, spec: dict, seq_len: int = 0, sample_n: int = 0):
        self.spec, self.T, self.n = spec, seq_len, sample_n

    def fixed_rows(self, ids, counts) -> dict[str, np.ndarray]:
        return {}

    def variable_rows(self, ids, counts) -> dict[str, list[np.ndarray]]:
        return {}

    def encode(self, values):
        return self.fixed_rows(*values), self.variable_rows(*values)

    def describe(self) -> str:
        return self.name


class PlainSamples(SampleCodec):
    """Padded [N, T, n] arrays: ids in the spec's dtype, counts uint8 (0 = padding)."""

    name = "plain"

    def row_datasets(self):
        return ["sample_ids", "sample_counts"]

    def create(self, f, N):
        T, n = self.T, self.n
        f.create_dataset("sample_ids", (N, T, n), np.dtype(self.spec["dtype"]), chunks=(1, T, n))
        f.create_dataset("sample_counts", (N, T, n), np.uint8, chunks=(1, T, n))

    def fixed_rows(self, ids, counts):
        return {"sample_ids": np.asarray(ids, self.spec["dtype"]), "sample_counts": np.asarray(counts, np.uint8)}

    def decode(self, row):
        return row("sample_ids").astype(np.int64), row("sample_counts").astype(np.int64)

    def expected(self, N):
        return {"sample_ids": ((N, self.T, self.n), None), "sample_counts": ((N, self.T, self.n), None)}

    def sequence_bytes(self):
        size = self.T * self.n * (np.dtype(self.spec["dtype"]).itemsize + 1) + 8 * 2
        return size, size

    def describe(self):
        return self.spec["dtype"]


class RaggedSamples(SampleCodec):
    """Without padding (`ragged_encode`): one byte string per sequence in the growing `sample_bytes`, with each
    sequence's [start, end) in `sample_offsets` [N + 1]."""

    name = "ragged"

    def row_datasets(self):
        return ["sample_bytes"]

    def create(self, f, N):
        # Small chunks: HDF5 allocates the last chunk whole, and a sequence (~15 KB at T = 256) spans a few.
        f.create_dataset("sample_bytes", (0,), np.uint8, maxshape=(None,), chunks=(1 << 13,))
        f.create_dataset("sample_offsets", (N + 1,), np.int64, chunks=(N + 1,))

    def variable_rows(self, ids, counts):
        bits = self.spec["id_bits"], self.spec["count_bits"]
        return {"sample_bytes": [ragged_encode(i, c, *bits) for i, c in zip(ids, counts)]}

    def write_variable(self, f, rows, cursor, used):
        blobs = rows["sample_bytes"]
        ends = used + np.cumsum([b.size for b in blobs])
        f["sample_bytes"].resize((int(ends[-1]),))
        f["sample_bytes"][used : int(ends[-1])] = np.concatenate(blobs)
        f["sample_offsets"][cursor + 1 : cursor + len(blobs) + 1] = ends
        return int(ends[-1])

    def decode(self, row):
        return ragged_decode(row("sample_bytes"), self.T, self.n, self.spec["id_bits"], self.spec["count_bits"])

    def expected(self, N):
        return {"sample_offsets": ((N + 1,), None)}

    def sequence_bytes(self):
        # varies with the teacher: the estimate assumes n/4 distinct ids per position, the bound n
        per_id = (self.spec["id_bits"] + self.spec["count_bits"]) / 8
        return int(self.T * (2 + per_id * max(1, self.n // 4))) + 16, int(self.T * (2 + per_id * self.n)) + 16

    def check_shard(self, f):
        offsets = f["sample_offsets"][:]
        if offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != f["sample_bytes"].shape[0]:
            return "sampled-target offsets are inconsistent with the stored bytes"
        return None

    def describe(self):
        return f"ragged ({self.spec['id_bits']}-bit ids, {self.spec['count_bits']}-bit counts)"


SAMPLE_CODECS = {c.name: c for c in (PlainSamples, RaggedSamples)}


def sample_codec(spec: dict, seq_len: int = 0, sample_n: int = 0) -> SampleCodec:
    """The codec object of a manifest's `samples` record."""
    cls = SAMPLE_CODECS.get(spec["name"])
    if cls is None:
        raise KDError(f"unknown sampled-target codec {spec['name']!r}: this kd cannot read the cache, upgrade kd")
    return cls(spec, seq_len, sample_n)
