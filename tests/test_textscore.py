"""Tokenizer-free scores (kd/textscore.py): bits per character and byte by hand on the real tokenizers, and the
teacher's score in the manifest against a recomputation."""

from __future__ import annotations

import json
import math
import shutil

import h5py
import numpy as np
import pytest
import torch
import warm

from kd.cache import MANIFEST, TeacherCache
from kd.textscore import bits_per_unit, score_record, target_text_units


@pytest.mark.parametrize("which", ["qwen", "smollm2"])
def test_characters_and_bytes_of_the_targets_by_hand(real_tokenizers, which):  # noqa: F811
    """Two documents with multi-byte characters, joined by the separator, as one window, then padded: the scored
    targets are every token but the first, the separator counts one character and one byte, padding nothing."""
    tok = real_tokenizers[0 if which == "qwen" else 1]
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    a, b = "Quoth Ñandú, the king: «ay».", " Zwölf Boxkämpfer jagen Viktor."
    ia, ib = tok(a, add_special_tokens=False)["input_ids"], tok(b, add_special_tokens=False)["input_ids"]
    window = ia + [sep] + ib
    first = tok.decode(ia[:1])  # the one token that is not a target
    assert a.startswith(first) and "\ufffd" not in first
    chars = len(a) - len(first) + 1 + len(b)
    nbytes = len(a.encode()) - len(first.encode()) + 1 + len(b.encode())
    padded = np.array([window + [sep] * 7])  # padding past the length is never counted
    got = target_text_units(tok, padded, [len(window)], sep)
    assert got.tolist() == [[chars, nbytes]]
    assert nbytes > chars  # the text really has multi-byte characters
    # a second window in the batch, without separator and shorter
    got = target_text_units(
        tok, np.array([window + [sep] * 7, ib + [sep] * (len(window) + 7 - len(ib))]), [len(window), len(ib)], sep
    )
    second = tok.decode(ib[:1])
    assert got[1].tolist() == [len(b) - len(second), len(b.encode()) - len(second.encode())]


def test_rates_from_sums():
    r = score_record(nats=100 * math.log(2), tokens=50, chars=200, nbytes=250)
    assert r["bits_per_char"] == pytest.approx(0.5) and r["bits_per_byte"] == pytest.approx(0.4)
    assert r["ce_per_token"] == pytest.approx(2 * math.log(2))
    assert math.isnan(bits_per_unit(1.0, 0))


def recomputed_scores(cache, teacher, split: str) -> np.ndarray:
    """[windows, 4] the teacher's score on each window of a cache split (nats, scored targets, characters, bytes),
    recomputed with a full softmax in fp64 over the cached windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    tok = AutoTokenizer.from_pretrained(teacher)
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    reader = TeacherCache(cache).split(split, ("input_ids",))
    rows = []
    for i in range(len(reader)):
        item = reader[i]
        n = int(item["length"])
        ids = item["input_ids"][:n][None]
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits.double(), -1)[0, :-1]
        units = target_text_units(tok, item["input_ids"][None].numpy(), [n], sep)[0]
        rows.append([-float(lp.gather(1, ids[0, 1:, None]).sum()), n - 1, *units])
    return np.array(rows)


def test_the_cache_holds_the_teachers_score_recomputed(tiny_cache, llama_teacher):
    """The caching pass's teacher score on each window (in its shard, format 8) and per split (in the manifest)
    equals a full-softmax recomputation over the cached windows."""
    m = json.loads((tiny_cache / MANIFEST).read_text())
    for split in ("train", "eval"):
        want = recomputed_scores(tiny_cache, llama_teacher, split)
        reader = TeacherCache(tiny_cache).split(split, ())
        stored = reader.teacher_scores(len(reader))
        assert stored[:, 1:].tolist() == want[:, 1:].tolist()  # targets, characters, bytes: exact
        np.testing.assert_allclose(stored[:, 0], want[:, 0], rtol=1e-5)
        nats, tokens, chars, nbytes = want.sum(0)
        got = m["splits"][split]["teacher_score"]
        assert [got["tokens"], got["chars"], got["bytes"]] == [tokens, chars, nbytes]
        assert got["nats"] == pytest.approx(nats, rel=1e-5)
        assert got["bits_per_char"] == pytest.approx(nats / math.log(2) / chars, rel=1e-5)
        # any run of windows: across shard boundaries, from one, empty, and past the end
        assert len(reader.starts) > 1
        n = len(reader)
        for start, end in ((0, n), (1, n - 1), (int(reader.starts[1]), n), (n - 1, n + 5), (2, 2), (n, n)):
            np.testing.assert_array_equal(reader.teacher_scores(end, start=start), stored[start:end])
        with pytest.raises(ValueError, match="not a range"):
            reader.teacher_scores(2, start=3)


@pytest.mark.parametrize("teacher_bpc,warned", [(99.0, True), (0.01, False)])
def test_step_0_compares_the_student_with_the_teacher(tiny_cache, tmp_path, capsys, teacher_bpc, warned):
    """The student's eval bits/char use the same text units as the teacher's score (same windows, same tokenizer:
    the manifest's characters); a teacher that is not better is warned about loudly, or refused on request."""
    import shutil

    from test_train import make_cfg

    from kd import train_student
    from kd.errors import KDError
    from kd.train import read_metrics

    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    m = json.loads((cache / MANIFEST).read_text())
    m["splits"]["eval"]["teacher_score"]["bits_per_char"] = teacher_bpc
    (cache / MANIFEST).write_text(json.dumps(m))
    run = train_student.main(make_cfg(cache, tmp_path, **{"train.max_steps": 3, "loss.alpha_feature": 0}))
    err = capsys.readouterr().err
    assert ("WARNING: the teacher is not better than the student" in err) == warned
    records = read_metrics(run)
    ref = next(r for r in records if r.get("event") == "teacher_reference")
    assert ref["teacher/bits_per_char"] == teacher_bpc
    first = next(r for r in records if "eval/ce" in r)
    chars = m["splits"]["eval"]["teacher_score"]["chars"]
    assert first["eval/tokens"] == m["splits"]["eval"]["teacher_score"]["tokens"]
    assert first["eval/bits_per_char"] == pytest.approx(first["eval/ce"] * first["eval/tokens"] / math.log(2) / chars)
    if warned:
        with pytest.raises(KDError, match=r"teacher is not better .* \(train.on_weaker_teacher=refuse; "):
            train_student.main(
                make_cfg(cache, tmp_path / "b", **{"train.max_steps": 3, "train.on_weaker_teacher": "refuse"})
            )


def test_a_capped_eval_is_compared_with_the_teacher_on_the_same_windows(tiny_cache, llama_teacher, tmp_path, capsys):
    """train.eval_max_sequences scores the student on the eval split's first windows: the step-0 reference, its
    record and the model card give the teacher's score on those same windows (kept per window since format 8),
    and say nothing more; on a cache older than format 8 (the score per shard only) they say that the teacher was
    scored on the whole split."""
    from test_train import make_cfg

    from kd import train_student
    from kd.evaluate import on_cache
    from kd.textscore import eval_text_differs
    from kd.train import read_metrics

    windows = json.loads((tiny_cache / MANIFEST).read_text())["splits"]["eval"]["num_sequences"]
    assert windows > 3 and eval_text_differs(None, windows) == eval_text_differs(windows, windows) == ""
    per_shard = int(TeacherCache(tiny_cache).manifest["sequences_per_shard"])
    cap = per_shard + 1  # the first shard's windows and one of the next
    assert cap < windows
    nats, tokens, chars, _ = recomputed_scores(tiny_cache, llama_teacher, "eval")[:cap].sum(0)
    run = train_student.main(make_cfg(tiny_cache, tmp_path, **{"train.max_steps": 3, "train.eval_max_sequences": cap}))
    ref = next(r for r in read_metrics(run) if r.get("event") == "teacher_reference")
    assert ref["teacher/windows"] == cap and ref["teacher/ce"] == pytest.approx(nats / tokens, rel=1e-5)
    bpc = nats / math.log(2) / chars
    assert ref["teacher/bits_per_char"] == pytest.approx(bpc, rel=1e-5)
    whole = TeacherCache(tiny_cache).info.splits["eval"].teacher_score["bits_per_char"]
    assert abs(whole - bpc) > 1e-3  # the first windows score otherwise than the whole split: the test can tell
    out, card = capsys.readouterr().out, (run / "final" / "README.md").read_text()
    assert f"held-out bits/char: teacher {ref['teacher/bits_per_char']:.4f}, student" in out
    assert "train.eval_max_sequences" not in out and "train.eval_max_sequences" not in card
    assert f"{ref['teacher/bits_per_char']:.4f} bits/char" in card
    _, teacher = on_cache(str(run / "final"), str(tiny_cache), "eval", cap, 8, "fp32")  # python -m kd.evaluate
    assert teacher["bits_per_char"] == ref["teacher/bits_per_char"]

    old = tmp_path / "format7"  # the same cache as format 7 wrote it: no per-window scores in its shards
    shutil.copytree(tiny_cache, old)
    m = json.loads((old / MANIFEST).read_text())
    (old / MANIFEST).write_text(json.dumps(dict(m, format_version=7)))
    for shard in old.glob("*.h5"):
        with h5py.File(shard, "r+") as f:
            del f["teacher_score"]
            whole = json.loads(f["checksums"].attrs["whole"])
            f["checksums"].attrs["whole"] = json.dumps({k: v for k, v in whole.items() if k != "teacher_score"})
            f.attrs["kd_meta"] = json.dumps(dict(json.loads(f.attrs["kd_meta"]), format_version=7))
    run = train_student.main(make_cfg(old, tmp_path / "b", **{"train.max_steps": 3, "train.eval_max_sequences": 1}))
    records = read_metrics(run)
    assert next(r for r in records if r.get("event") == "teacher_reference")["teacher/windows"] == windows
    said = (
        f"(the teacher on all {windows:,} eval windows, the student on the first 1: train.eval_max_sequences; a cache "
        "of format 8 on, cache.overwrite=true, keeps the teacher's score per window)"
    )
    assert said in capsys.readouterr().out
    assert said in (run / "final" / "README.md").read_text()
    assert on_cache(str(run / "final"), str(old), "eval", 1, 8, "fp32")[1] is None  # not on the same windows


def test_the_eval_command_reproduces_the_runs_final_eval(tiny_cache, tmp_path, corpus_dir):
    """`python -m kd.evaluate final/ --cache` equals the run's last eval record; on text files it scores the
    held-out play; a model with another tokenizer than the cache is refused with the way out."""
    import sys

    from conftest import ROOT
    from test_train import make_cfg

    from kd import train_student
    from kd.train import read_metrics

    run = train_student.main(make_cfg(tiny_cache, tmp_path, **{"train.max_steps": 4, "loss.alpha_feature": 0}))
    final = [r for r in read_metrics(run) if "eval/ce" in r][-1]

    def cli(*args):
        r = warm.run([sys.executable, "-m", "kd.evaluate", *args], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    got = json.loads(cli(str(run / "final"), "--cache", str(tiny_cache), "--json"))
    for key in ("eval/ce", "eval/kd", "eval/top1_agreement", "eval/bits_per_char", "eval/bits_per_byte"):
        assert got[key] == pytest.approx(final[key], rel=1e-5), key
    assert got["eval/tokens"] == final["eval/tokens"] and "teacher/bits_per_char" in got
    printed = cli(str(run / "final"), "--text", str(corpus_dir / "heldout" / "play5.txt"), "--seq-len", "32")
    bpc = float(printed.split("bits/char")[1].split()[0])
    # the same play as the cache's eval split (there capped to 12 windows of 32 tokens): close, not equal
    assert bpc == pytest.approx(final["eval/bits_per_char"], rel=0.1) and "target tokens" in printed
    other = tmp_path / "other"
    shutil.copytree(tiny_cache, other)
    m = json.loads((other / MANIFEST).read_text())
    m["tokenizer"]["fingerprint"] = "0" * 64
    (other / MANIFEST).write_text(json.dumps(m))
    from kd.errors import KDError
    from kd.evaluate import main as evaluate_main

    with pytest.raises(KDError, match="has another tokenizer than the cache .* evaluate it on the text instead"):
        evaluate_main([str(run / "final"), "--cache", str(other)])


def test_a_second_eval_text_is_scored_at_every_eval(tiny_cache, tmp_path, corpus_dir, monkeypatch):
    """train.extra_eval_files: each eval record also carries extra_eval/* on that text, equal to kd.evaluate's
    score of the same model on the same files (checked on final/). The fused-head probe runs once per run, not per
    eval."""
    from test_train import make_cfg

    import kd.models
    import kd.textscore
    import kd.train.model
    from kd import train_student
    from kd.evaluate import on_text
    from kd.train import read_metrics

    probes = []
    real_probe = kd.models.head_fallback_reason
    for where in (kd.train.model, kd.textscore):  # the modules that probe (each imported the function by name)
        monkeypatch.setattr(where, "head_fallback_reason", lambda lm: probes.append(1) or real_probe(lm))
    play = str(corpus_dir / "play0.txt")
    run = train_student.main(
        make_cfg(
            tiny_cache,
            tmp_path,
            **{
                "train.max_steps": 4,
                "train.eval_every": 2,
                "loss.alpha_feature": 0,
                "train.extra_eval_files": f"[{play}]",
            },
        )
    )
    evals = [r for r in read_metrics(run) if "eval/ce" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all("extra_eval/bits_per_char" in r for r in evals)
    assert len(probes) == 1
    assert evals[-1]["extra_eval/ce"] < evals[0]["extra_eval/ce"]  # it trains on text like it
    score = on_text(str(run / "final"), [play], 32, 8, "fp32", "text")
    assert score["bits_per_char"] == pytest.approx(evals[-1]["extra_eval/bits_per_char"], rel=1e-5)
