"""The low-rank hidden-state codec (kd/cache/basis.py, kd/cache/codecs.py LowRank): round trip within its stated
error, exact at full rank, the basis fitted once and bound to the shards, training reads it."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import warm

from kd import cache_teacher, train_student
from kd.cache import BASIS_FILE, MANIFEST, HiddenBasis, TeacherCache, summary, verify
from kd.cache.codecs import field_codec
from kd.io import sha256_file

ROOT = Path(__file__).resolve().parents[1]
H = 32  # the tiny teachers' hidden size (tests/conftest.py TINY)
FP32 = {"cache.hidden_codec": "fp32"}


@pytest.fixture(scope="module")
def fp32_cache(tmp_path_factory, make_cache_config, llama_teacher) -> Path:
    return cache_teacher.main(make_cache_config(llama_teacher, tmp_path_factory.mktemp("fp32") / "c", **FP32))


def lowrank(tmp_path, make_cache_config, teacher, rank: int, coefficients: str = "q8", **extra) -> Path:
    overrides = {
        "cache.hidden_codec": "lowrank",
        "cache.hidden_rank": rank,
        "cache.hidden_coefficients": coefficients,
        "cache.hidden_basis_tokens": 300,
        **extra,
    }
    return cache_teacher.main(make_cache_config(teacher, tmp_path / f"lowrank{rank}{coefficients}", **overrides))


def test_basis_is_the_covariance_eigenbasis_of_the_first_tokens(tmp_path, make_cache_config, llama_teacher, fp32_cache):
    out = lowrank(tmp_path, make_cache_config, llama_teacher, 8)
    basis = HiddenBasis.load(out / BASIS_FILE)
    assert basis.components.shape == (2, H, 8) and basis.mean.shape == (2, H)
    for j in range(2):
        np.testing.assert_allclose(basis.components[j].T @ basis.components[j], np.eye(8), atol=1e-5)
    # the same fit from the fp32 cache's states: whole windows, in order, until 300 tokens are reached
    split = TeacherCache(fp32_cache).split("train")
    states, tokens, i = [], 0, 0
    while tokens < 300:
        item = split[i]
        n = int(item["length"])
        states.append(item["hidden_states"][:, :n].double().numpy())
        tokens, i = tokens + n, i + 1
    x = np.concatenate(states, axis=1)  # [L, N, H]
    assert basis.meta["tokens"] == x.shape[1] and basis.meta["sequences"] == i
    for j in range(2):
        np.testing.assert_allclose(basis.mean[j], x[j].mean(0), rtol=1e-4, atol=1e-5)
        w, v = np.linalg.eigh(np.cov(x[j].T, bias=True))
        np.testing.assert_allclose(basis.eigenvalues[j], w[::-1], rtol=1e-3, atol=1e-6)
        # the same subspace (directions are defined up to sign; the 8th and 9th eigenvalues are distinct here)
        top = v[:, ::-1][:, :8]
        np.testing.assert_allclose(np.abs(top.T @ basis.components[j]).max(0), 1.0, atol=1e-3)
    m = json.loads((out / MANIFEST).read_text())
    spec = m["codecs"]["hidden_states"]
    assert spec["basis_sha256"] == sha256_file(out / BASIS_FILE)
    assert spec["variance_kept"] == basis.variance_kept() and all(0 < v < 1 for v in spec["variance_kept"])
    assert "lowrank r=8 (q8 coefficients; variance kept" in summary(out)


@pytest.mark.parametrize("coefficients", ["q8", "fp16"])
def test_round_trip_within_the_stated_error(tmp_path, make_cache_config, llama_teacher, fp32_cache, coefficients):
    """Decoded = mean + U c~, where c~ is the stored coefficients: its distance to the exact projection of the
    teacher's state is at most the coefficients' rounding (q8: half a step per coefficient, sqrt(r) of them)."""
    r = 12
    out = lowrank(tmp_path, make_cache_config, llama_teacher, r, coefficients)
    basis = HiddenBasis.load(out / BASIS_FILE)
    exact, coded = TeacherCache(fp32_cache).split("train"), TeacherCache(out).split("train")
    assert coded[0]["hidden_states"].shape == exact[0]["hidden_states"].shape == (2, 32, H)
    worst = 0.0
    for i in range(0, len(exact), 5):
        h = exact[i]["hidden_states"].double().numpy()  # [L, T, H]
        c = np.einsum("lth,lhr->ltr", h - basis.mean[:, None, :], basis.components.astype(np.float64))
        projected = basis.mean[:, None, :] + np.einsum("ltr,lhr->lth", c, basis.components.astype(np.float64))
        err = np.linalg.norm(coded[i]["hidden_states"].double().numpy() - projected, axis=-1)  # [L, T]
        if coefficients == "q8":
            bound = math.sqrt(r) * (c.max(-1) - c.min(-1)) / 255 / 2 * (1 + 1e-3) + 1e-4
        else:
            bound = 2e-3 * np.linalg.norm(c, axis=-1) + 1e-4  # fp16: 11-bit mantissa per coefficient
        assert (err <= bound).all()
        worst = max(worst, float((err / np.linalg.norm(h - basis.mean[:, None, :], axis=-1)).max()))
    assert worst > 0  # lossy for real
    # storage: r coefficients (+ an 8-byte anchor and step with q8) per token and layer
    with h5py.File(out / "train-00000.h5") as f:
        assert f["hidden_states"].shape[1:] == (2, 32, r)
        assert f["hidden_states"].dtype == (np.uint8 if coefficients == "q8" else np.float16)
    assert verify(out, log=lambda *_: None) == []


def test_full_rank_fp32_is_exact(tmp_path, make_cache_config, llama_teacher, fp32_cache):
    out = lowrank(tmp_path, make_cache_config, llama_teacher, H, "fp32")
    exact, coded = TeacherCache(fp32_cache).split("eval"), TeacherCache(out).split("eval")
    for i in range(len(exact)):
        torch.testing.assert_close(coded[i]["hidden_states"], exact[i]["hidden_states"], rtol=1e-4, atol=1e-4)
        assert torch.equal(coded[i]["topk_ids"], exact[i]["topk_ids"])


def test_rank_above_the_hidden_size_is_refused(tmp_path, corpus_dir, llama_teacher):
    from tests.conftest import cache_overrides

    result = warm.run(
        [
            sys.executable,
            str(ROOT / "cache_teacher.py"),
            *cache_overrides(llama_teacher, corpus_dir, tmp_path / "c"),
            "cache.hidden_codec=lowrank",
            "cache.hidden_rank=33",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: cache.hidden_rank=33 is larger than the teacher's hidden size (32); lower it (at the hidden size, "
        "lowrank with fp32 coefficients is exact)"
    )


def test_resume_keeps_the_basis_and_a_changed_basis_is_caught(tmp_path, make_cache_config, llama_teacher, capsys):
    out = lowrank(tmp_path, make_cache_config, llama_teacher, 8)
    sha = sha256_file(out / BASIS_FILE)
    files = {p.name: p.read_bytes() for p in out.glob("*.h5")}
    # a run killed before its manifest, with the last shard lost: the resume keeps the basis and the other shards
    (out / MANIFEST).unlink()
    (out / "train-00004.h5").unlink()
    capsys.readouterr()
    lowrank(tmp_path, make_cache_config, llama_teacher, 8)
    log = capsys.readouterr().out
    assert "low-rank basis" not in log and "17 of them already complete" in log
    assert sha256_file(out / BASIS_FILE) == sha
    assert {p.name: p.read_bytes() for p in out.glob("*.h5")} == files
    # the basis file replaced after the cache was written: every reader and verify refuse it
    other = HiddenBasis.load(out / BASIS_FILE)
    other.mean = other.mean + 1.0
    other.write(out / BASIS_FILE)
    problems = verify(out, log=lambda *_: None)
    assert len(problems) == 1 and "is not the one this cache was written with" in problems[0]
    with pytest.raises(Exception, match="is not the one this cache was written with"):
        TeacherCache(out).split("train")
    # a reader that does not read hidden states does not need the basis
    assert TeacherCache(out).split("train", ("input_ids", "topk_ids"))[0]["topk_ids"].shape == (32, 16)


def test_a_shard_encoded_with_another_basis_is_redone(tmp_path, make_cache_config, llama_teacher):
    out = lowrank(tmp_path, make_cache_config, llama_teacher, 8)
    good = (out / "train-00001.h5").read_bytes()
    side = out / "train-00001.json"
    info = json.loads(side.read_text())
    info["basis_sha256"] = "0" * 64  # as if written by a run with a refitted basis
    side.write_text(json.dumps(info))
    (out / MANIFEST).unlink()
    lowrank(tmp_path, make_cache_config, llama_teacher, 8)
    assert json.loads(side.read_text())["basis_sha256"] == sha256_file(out / BASIS_FILE)
    assert (out / "train-00001.h5").read_bytes() == good  # recomputed, and equal
    assert verify(out, log=lambda *_: None) == []


def test_training_with_the_feature_loss_reads_a_lowrank_cache(tmp_path, make_cache_config, llama_teacher):
    from tests.test_train import make_cfg, steps_of

    out = lowrank(
        tmp_path, make_cache_config, llama_teacher, 8, **{"data.max_train_sequences": 64, "data.max_eval_sequences": 12}
    )
    run = train_student.main(
        make_cfg(out, tmp_path, **{"loss.alpha_feature": 0.5, "loss.feature_layers": "[[1, 2]]", "train.max_steps": 3})
    )
    feature = [s["feature"] for s in steps_of(run)]
    assert len(feature) == 3 and all(0 < f < 2 for f in feature)


def test_codec_refuses_to_work_without_its_basis():
    codec = field_codec({"name": "lowrank", "rank": 4, "coefficients": "q8"})
    assert codec.datasets("hidden_states", (2, 8, 16)) == {
        "hidden_states": ((2, 8, 4), np.dtype(np.uint8)),
        "hidden_states_q8": ((2, 8, 2), np.dtype(np.float32)),
    }
    with pytest.raises(Exception, match="needs its basis"):
        codec.encode("hidden_states", np.zeros((1, 2, 8, 16), np.float32))


def test_copy_without_basis_file_is_refused(tmp_path, make_cache_config, llama_teacher):
    out = lowrank(tmp_path, make_cache_config, llama_teacher, 8)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / BASIS_FILE).unlink()
    with pytest.raises(Exception, match="basis .* is missing"):
        TeacherCache(copy).split("train")


def test_a_lowrank_config_that_stores_no_layers_needs_no_basis(tmp_path, make_cache_config, llama_teacher):
    """hidden_codec=lowrank with hidden_layers=[] (the demo's config with its layers turned off, as a served teacher
    must): no basis is fitted, and verify and the reader accept the cache without one (verify asked for it)."""
    out = cache_teacher.main(
        make_cache_config(
            llama_teacher,
            tmp_path / "c",
            **{"cache.hidden_codec": "lowrank", "cache.hidden_layers": "[]", "cache.sample_n": 0},
        )
    )
    assert not (out / BASIS_FILE).exists()
    assert verify(out, log=lambda *a: None) == []
    assert "hidden_states" not in TeacherCache(out).split("train")[0]
