"""Compact cache codecs: exact id packing, bounded 8-bit values, ragged sampled targets, and format version 1
caches still read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from kd import cache_teacher
from kd.cache import FORMAT_VERSION, MANIFEST, TeacherCache, codecs, summary, verify
from kd.losses.terms import sparse_kd_per_position
from kd.teacher import sample_targets

V1_CACHE = Path(__file__).parent / "data" / "cache_v1"


@pytest.mark.parametrize(
    "vocab,bits",
    [(2, 1), (255, 8), (256, 8), (257, 9), (49_152, 16), (65_536, 16), (65_537, 17), (151_936, 18), (2**32, 32)],
)
def test_bitpack_round_trip_is_exact(vocab, bits):
    assert codecs.bits_for(vocab) == bits
    rng = np.random.default_rng(vocab % 1000)
    values = np.concatenate([[0, vocab - 1], rng.integers(0, vocab, size=997)])  # both ends of the range
    packed = codecs.pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.size == codecs.packed_nbytes(values.size, bits) == -(-999 * bits // 8)
    np.testing.assert_array_equal(codecs.unpack_bits(packed, bits, values.size), values)
    # a section that starts part-way into the buffer
    both = np.concatenate([codecs.pack_bits(values[:5], bits), packed])
    np.testing.assert_array_equal(
        codecs.unpack_bits(both, bits, values.size, bit_offset=8 * ((5 * bits + 7) // 8)), values
    )


def test_bitpack_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="cannot be packed at 9 bits"):
        codecs.pack_bits(np.array([512]), 9)
    with pytest.raises(ValueError, match="truncated"):
        codecs.unpack_bits(codecs.pack_bits(np.arange(10), 9), 9, 11)


@pytest.mark.parametrize("rounding", ["nearest", "mass"])
@pytest.mark.parametrize("k", [1, 2, 256, 300])
def test_q8_error_bound(k, rounding):
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(k)) * 4
    lp = torch.log_softmax(logits, -1).topk(k, dim=-1).values.numpy()  # k = 300 = V: the whole distribution
    q, params = codecs.q8_encode(lp, rounding)
    assert q.dtype == np.uint8 and params.shape == (64, 2)
    back = codecs.q8_decode(q, params)
    step = ((lp.max(-1) - lp.min(-1)) / 255)[:, None]
    assert (np.diff(back, axis=-1) <= 0).all()  # order is kept, so sorted top-k stays sorted
    if rounding == "nearest":
        assert (np.abs(back - lp) <= step / 2 + 1e-5).all()
        np.testing.assert_array_equal(back[:, 0], lp[:, 0])  # anchor = the maximum, exact
    else:  # within one step, and the probability mass of the vector is kept
        assert (np.abs(back - lp) <= step + 1e-5).all()
        np.testing.assert_allclose(
            np.exp(back.astype(np.float64)).sum(-1), np.exp(lp.astype(np.float64)).sum(-1), rtol=1e-5
        )
    if k == 1:
        np.testing.assert_allclose(back, lp, rtol=0, atol=1e-6)


def test_q8_mass_rounding_keeps_the_tail_mass():
    """Rounding to nearest overstates or understates the cached top-k mass (with a confident teacher, past 1: a
    negative tail, as seen on the real SmolLM2 teacher); the mass-keeping anchor gets it right."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 49_152, generator=g) * 2
    logits[:, 0] += 12
    lp = torch.log_softmax(logits, -1).topk(256, dim=-1).values.numpy()
    true_mass = np.exp(lp.astype(np.float64)).sum(-1)
    kept = np.exp(codecs.q8_decode(*codecs.q8_encode(lp, "mass")).astype(np.float64)).sum(-1)
    nearest = np.exp(codecs.q8_decode(*codecs.q8_encode(lp, "nearest")).astype(np.float64)).sum(-1)
    assert np.abs(kept - true_mass).max() < 1e-6
    assert np.abs(nearest - true_mass).max() > 1e-4  # the failure mode the shifted anchor removes


def test_q8_constant_vector_and_non_finite():
    q, params = codecs.q8_encode(np.full((3, 5), -2.5, np.float32))
    np.testing.assert_array_equal(codecs.q8_decode(q, params), np.full((3, 5), -2.5, np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        codecs.q8_encode(np.array([[0.0, np.nan]]))


def test_q8_kd_loss_error_is_small_on_a_peaked_distribution():
    """The quantity the 8-bit codec must preserve: KD loss against top-256 within 0.5% of the fp32 one."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(512, 2000, generator=g) * 3
    student = torch.randn(512, 2000, generator=g) * 2
    lp, ids = torch.log_softmax(teacher, -1).topk(256, dim=-1)
    q, params = codecs.q8_encode(lp.numpy(), "mass")  # as the cache stores log-probs
    lp_q8 = torch.from_numpy(codecs.q8_decode(q, params))
    for tail in ("bucket", "renormalize"):
        exact = sparse_kd_per_position(student, ids, lp, 1.0, tail).sum()
        approx = sparse_kd_per_position(student, ids, lp_q8, 1.0, tail).sum()
        assert abs(approx / exact - 1) < 0.005, tail


@pytest.mark.parametrize("n,vocab", [(1, 7), (8, 300), (50, 151_936), (255, 40), (64, 64)])
def test_ragged_round_trip_is_exact(n, vocab):
    """Includes n = 1 (one id per position), n = 255 (counts at 8 bits) and draws that cover the whole vocabulary."""
    logits = torch.randn(33, vocab, generator=torch.Generator().manual_seed(n)) * (0.1 if vocab == 64 else 3)
    ids, counts = (t.numpy() for t in sample_targets(logits, n, torch.Generator().manual_seed(1)))
    id_bits, count_bits = codecs.bits_for(vocab), codecs.bits_for(n + 1)
    blob = codecs.ragged_encode(ids, counts, id_bits, count_bits)
    back_ids, back_counts = codecs.ragged_decode(blob, 33, n, id_bits, count_bits)
    np.testing.assert_array_equal(back_counts, counts)
    np.testing.assert_array_equal(np.where(counts > 0, back_ids, 0), np.where(counts > 0, ids, 0))
    distinct = (counts > 0).sum()
    # header (m and r per position) + ids + counts of repeated ids only: never more than the padded layout
    assert blob.size <= (2 * 33 * count_bits + distinct * id_bits + (counts > 1).sum() * count_bits) / 8 + 3
    assert blob.size < ids.size * (id_bits + count_bits) / 8 or n == 1


def test_ragged_refuses_unsorted_counts():
    with pytest.raises(ValueError, match="most frequent first"):
        codecs.ragged_encode(np.array([[3, 4]]), np.array([[1, 2]]), 4, 2)


def test_kd_against_many_samples_approaches_full_kd():
    """Counts / N is an unbiased estimate of the teacher: with huge N the sampled KD equals full KD."""
    g = torch.Generator().manual_seed(3)
    teacher, student = torch.randn(16, 100, generator=g) * 2, torch.randn(16, 100, generator=g)
    full = torch.nn.functional.kl_div(
        torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), log_target=True, reduction="none"
    ).sum(-1)
    n = 20_000  # the sampler's per-draw block CDF is built for sample_n ~ 50: 200,000 draws took 36 s here
    ids, counts = sample_targets(teacher, n, torch.Generator().manual_seed(4))
    sampled = sparse_kd_per_position(student, ids, torch.log(counts.float() / n), 1.0, "renormalize")
    # KL against the empirical distribution differs from KL against the teacher only by the entropy term's noise
    torch.testing.assert_close(sampled, full, atol=5e-3, rtol=1e-2)
    few = sparse_kd_per_position(
        student,
        *(lambda i, c: (i, torch.log(c.float() / 5)))(*sample_targets(teacher, 5, torch.Generator().manual_seed(5))),
        1.0,
        "renormalize",
    )
    assert (few - full).abs().mean() > 10 * (sampled - full).abs().mean()  # the test can tell a poor estimate


@pytest.mark.parametrize("k", [1, "V"])
def test_cache_edge_cases_k1_and_kV_decode_like_plain(tmp_path, make_cache_config, llama_teacher, k):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(llama_teacher).vocab_size
    top_k = vocab if k == "V" else 1
    plain = cache_teacher.main(
        make_cache_config(
            llama_teacher,
            tmp_path / "plain",
            **{
                "cache.top_k": top_k,
                "cache.id_codec": "plain",
                "cache.logprob_codec": "fp32",
                "cache.hidden_codec": "fp32",
            },
        )
    )
    compact = cache_teacher.main(
        make_cache_config(
            llama_teacher,
            tmp_path / "compact",
            **{
                "cache.top_k": top_k,
                "cache.id_codec": "bitpack",
                "cache.logprob_codec": "q8",
                "cache.hidden_codec": "q8",
            },
        )
    )
    a, b = TeacherCache(plain).split("train"), TeacherCache(compact).split("train")
    for i in range(0, len(a), 7):
        x, y = a[i], b[i]
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["topk_ids"], y["topk_ids"])
        assert torch.equal(x["sample_ids"], y["sample_ids"]) and torch.equal(x["sample_counts"], y["sample_counts"])
        lp = x["topk_logprobs"]
        bound = (lp.amax(-1, keepdim=True) - lp.amin(-1, keepdim=True)) / 255 + 1e-5  # log-probs: one step
        assert ((lp - y["topk_logprobs"]).abs() <= bound).all()
        torch.testing.assert_close(
            y["topk_logprobs"].double().exp().sum(-1), lp.double().exp().sum(-1), rtol=1e-5, atol=1e-6
        )
        h = x["hidden_states"]
        assert (
            (y["hidden_states"] - h).abs() <= (h.amax(-1, keepdim=True) - h.amin(-1, keepdim=True)) / 510 + 1e-5
        ).all()
    assert verify(compact, log=lambda *_: None) == []
    sizes = [json.loads((d / MANIFEST).read_text())["bytes_per_token"] for d in (plain, compact)]
    assert (
        sizes[1] < sizes[0]
    )  # file sizes of tiny shards are mostly HDF5 metadata; field sizes: bench/bench_targets.py


def test_format_version_1_cache_still_reads(tmp_path):
    """tests/data/cache_v1 was written by kd's format-version-1 writer (plain uint16 ids, fp16 values, padded
    samples). The current reader returns exactly the stored arrays, and verify and info accept it."""
    manifest = json.loads((V1_CACHE / MANIFEST).read_text())
    assert manifest["format_version"] == 1 and "codecs" not in manifest
    cache = TeacherCache(V1_CACHE)
    for split in ("train", "eval"):
        reader = cache.split(split)
        assert len(reader) == manifest["splits"][split]["num_sequences"]
        for shard in manifest["splits"][split]["shards"]:
            with h5py.File(V1_CACHE / shard["file"], "r") as f:
                for r in range(shard["num_sequences"]):
                    item = reader[shard["first_sequence"] + r]
                    for name in (
                        "input_ids",
                        "topk_ids",
                        "topk_logprobs",
                        "hidden_states",
                        "sample_ids",
                        "sample_counts",
                    ):
                        assert np.array_equal(item[name].numpy(), f[name][r].astype(item[name].numpy().dtype)), name
                    assert item["topk_logprobs"].dtype == torch.float16
    assert verify(V1_CACHE, log=lambda *_: None) == []
    assert "kd-teacher-cache v1" in summary(V1_CACHE) and "float16" in summary(V1_CACHE)
    # the typed manifest upgrades what format 1 did not record: no chat, no text, no identity, no separator text
    info = cache.info
    assert (info.format_version, info.chat, info.store_text, info.config_hash) == (1, None, False, None)
    assert (info.sample_n, info.tokenizer.separator_id, info.tokenizer.separator) == (8, 0, None)
    assert info.teacher.weights is None and info.splits["eval"].teacher_score is None
    assert info.splits["train"].num_sequences == manifest["splits"]["train"]["num_sequences"]
    # a newer format than this kd knows is refused with a clear message
    newer = tmp_path / "newer"
    shutil.copytree(V1_CACHE, newer)
    (newer / MANIFEST).write_text(json.dumps(dict(manifest, format_version=99)))
    from kd.errors import KDError

    with pytest.raises(KDError, match=f"cache format version 99; this kd reads up to {FORMAT_VERSION}: upgrade kd"):
        TeacherCache(newer)


def test_format_version_2_cache_still_reads():
    """tests/data/cache_v2 was written by kd's format-version-2 writer (bit-packed ids, q8 log-probs and hidden
    states, ragged samples, text). Version 3 changed only the manifest (streaming ingest): v2 reads unchanged."""
    v2 = Path(__file__).parent / "data" / "cache_v2"
    manifest = json.loads((v2 / MANIFEST).read_text())
    assert manifest["format_version"] == 2 and "documents" in manifest["splits"]["train"]
    cache = TeacherCache(v2)
    for split in ("train", "eval"):
        reader = cache.split(
            split,
            (
                "input_ids",
                "topk_ids",
                "topk_logprobs",
                "hidden_states",
                "sample_ids",
                "sample_counts",
                "text",
                "token_spans",
            ),
        )
        for shard in manifest["splits"][split]["shards"]:
            with h5py.File(v2 / shard["file"], "r") as f:
                for r in range(shard["num_sequences"]):
                    item = reader[shard["first_sequence"] + r]
                    assert np.array_equal(item["input_ids"].numpy(), f["input_ids"][r].astype(np.int64))
                    assert item["text"] == f["text"][r].decode()
                    assert (item["sample_counts"].sum(-1) == manifest["sample_n"]).all()
                    assert (item["topk_logprobs"] <= 0).all() and item["hidden_states"].shape[0] == 2
    assert verify(v2, log=lambda *_: None) == []
    assert "kd-teacher-cache v2" in summary(v2) and "1 documents" in summary(v2)


def test_export_round_trip_equals_the_reader(tmp_path):
    """`python -m kd.cache export` writes a datasets folder whose plain columns equal the reader's decoded values."""
    import sys

    import datasets
    import warm

    v2 = Path(__file__).parent / "data" / "cache_v2"
    out = tmp_path / "exported"
    r = warm.run(
        [sys.executable, "-m", "kd.cache", "export", str(v2), str(out), "--rows-per-file", "4"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    ds = datasets.load_dataset(str(out))
    assert set(ds) == {"train", "eval"}
    assert "teacher_nats" not in ds["train"].column_names  # format 2 kept no score per window: no column of nulls
    cache = TeacherCache(v2)
    for split in ("train", "eval"):
        reader = cache.split(
            split, ("input_ids", "topk_ids", "topk_logprobs", "sample_ids", "sample_counts", "text", "token_spans")
        )
        assert len(ds[split]) == len(reader)
        for row in ds[split]:
            item = reader[row["sequence_index"]]
            n = int(item["length"])
            assert row["input_ids"] == item["input_ids"][:n].tolist()
            assert row["target_token_ids"] == item["topk_ids"][:n].tolist()
            np.testing.assert_array_equal(
                np.array(row["target_logprobs"], np.float32), item["topk_logprobs"][:n].numpy()
            )
            assert np.array(row["target_mask"]).all()
            counts = item["sample_counts"][:n].numpy()
            for t in range(n):
                assert row["sample_ids"][t] == item["sample_ids"][t][counts[t] > 0].tolist()
                assert row["sample_counts"][t] == counts[t][counts[t] > 0].tolist()
            assert row["text"] == item["text"] and row["token_spans"] == item["token_spans"][:n].tolist()
    readme = (out / "README.md").read_text()  # what the cache was, from its (typed) manifest, upgraded from format 2
    info = cache.info
    assert f"teacher `{info.teacher.name_or_path}` (vocabulary {info.teacher.vocab_size}), top-{info.top_k}" in readme
    source = json.loads(readme.split("```json\n")[1].split("\n```")[0])
    assert source["format_version"] == 2 and source["top_k"] == info.top_k and source["seq_len"] == info.seq_len
    r = warm.run([sys.executable, "-m", "kd.cache", "export", str(v2), str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "not empty" in r.stderr  # never writes into a non-empty directory


def test_export_builds_each_file_a_bounded_batch_at_a_time(tmp_path, monkeypatch):
    """A file is written a record batch at a time (memory: one batch's values, whatever --rows-per-file): one row
    per batch gives the same tables as whole files do, in as many row groups as rows."""
    import pyarrow.parquet as pq

    from kd.cache import export as ex

    v2 = Path(__file__).parent / "data" / "cache_v2"
    whole = ex.export(v2, tmp_path / "whole", log=lambda *_: None)
    monkeypatch.setattr(ex, "BATCH_VALUES", 1)
    batched = ex.export(v2, tmp_path / "batched", log=lambda *_: None)
    for split in ("train", "eval"):
        [a], [b] = (sorted((d / split).glob("*.parquet")) for d in (whole, batched))
        ta, tb = pq.read_table(a), pq.read_table(b)
        assert ta.num_rows > 1 and ta.equals(tb)
        assert pq.ParquetFile(a).num_row_groups == 1 and pq.ParquetFile(b).num_row_groups == ta.num_rows


def _sampled(N: int, T: int, n: int, vocab: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Padded sampled targets [N, T, n] as the teacher pass writes them: distinct ids, most frequent first."""
    counts, ids = np.zeros((N, T, n), np.int64), np.zeros((N, T, n), np.int64)
    for i in range(N):
        for t in range(T):
            drawn = np.bincount(rng.integers(0, 6, n), minlength=6)  # n draws among 6 ids
            order = np.argsort(-drawn, kind="stable")
            kept = order[drawn[order] > 0]
            counts[i, t, : len(kept)] = drawn[kept]
            ids[i, t, : len(kept)] = rng.permutation(vocab)[: len(kept)]
    return ids, counts


# every field of the table (kd/cache/format.py FIELDS) with its decoded values for N sequences (d: the sizes): a
# field added to the table fails test_every_field_round_trips_through_its_store until it is given here
FIELD_VALUES = {
    "input_ids": lambda d, N, rng: (rng.integers(0, 300, (N, d.T)),),
    "topk_ids": lambda d, N, rng: (np.argsort(rng.random((N, d.T, 300)), -1)[..., : d.k],),
    "topk_logprobs": lambda d, N, rng: (np.sort(np.log(rng.dirichlet(np.ones(d.k), (N, d.T)))).astype(np.float32),),
    "hidden_states": lambda d, N, rng: (rng.standard_normal((N, d.L, d.T, d.H)).astype(np.float32),),
    "loss_mask": lambda d, N, rng: (rng.integers(0, 2, (N, d.T)),),
    "segments": lambda d, N, rng: (rng.integers(0, 4, (N, d.T)),),
    "samples": lambda d, N, rng: _sampled(N, d.T, d.n, 300, rng),
    "text": lambda d, N, rng: (
        ["".join(rng.choice(list("ab é€😀\n"), 9)) for _ in range(N)],
        rng.integers(0, 9, (N, d.T, 2)),
    ),
}


def test_every_field_round_trips_through_its_store():
    """Each field of the table through its Store and a shard file, in two batches as the writer appends them, and
    back through the reader's rows (kd.cache.ShardRows), exactly (plain values; lossy codecs are tested above)."""
    from kd.cache import ShardRows
    from kd.cache.format import FIELDS, Dims
    from kd.io import h5_in_memory

    assert [f.name for f in FIELDS] == list(FIELD_VALUES)
    dims = Dims(T=7, k=4, L=2, H=6, chat=True, n=5, text=True)
    specs = codecs.codec_specs(300, "bitpack", "fp32", "fp32", dims.n, chat=True)
    rng, N = np.random.default_rng(0), 4
    for field in FIELDS:
        assert field.stored(dims), field.name
        store, values = field.store(specs, dims, None), FIELD_VALUES[field.name](dims, N, rng)
        assert store.outputs == field.names and len(values) == len(field.names)
        f = h5_in_memory(f"field-{field.name}")
        f.create_dataset("lengths", data=np.full(N, dims.T, np.int32))
        store.create(f, N)
        used = 0
        for a, b in ((0, 3), (3, 4)):
            fixed, variable = store.encode(tuple(v[a:b] for v in values))
            for ds, rows in fixed.items():
                f[ds][a:b] = rows
            if variable:
                used = store.write_variable(f, variable, a, used)
        assert store.check_shard(f) is None and set(store.row_datasets()) <= set(f)
        for ds, (shape, dtype) in store.expected(N).items():
            assert f[ds].shape == shape and (dtype is None or f[ds].dtype == dtype), ds
        rows = ShardRows(f, check=False)
        for i in range(N):
            for name, got, want in zip(field.names, store.decode(rows.row(i)), (v[i] for v in values)):
                if name == "sample_ids":  # ids past a position's distinct ones are padding
                    got, want = np.where(values[1][i] > 0, got, 0), want
                if isinstance(want, str):
                    assert got == want, name
                else:
                    np.testing.assert_array_equal(got, want, err_msg=f"{field.name}: {name}")
        f.close()


# every codec of the two registries with the tests that round-trip it (a new codec fails until listed and tested)
TESTED_CODECS = {
    "plain": "test_format_version_1_cache_still_reads, test_cache_edge_cases_k1_and_kV_decode_like_plain",
    "bitpack": "test_bitpack_round_trip_is_exact",
    "q8": "test_q8_error_bound, test_q8_mass_rounding_keeps_the_tail_mass",
    "lowrank": "tests/test_lowrank.py",
}
TESTED_SAMPLE_CODECS = {
    "plain": "test_each_sample_codec_round_trips_through_a_shard_file",
    "ragged": "test_ragged_round_trip_is_exact, test_each_sample_codec_round_trips_through_a_shard_file",
}


def test_every_codec_is_listed_with_its_tests():
    assert set(codecs.REGISTRY) == set(TESTED_CODECS)
    assert set(codecs.SAMPLE_CODECS) == set(TESTED_SAMPLE_CODECS)


@pytest.mark.parametrize("name", sorted(TESTED_SAMPLE_CODECS))
def test_each_sample_codec_round_trips_through_a_shard_file(name):
    """Two batches of padded sampled targets through the codec's own datasets in an HDF5 file and back, exactly:
    what the writer stores (fixed and variable rows) and the reader decodes, per sequence; `check_shard` and the
    expected datasets agree with what it created."""
    from kd.io import h5_in_memory

    T, n, vocab, N = 7, 5, 300, 4
    spec = codecs.codec_specs(vocab, "bitpack" if name == "ragged" else "plain", "q8", "fp16", n)["samples"]
    assert spec["name"] == name
    codec = codecs.sample_codec(spec, T, n)
    ids, counts = _sampled(N, T, n, vocab, np.random.default_rng(0))
    f = h5_in_memory(f"samples-{name}")
    codec.create(f, N)
    used = 0
    for a, b in ((0, 3), (3, 4)):  # two batches, as the writer appends them
        for ds, rows in codec.fixed_rows(ids[a:b], counts[a:b]).items():
            f[ds][a:b] = rows
        variable = codec.variable_rows(ids[a:b], counts[a:b])
        if variable:
            used = codec.write_variable(f, variable, a, used)
    assert codec.check_shard(f) is None
    for ds, (shape, _) in codec.expected(N).items():
        assert f[ds].shape == shape, ds
    offsets = f["sample_offsets"][:] if "sample_offsets" in f else None
    for i in range(N):

        def row(ds, i=i):
            return f[ds][offsets[i] : offsets[i + 1]] if ds == "sample_bytes" else f[ds][i]

        got_ids, got_counts = codec.decode(row)
        np.testing.assert_array_equal(got_counts, counts[i])
        np.testing.assert_array_equal(np.where(counts[i] > 0, got_ids, 0), ids[i])
    f.close()
