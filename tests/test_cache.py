"""The teacher cache: stored values equal a recomputation, resume, several processes, verify, reader."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import warm
from conftest import ROOT, cache_overrides, reseal_row, torchrun

import kd.cache.manifest
from kd import cache_teacher
from kd.cache import MANIFEST, ShardWriter, TeacherCache, shard_records, verify, write_shard_index
from kd.cache.codecs import unpack_bits


def read_raw(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every split's stored datasets concatenated in sequence order: the cache's content as on disk (encoded),
    independent of sharding. Ragged sampled targets are compared per sequence, as decoded by `read_all`."""
    manifest = json.loads((out / MANIFEST).read_text())
    result = {}
    for split in manifest["splits"]:
        parts: dict[str, list] = {}
        for shard in shard_records(out, manifest, split):
            with h5py.File(out / shard["file"], "r") as f:
                for name in f:
                    if name not in ("sample_bytes", "sample_offsets"):
                        parts.setdefault(name, []).append(f[name][:])
        result[split] = {k: np.concatenate(v) for k, v in parts.items()}
    return result


def read_all(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every split's fields as the reader decodes them, stacked in sequence order."""
    cache = TeacherCache(out)
    result = {}
    for split in cache.manifest["splits"]:
        reader = cache.split(split, cache.split(split).ALL_FIELDS)
        items = [reader[i] for i in range(len(reader))]
        result[split] = {
            k: np.stack([it[k].numpy() for it in items]) for k in items[0] if k not in ("sequence_index", "text")
        }
        result[split]["text"] = np.array([it["text"] for it in items], dtype=object)
        result[split]["lengths"] = result[split].pop("length")
    return result


def q8_bound(values: torch.Tensor, steps: float = 0.5) -> torch.Tensor:
    """`steps` q8 steps of each vector (last axis): the codec's error bound (half a step rounding to nearest, one
    rounding down), plus fp32 rounding."""
    return (values.amax(-1, keepdim=True) - values.amin(-1, keepdim=True)) / 255 * steps + 1e-5


PLAIN = {"cache.id_codec": "plain", "cache.logprob_codec": "fp16", "cache.hidden_codec": "fp16"}
COMPACT = {"cache.id_codec": "bitpack", "cache.logprob_codec": "q8", "cache.hidden_codec": "q8"}


@pytest.mark.parametrize(
    "teacher_fixture,codecs",
    [("llama_teacher", COMPACT), ("moe_teacher", PLAIN), ("llama_teacher", PLAIN)],
    ids=["llama-compact", "moe-plain", "llama-plain"],
)
def test_stored_values_equal_recomputation(request, tmp_path, make_cache_config, teacher_fixture, codecs):
    from transformers import AutoModelForCausalLM

    teacher = request.getfixturevalue(teacher_fixture)
    out = cache_teacher.main(make_cache_config(teacher, tmp_path / "c", **codecs))
    compact = codecs is COMPACT
    content = read_all(out)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["teacher"]["model_type"] == ("llama" if teacher_fixture == "llama_teacher" else "qwen3_moe")
    for split in ("train", "eval"):
        c = content[split]
        assert len(c["lengths"]) == manifest["splits"][split]["num_sequences"] > 0
        ids = torch.from_numpy(c["input_ids"].astype(np.int64))
        lengths = torch.from_numpy(c["lengths"].astype(np.int64))
        mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
        with torch.no_grad():
            out_full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        logp = torch.log_softmax(out_full.logits.float(), dim=-1)
        ref_vals, ref_ids = logp.topk(16, dim=-1)
        stored_vals = torch.from_numpy(c["topk_logprobs"].astype(np.float32))
        stored_ids = torch.from_numpy(c["topk_ids"].astype(np.int64))
        valid = mask.bool()
        # Values: within fp16 storage tolerance, or within one q8 step with the top-k mass kept. Ids: equal wherever
        # the reference values are not near-ties.
        if compact:
            # log-probs: within one step, and the top-k probability mass (so the tail mass) is kept
            assert ((stored_vals - ref_vals).abs() <= q8_bound(ref_vals, 1.0))[valid].all()
            torch.testing.assert_close(
                stored_vals.double().exp().sum(-1)[valid], ref_vals.double().exp().sum(-1)[valid], rtol=1e-4, atol=1e-5
            )
        else:
            torch.testing.assert_close(stored_vals[valid], ref_vals[valid], atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(torch.gather(logp, -1, stored_ids)[valid], ref_vals[valid], atol=2e-3, rtol=1e-3)
        assert (stored_ids[valid] == ref_ids[valid]).float().mean() > 0.99
        # Hidden states are hidden_states[0] (embeddings) and hidden_states[2] (last layer).
        ref_hidden = torch.stack([out_full.hidden_states[0], out_full.hidden_states[2]], dim=1)
        stored_hidden = torch.from_numpy(c["hidden_states"].astype(np.float32))
        if compact:  # valid positions (padding's values are never used, and depend on whether a mask was passed)
            assert ((stored_hidden - ref_hidden).abs() <= q8_bound(ref_hidden)).permute(0, 2, 1, 3)[valid].all()
        else:
            torch.testing.assert_close(
                stored_hidden.permute(0, 2, 1, 3)[valid], ref_hidden.permute(0, 2, 1, 3)[valid], atol=2e-3, rtol=2e-3
            )
        # sampled targets: counts sum to n, every drawn id is a real teacher token, most frequent first
        counts = c["sample_counts"].astype(np.int64)
        assert (counts.sum(-1) == 8).all() and (np.diff(counts, axis=-1) <= 0).all()
        drawn_logp = torch.gather(logp, -1, torch.from_numpy(c["sample_ids"].astype(np.int64)))
        assert torch.isfinite(drawn_logp).all()
    assert verify(out, log=lambda *_: None) == []


def test_window_text_and_spans_give_back_every_token(tmp_path, make_cache_config, llama_teacher):
    """store_text: each teacher token's span in its window's text is exactly the token's text; separators span the
    separator string; windows that start mid-document start at their first token."""
    from transformers import AutoTokenizer

    out = cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c"))
    tok = AutoTokenizer.from_pretrained(llama_teacher)
    content = read_all(out)
    n_sep = 0
    for split in ("train", "eval"):
        c = content[split]
        for text, ids, spans, length in zip(c["text"], c["input_ids"], c["token_spans"], c["lengths"]):
            assert spans[0, 0] == 0 and spans[length - 1, 1] == len(text)  # the text is exactly the window
            for t in range(length):
                piece = text[spans[t, 0] : spans[t, 1]]
                if ids[t] == tok.eos_token_id:
                    assert piece == "<|endoftext|>"
                    n_sep += 1
                else:
                    assert piece == tok.decode([int(ids[t])]), (t, piece)
            assert (spans[length:] == len(text)).all()
    assert n_sep >= 1  # a document boundary was covered


def test_sampled_targets_are_unbiased():
    """The empirical distribution of many draws converges to the teacher's (fixed seed, small vocabulary)."""
    from kd.teacher import sample_targets

    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(0)) * 2
    ids, counts = sample_targets(logits, 20000, torch.Generator().manual_seed(1))
    assert (counts.sum(-1) == 20000).all()
    empirical = torch.zeros(3, 20).scatter_add_(1, ids, counts.float()) / 20000
    assert (empirical - torch.softmax(logits, -1)).abs().max() < 0.015
    # few draws: distinct ids first (most frequent first), padding has count 0
    ids, counts = sample_targets(logits, 5, torch.Generator().manual_seed(2))
    assert (counts.sum(-1) == 5).all() and (counts[:, :-1] >= counts[:, 1:]).all()
    for row_ids, row_counts in zip(ids, counts):
        real = row_ids[row_counts > 0]
        assert len(set(real.tolist())) == len(real)


class _FixedLogits(torch.nn.Module):
    """A stand-in teacher whose forward returns fixed logits (rows picked by the input ids' first token)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.logits[input_ids[:, 0]].to(self.logits.dtype), hidden_states=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_targets_draw_what_sample_targets_draws(dtype):
    """The fused sampler in teacher_targets' chunk loop draws, for each sequence, exactly what sample_targets draws
    with that sequence's generator, whatever the position chunk and whatever else is in the batch; top-k values are
    the full-softmax log-probs; padded vocabulary entries (-inf) are never drawn."""
    from kd.teacher import sample_targets, teacher_targets

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 10, 37, generator=g) * 3).to(dtype)
    logits[..., 33:] = float("-inf")  # a padded vocabulary
    model, n = _FixedLogits(logits), 9
    ids = torch.arange(3)[:, None].expand(3, 10).contiguous()
    mask = torch.ones_like(ids)
    gens = lambda seqs: [torch.Generator().manual_seed(100 + i) for i in seqs]  # noqa: E731
    expect = [sample_targets(logits[i], n, gens([i])[0]) for i in range(3)]
    for chunk in (1, 7, 64):
        lp, top, _, (s_ids, s_counts) = teacher_targets(
            model, ids, mask, 5, [], position_chunk=chunk, sample_n=n, sample_generators=gens(range(3))
        )
        ref = torch.log_softmax(logits.float(), -1).topk(5, -1)
        torch.testing.assert_close(lp, ref.values, rtol=0, atol=2e-6)
        assert torch.equal(top, ref.indices)
        for i in range(3):
            assert torch.equal(s_ids[i], expect[i][0]) and torch.equal(s_counts[i], expect[i][1]), (chunk, i)
        assert (s_ids[s_counts > 0] < 33).all() and (s_counts.sum(-1) == n).all()
    # the same sequence alone in its batch
    _, _, _, (alone, alone_counts) = teacher_targets(
        model, ids[2:], mask[2:], 5, [], sample_n=n, sample_generators=gens([2])
    )
    assert torch.equal(alone[0], expect[2][0]) and torch.equal(alone_counts[0], expect[2][1])


def test_sampler_keeps_the_mass_of_a_152k_vocabulary_tail():
    """3e-3 of the mass spread over 151,935 tokens (2e-8 each, below half an fp32 ulp of the running sum once it
    passes the top token's 1.0): the tail is drawn at its rate. The CDF is kept in fp64 for this; an fp32 running
    sum, as on CUDA, would round each step away (torch's CPU cumsum happens to accumulate in double)."""
    from kd.teacher import sample_targets

    V, tail = 151_936, 3e-3
    logits = torch.full((100, V), float(torch.log(torch.tensor(tail / (V - 1) / (1 - tail)))))
    logits[:, 0] = 0.0
    ids, counts = sample_targets(logits, 255, torch.Generator().manual_seed(0))
    drawn_tail = int(counts[ids != 0].sum())
    assert 40 < drawn_tail < 115, drawn_tail  # expected 100 * 255 * 3e-3 = 76.5, sd 8.7


def test_inverse_cdf_draws_across_blocks_and_at_the_edges():
    """Over a vocabulary of several CDF blocks (and not a multiple of the block size) the draws follow the
    probabilities; uniforms at 0 and just below 1 never land on an entry of probability 0."""
    from kd.teacher import _draw

    g = torch.Generator().manual_seed(0)
    e = torch.rand(2, 1000, generator=g) ** 4
    e[:, 990:] = 0.0  # padded vocabulary at the end
    e[:, 100:300] = 0.0  # a whole empty block and then some
    u = torch.rand(2, 200_000, generator=g, dtype=torch.float64)
    ids = _draw(e, u)
    freq = torch.zeros(2, 1000, dtype=torch.float64).scatter_add_(1, ids, torch.ones_like(u)) / u.shape[1]
    assert (freq - e.double() / e.double().sum(-1, keepdim=True)).abs().max() < 0.003
    edge = torch.tensor(
        [[0.0, torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)).item()]]
        * 2,
        dtype=torch.float64,
    )
    drawn = _draw(e, edge)
    assert (e.gather(1, drawn) > 0).all(), drawn


def test_manifest_describes_the_cache(tmp_path, make_cache_config, llama_teacher):
    out = cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c"))
    m = json.loads((out / MANIFEST).read_text())
    for key in (
        "format",
        "format_version",
        "teacher",
        "tokenizer",
        "top_k",
        "hidden_layers",
        "codecs",
        "seq_len",
        "dataset",
        "splits",
        "config",
    ):
        assert key in m, key
    assert m["teacher"]["vocab_size"] > 0 and m["teacher"]["hidden_size"] == 32
    assert len(m["tokenizer"]["fingerprint"]) == 64
    # the held-out play is the eval split; the split rule is recorded, not a list of every document
    assert m["splits"]["eval"]["num_documents"] == 1 and m["splits"]["train"]["num_documents"] <= 5
    assert "held-out source" in m["dataset"]["split_rule"] and m["ingest"]["documents"] <= 6
    assert not (out / "ingest").exists()  # the windows live on in the shards
    assert m["splits"]["train"]["num_sequences"] == 40  # data.max_train_sequences
    for split in m["splits"]:
        for shard in shard_records(out, m, split):
            assert len(shard["sha256"]) == 64
            with h5py.File(out / shard["file"], "r") as f:
                meta = json.loads(f.attrs["kd_meta"])
                assert meta["format_version"] == m["format_version"] and meta["top_k"] == 16
                assert meta["num_tokens"] == shard["num_tokens"]
                assert f["topk_logprobs"].chunks == (1, 32, 16)  # one chunk per sequence
    assert m["config"]["cache"]["top_k"] == 16 and m["sample_n"] == 8
    vocab = m["teacher"]["vocab_size"]  # 300 < 2**9: ids at 9 bits, counts of n = 8 draws at 4 bits
    assert m["codecs"]["topk_ids"] == {"name": "bitpack", "bits": 9}
    assert m["codecs"]["topk_logprobs"] == {"name": "q8", "rounding": "mass"}
    assert m["codecs"]["samples"] == {"name": "ragged", "id_bits": 9, "count_bits": 4} and vocab == 300
    # the last window of a split is kept, short, and counted by its valid length
    content = read_all(out)
    assert content["eval"]["lengths"][-1] <= 32 and content["eval"]["lengths"][:-1].min() == 32


def test_reader_random_access_and_workers(tmp_path, make_cache_config, llama_teacher):
    out = cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c"))
    content, raw = read_all(out)["train"], read_raw(out)["train"]
    cache = TeacherCache(out)
    split = cache.split("train")
    assert len(split) == 40
    for i in (0, 7, 8, 39):  # both sides of a shard boundary
        item = split[i]
        assert torch.equal(item["input_ids"], torch.from_numpy(raw["input_ids"][i].astype(np.int64)))
        assert torch.equal(
            item["topk_ids"], torch.from_numpy(unpack_bits(raw["topk_ids"][i], 9, 32 * 16).reshape(32, 16))
        )
        assert torch.equal(item["topk_logprobs"], torch.from_numpy(content["topk_logprobs"][i]))
        assert item["sample_ids"].shape == item["sample_counts"].shape == (32, 8)
        assert item["hidden_states"].shape == (2, 32, 32)
        assert int(item["length"]) == content["lengths"][i]
    with pytest.raises(IndexError):
        split[40]
    # h5py handles are opened per worker process: a 2-worker DataLoader reads the same data
    loader = torch.utils.data.DataLoader(cache.split("train", fields=("input_ids",)), batch_size=5, num_workers=2)
    ids = torch.cat([b["input_ids"] for b in loader])
    assert torch.equal(ids, torch.from_numpy(raw["input_ids"].astype(np.int64)))


def crash_part_way(monkeypatch, cfg) -> None:
    """Run cache_teacher.main(cfg) and stop it on its fifth batch, part-way through a shard, as a kill would (no
    cleanup runs)."""
    calls = {"n": 0}
    real_append = ShardWriter.append

    def crash_on_fifth_batch(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_append(self, *args)

    monkeypatch.setattr(ShardWriter, "append", crash_on_fifth_batch)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher.main(cfg)
    monkeypatch.setattr(ShardWriter, "append", real_append)


def test_interrupted_run_resumes_to_identical_cache(tmp_path, make_cache_config, llama_teacher, monkeypatch):
    reference = read_all(cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "ref")))
    out = tmp_path / "c"
    crash_part_way(monkeypatch, make_cache_config(llama_teacher, out))
    assert not (out / MANIFEST).exists()  # an unfinished cache is never usable
    finished = sorted(p.name for p in out.glob("*.h5"))
    assert finished == ["train-00000.h5"]  # batches of 3, shards of 8: 1 shard done when batch 5 starts
    # the interrupted shard was only ever in memory (it reaches the disk, under a temporary name, at commit)
    assert not list(out.glob("train-00001*"))
    # a re-run with another batch size (not a content key) keeps the complete shard and finishes the rest
    mtime = (out / "train-00000.h5").stat().st_mtime_ns
    cache_teacher.main(make_cache_config(llama_teacher, out, **{"teacher.batch_size": 5}))
    assert (out / "train-00000.h5").stat().st_mtime_ns == mtime
    assert not list(out.glob("*.tmp-*"))
    resumed = read_all(out)
    for split in reference:
        for name in reference[split]:
            if name == "text":
                assert list(resumed[split][name]) == list(reference[split][name])
                continue
            # batch size changes fp32 rounding in the teacher, which can move a q8 value by one step (< 0.02 here)
            np.testing.assert_allclose(
                resumed[split][name].astype(np.float32),
                reference[split][name].astype(np.float32),
                atol=2e-2,
                err_msg=f"{split}/{name}",
            )


def test_a_cache_begun_with_another_sampling_scheme_is_finished_from_scratch(
    tmp_path, make_cache_config, llama_teacher, monkeypatch
):
    """Shards whose sampled targets were drawn by another scheme (kd.teacher.SAMPLER) are never kept on resume:
    the scheme is part of the config hash, so the finished shard is recomputed and the manifest names the scheme."""
    out = tmp_path / "c"
    crash_part_way(monkeypatch, make_cache_config(llama_teacher, out, **{"cache.sample_n": 8}))
    mtime = (out / "train-00000.h5").stat().st_mtime_ns
    monkeypatch.setattr(kd.cache.manifest, "SAMPLER", "another scheme/1")
    cache_teacher.main(make_cache_config(llama_teacher, out, **{"cache.sample_n": 8}))
    assert (out / "train-00000.h5").stat().st_mtime_ns != mtime
    assert json.loads((out / MANIFEST).read_text())["sampler"] == "another scheme/1"


def test_killed_process_never_leaves_a_complete_looking_shard(tmp_path, corpus_dir, llama_teacher):
    """SIGKILL a real run while it writes its shards (at whatever point of a write the signal finds it): every
    final-named shard must then be whole, and a re-run completes. The kill is checked to have landed mid-pass:
    some shards written, not all, no manifest."""
    import signal
    import time

    from kd.cache import sha256_file

    out = tmp_path / "c"
    args = [
        sys.executable,
        str(ROOT / "cache_teacher.py"),
        *cache_overrides(llama_teacher, corpus_dir, out, **{"cache.sequences_per_shard": 2, "teacher.batch_size": 1}),
    ]
    proc = warm.Popen(args, stdout=warm.DEVNULL, stderr=warm.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.h5"))) < 3 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    shards = list(out.glob("*.h5"))
    # 40 train + eval windows in shards of 2: the kill landed after 3 shards and long before the last
    assert 3 <= len(shards) < 20 and not (out / MANIFEST).exists(), [p.name for p in shards]
    for shard in shards:
        info = json.loads(shard.with_suffix(".json").read_text())
        assert sha256_file(shard) == info["sha256"], shard.name
    warm.run(args, check=True, capture_output=True)
    assert verify(out, log=lambda *_: None) == []


def test_two_processes_equal_one(tmp_path, corpus_dir, llama_teacher):
    one = tmp_path / "one"
    two = tmp_path / "two"
    # ACCELERATE_USE_CPU=1 is what `accelerate launch --cpu` sets; without it Accelerate ignores torchrun on CPU.
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    # one unit per play (data.unit_bytes below a play's size): both processes ingest, in rounds, up to the cap
    extra = {"data.unit_bytes": 2000}
    warm.run(
        [sys.executable, str(ROOT / "cache_teacher.py"), *cache_overrides(llama_teacher, corpus_dir, one, **extra)],
        check=True,
        capture_output=True,
        env=env,
    )
    result = torchrun(ROOT / "cache_teacher.py", *cache_overrides(llama_teacher, corpus_dir, two, **extra))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout and "in 3 units" in result.stdout  # 2 train units hold the cap
    for read in (read_raw, read_all):  # bytes on disk, and decoded (covers the ragged sampled targets)
        a, b = read(one), read(two)
        for split in a:
            for name in a[split]:
                np.testing.assert_array_equal(a[split][name], b[split][name], err_msg=f"{split}/{name}")
    ma, mb = (json.loads((d / MANIFEST).read_text()) for d in (one, two))
    assert [s["sha256"] for s in shard_records(one, ma, "train")] == [
        s["sha256"] for s in shard_records(two, mb, "train")
    ]


def test_verify_catches_a_flipped_byte(tmp_path, make_cache_config, llama_teacher):
    out = cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c"))
    shard = out / "train-00001.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify(out, log=lambda *_: None)
    assert problems and "train-00001.h5" in problems[0] and "sha256" in problems[0]
    result = warm.run([sys.executable, "-m", "kd.cache", "verify", str(out)], capture_output=True, text=True)
    assert result.returncode == 1 and "train-00001.h5" in result.stderr


def test_verify_names_the_bad_sequence(tmp_path, make_cache_config, llama_teacher):
    """A value that is wrong but checksummed (a buggy writer) is caught by the content checks."""
    out = cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c"))
    shard = out / "train-00001.h5"
    with h5py.File(shard, "r+") as f:
        f["topk_logprobs_q8"][3, 5, 0] = 0.5  # the anchor (top-1 log-prob) of a position made positive
        reseal_row(f, "topk_logprobs_q8", 3)
    reseal_train_shard(out, json.loads((out / MANIFEST).read_text()), shard)
    problems = verify(out, log=lambda *_: None)
    assert problems == ["shard train-00001.h5, sequence 11 of split train: log-probs are positive"]


def reseal_train_shard(out: Path, manifest: dict, shard: Path) -> None:
    """An edited train shard's sha256 recorded in its shard index and the manifest: the cache a buggy writer would
    leave (consistent, and wrong), for the checks beyond checksums."""
    from kd.cache import sha256_file

    records = shard_records(out, manifest, "train")
    for r in records:
        if r["file"] == shard.name:
            r["sha256"] = sha256_file(shard)
    manifest["splits"]["train"]["shard_index"] = write_shard_index(out, "train", records)
    (out / MANIFEST).write_text(json.dumps(manifest))


def test_verify_checks_the_windows_teacher_scores_against_the_manifest(tmp_path, make_cache_config, llama_teacher):
    """Format 8 keeps the teacher's score per window: verify adds the windows' up and compares them with the split's
    total in the manifest, and refuses a window that scores more targets than it holds, a score that is not a sum,
    and a window without a score where the manifest has the split's (a buggy writer's shard, its checksums and
    sha256 made valid again)."""
    from kd.cache import checksum

    out = cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c"))
    assert verify(out, log=lambda *_: None) == []
    m = json.loads((out / MANIFEST).read_text())
    edited = json.loads(json.dumps(m))
    edited["splits"]["eval"]["teacher_score"]["nats"] += 0.5
    (out / MANIFEST).write_text(json.dumps(edited))
    (problem,) = verify(out, log=lambda *_: None)
    assert problem.startswith("split eval: the windows' teacher scores (nats ") and "do not add up" in problem
    (out / MANIFEST).write_text(json.dumps(m))

    shard, index = out / "train-00001.h5", out / m["splits"]["train"]["shard_index"]["file"]
    original, original_index = shard.read_bytes(), index.read_bytes()

    def verify_with(column: int, value) -> list[str]:  # window 2 of the shard edited, resealed
        shard.write_bytes(original)
        index.write_bytes(original_index)
        with h5py.File(shard, "r+") as f:
            f["teacher_score"][2, column] = value(f) if callable(value) else value
            whole = json.loads(f["checksums"].attrs["whole"])
            f["checksums"].attrs["whole"] = json.dumps(dict(whole, teacher_score=checksum(f["teacher_score"][:])))
        reseal_train_shard(out, json.loads(json.dumps(m)), shard)
        return verify(out, log=lambda *_: None)

    where = "shard train-00001.h5: its teacher scores"
    assert verify_with(1, lambda f: f["lengths"][2]) == [f"{where} count more targets than its windows hold"]
    assert verify_with(0, -1.0) == [f"{where} are not sums (finite, >= 0, whole counts)"]
    assert verify_with(2, 0.5) == [f"{where} are not sums (finite, >= 0, whole counts)"]
    assert verify_with(0, np.inf) == [f"{where} are not sums (finite, >= 0, whole counts)"]
    # a whole row NaN: "not recorded", which the manifest's total for the split contradicts
    nan_row = verify_with(slice(None), np.nan)
    assert nan_row == ["split train: 1 window(s) carry no teacher score, and the manifest gives the split's"]


def test_export_carries_each_windows_teacher_score(tiny_cache, tmp_path, monkeypatch):
    """The exported rows carry the teacher's score per window (format 8): equal to the shards', adding up to the
    manifest's totals per split; a window the caching pass did not score is null, not NaN and garbage counts."""
    import shutil

    import pyarrow.parquet as pq

    from kd.cache import checksum
    from kd.cache import export as ex
    from kd.cache.export import SCORE_FIELDS, export

    def exported(cache: Path, out: Path) -> dict:  # split -> the rows' score columns, in sequence order
        export(cache, out, rows_per_file=5, log=lambda *_: None)  # several files, shards cut across
        tables = {}
        for split in ("train", "eval"):
            t = pq.read_table(sorted((out / split).glob("*.parquet"))).sort_by("sequence_index")
            tables[split] = {name: t[name].to_pylist() for name in SCORE_FIELDS}
        return tables

    m = json.loads((tiny_cache / MANIFEST).read_text())
    rows = exported(tiny_cache, tmp_path / "out")
    for split, cols in rows.items():
        stored = TeacherCache(tiny_cache).split(split, ()).teacher_scores(m["splits"][split]["num_sequences"])
        assert [list(r) for r in zip(*cols.values())] == stored.tolist()
        total = m["splits"][split]["teacher_score"]
        assert [sum(cols[f]) for f in SCORE_FIELDS[1:]] == [total["tokens"], total["chars"], total["bytes"]]
        assert sum(cols["teacher_nats"]) == pytest.approx(total["nats"], rel=1e-9)

    unscored = tmp_path / "unscored"  # window 2 of a train shard without a score, resealed
    shutil.copytree(tiny_cache, unscored)
    shard = unscored / "train-00001.h5"
    with h5py.File(shard, "r+") as f:
        first = json.loads(f.attrs["kd_meta"])["first_sequence"]
        f["teacher_score"][2, :] = np.nan
        whole = json.loads(f["checksums"].attrs["whole"])
        f["checksums"].attrs["whole"] = json.dumps(dict(whole, teacher_score=checksum(f["teacher_score"][:])))
    reseal_train_shard(unscored, json.loads((unscored / MANIFEST).read_text()), shard)
    monkeypatch.setattr(ex, "BATCH_VALUES", 1)  # one row per record batch: each row's score read on its own
    train = exported(unscored, tmp_path / "out_unscored")["train"]
    assert [train[f][first + 2] for f in SCORE_FIELDS] == [None] * 4
    assert train["teacher_scored_tokens"][first + 1] == rows["train"]["teacher_scored_tokens"][first + 1]


def test_a_cache_of_an_older_format_is_read_as_it_is_rewritten_on_request_and_a_begun_one_goes_on(
    tmp_path, make_cache_config, llama_teacher, capsys
):
    """The cache format is part of a cache's identity. A finished cache of an older format (as format 7 wrote it:
    no per-window teacher scores) is complete to a newer kd, which says that cache.overwrite=true rewrites it, and
    does; shards an older kd began (another identity) are computed again, and the run says so."""
    from kd.cache.format import FORMAT_VERSION

    cfg = make_cache_config(llama_teacher, tmp_path / "c")
    out = cache_teacher.main(cfg)

    def as_format_7(finished: bool) -> None:
        recorded = json.loads((out / "cache_config.json").read_text())
        (out / "cache_config.json").write_text(json.dumps(dict(recorded, format_version=7)))
        m = json.loads((out / MANIFEST).read_text())
        (out / MANIFEST).write_text(json.dumps(dict(m, format_version=7)))
        for side in out.glob("*-0*.json"):  # the sidecars: shards of another identity
            side.write_text(json.dumps(dict(json.loads(side.read_text()), config_hash="older")))
        if not finished:
            (out / MANIFEST).unlink()

    as_format_7(finished=True)
    capsys.readouterr()
    assert cache_teacher.main(cfg) == out
    said = capsys.readouterr().out
    assert "is a cache of format 7, which this kd reads as it is; cache.overwrite=true rewrites it in format " in said
    assert "already complete" in said and TeacherCache(out).info.format_version == 7  # untouched

    cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c", **{"cache.overwrite": True}))
    said = capsys.readouterr().out
    assert f"rewriting {out}: the cache format (7; this kd writes {FORMAT_VERSION})" in said
    assert TeacherCache(out).info.format_version == FORMAT_VERSION and verify(out, log=lambda *_: None) == []

    as_format_7(finished=False)  # killed before its manifest: its shards carry the older identity
    cache_teacher.main(cfg)
    said = capsys.readouterr().out
    assert f"was begun by a kd writing cache format 7: its shards are computed again in format {FORMAT_VERSION}" in said
    assert ", 0 of them already complete" in said
    assert TeacherCache(out).info.format_version == FORMAT_VERSION and verify(out, log=lambda *_: None) == []


def test_reader_keeps_few_files_open(tmp_path, make_cache_config, llama_teacher):
    """More shards than the process may open files (ulimit -n 64), read in a random order, twice: no error, and
    the values equal a fresh reader's."""
    out = cache_teacher.main(
        make_cache_config(
            llama_teacher,
            tmp_path / "c",
            **{
                "cache.sequences_per_shard": 1,
                "data.max_train_sequences": 120,
                "data.max_eval_sequences": 1,
                "cache.hidden_layers": "[]",
                "cache.sample_n": 0,
                "cache.store_text": "false",
            },
        )
    )
    assert len(list(out.glob("train-*.h5"))) == 120
    script = f"""
import resource, sys, numpy as np
sys.path.insert(0, {str(ROOT)!r})
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
from kd.cache import TeacherCache
split = TeacherCache({str(out)!r}).split("train")
order = np.random.default_rng(0).permutation(len(split))
total = 0
for _ in range(2):
    for i in order:
        total += int(split[int(i)]["input_ids"].sum())
print("ok", total, len(split._files[__import__("os").getpid()]))
"""
    r = warm.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ok, total, still_open = r.stdout.split()
    expected = 2 * sum(int(TeacherCache(out).split("train")[i]["input_ids"].sum()) for i in range(120))
    assert int(total) == expected and int(still_open) <= 32


def test_size_estimate_bounds_the_real_cache(tmp_path, make_cache_config, llama_teacher):
    """The pre-flight estimate (kd.cache.sequence_bytes, + 64 KiB per shard) against what was written: the bound
    holds, the estimate is within 2x (tiny shards are mostly HDF5 structure; at the demo's sizes it is within 1%)."""
    from kd.cache import sequence_bytes

    for extra in ({}, {"cache.store_text": True, "cache.hidden_layers": "[]"}, {"cache.sample_n": 0}):
        out = cache_teacher.main(make_cache_config(llama_teacher, tmp_path / str(len(extra)), **extra))
        m = json.loads((out / MANIFEST).read_text())
        shards = [s for split in m["splits"] for s in shard_records(out, m, split)]
        n = sum(s["num_sequences"] for s in shards)
        est, high = (n * b + len(shards) * (64 << 10) for b in sequence_bytes(m))
        assert m["bytes"] <= high and m["bytes"] / 2 <= est <= 2 * m["bytes"], (extra, m["bytes"], est, high)


def test_shards_are_sized_in_bytes(tmp_path, make_cache_config, llama_teacher):
    """cache.shard_bytes (sequences_per_shard null): every shard holds at most shard_bytes plus one sequence, and
    all but each split's last are more than half full; the count is recorded in the manifest."""
    limit = 150_000
    out = cache_teacher.main(
        make_cache_config(
            llama_teacher,
            tmp_path / "c",
            **{
                "cache.sequences_per_shard": "null",
                "cache.shard_bytes": limit,
                "data.seq_len": 64,
                "cache.hidden_layers": "[0, 1, 2]",
            },
        )
    )
    m = json.loads((out / MANIFEST).read_text())
    S = m["sequences_per_shard"]
    for split in m["splits"]:
        shards = shard_records(out, m, split)
        per_sequence = max(sh["bytes"] / sh["num_sequences"] for sh in shards)
        assert len(shards) > 1
        for sh in shards:
            assert sh["bytes"] <= limit + per_sequence, (sh["file"], sh["bytes"])
        for sh in shards[:-1]:
            assert sh["num_sequences"] == S and sh["bytes"] > limit / 2, (sh["file"], sh["bytes"])


def test_the_equivalence_script_tells_identical_caches_and_runs_from_different_ones(
    tmp_path, tiny_cache, make_cache_config, llama_teacher
):
    """bench/equivalence.py, the check that a refactoring changed nothing: a cache and a run equal themselves; a cache
    drawn with another sampling seed, and a run whose metrics moved, are reported with what differs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("equivalence", ROOT / "bench" / "equivalence.py")
    eq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eq)
    assert eq.compare_caches(tiny_cache, tiny_cache) == []
    other = cache_teacher.main(
        make_cache_config(
            llama_teacher,
            tmp_path / "other",
            **{"data.max_train_sequences": 64, "data.max_eval_sequences": 12, "cache.sample_seed": 1},
        )
    )
    diffs = eq.compare_caches(tiny_cache, other)
    assert any(".sample_ids differs" in d or ".sample_counts differs" in d for d in diffs), diffs[:5]
    assert any("not byte-identical" in d for d in diffs)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5, "tokens_per_s": 10.0}\n')
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5000001, "tokens_per_s": 99.0}\n')
    assert eq.compare_runs(run, run) == []
    assert eq.compare_runs(run, moved) == ["metrics.jsonl line 1.loss: 2.5 != 2.5000001"]  # timings are not compared
