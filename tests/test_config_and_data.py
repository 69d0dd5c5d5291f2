"""Config loading (YAML + dotted overrides, strict keys and types) and the data split/packing."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import pytest
import warm
import yaml
from conftest import ROOT

from kd import data
from kd.cache_config import CacheConfig
from kd.config import NOT_CONTENT, RESUME_FREE, diff_keys, flatten, load_config, marked_keys, to_dict
from kd.errors import KDError


def test_overrides_types_and_unknown_keys(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("data:\n  files: [a.txt]\n  seq_len: 64\n")
    cfg = load_config(CacheConfig, y, ["cache.top_k=32", "teacher.dtype=fp16", "cache.hidden_layers=[1, 2]"])
    assert (cfg.data.seq_len, cfg.cache.top_k, cfg.teacher.dtype, cfg.cache.hidden_layers) == (64, 32, "fp16", [1, 2])
    from kd.train_config import TrainConfig

    t = load_config(TrainConfig, None, ["student.pretrained=x", "train.lr=1e-3", "train.min_lr=1e-4"])
    assert (t.train.lr, t.train.min_lr) == (1e-3, 1e-4)  # YAML 1.1 would read 1e-3 as a string
    y2 = tmp_path / "t.yaml"
    y2.write_text("student:\n  pretrained: x\ntrain:\n  mixed_precision: no\n")  # YAML 1.1: `no` is False
    assert load_config(TrainConfig, y2).train.mixed_precision == "no"
    with pytest.raises(KDError, match="'train.lr' must be a number"):
        load_config(TrainConfig, None, ["student.pretrained=x", "train.lr=fast"])
    with pytest.raises(KDError, match="unknown config key.*data.seqlen"):
        load_config(CacheConfig, y, ["data.seqlen=3"])
    with pytest.raises(KDError, match="'cache.top_k' must be an integer"):
        load_config(CacheConfig, y, ["cache.top_k=lots"])
    with pytest.raises(KDError, match=r"'teacher.dtype' must be one of \['fp32', 'fp16', 'bf16'\]"):
        load_config(CacheConfig, y, ["teacher.dtype=fp8"])
    with pytest.raises(KDError, match="cache.top_k must be >= 1"):
        load_config(CacheConfig, y, ["cache.top_k=0"])
    with pytest.raises(KDError, match="must look like key=value"):
        load_config(CacheConfig, y, ["cache.top_k"])
    with pytest.raises(KDError, match="does not exist"):
        load_config(CacheConfig, tmp_path / "missing.yaml")
    with pytest.raises(KDError, match="no data given"):
        load_config(CacheConfig, None)
    with pytest.raises(KDError, match="both data.files and data.dataset"):
        load_config(CacheConfig, y, ["data.dataset=x"])
    with pytest.raises(KDError, match="data.eval_files needs data.files"):
        load_config(CacheConfig, None, ["data.dataset=x", "data.eval_files=[a.txt]"])


def test_diff_keys():
    assert diff_keys({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 0}) == ["a.c", "d"]


def test_document_split_is_per_document_and_keyed():
    from kd.data.ingest import document_split

    docs = [f"document number {i}" for i in range(4000)]
    sides = [document_split(d, 3, 0.2) for d in docs]
    assert sides == [document_split(d, 3, 0.2) for d in docs]  # deterministic, no global view
    assert 0.17 < sides.count("eval") / len(docs) < 0.23
    assert [document_split(d, 4, 0.2) for d in docs] != sides  # the seed is a key
    assert document_split("same text", 3, 0.2) == document_split("same text", 3, 0.2)  # duplicates: one side


def test_pack_joins_documents_and_keeps_the_last_partial_window():
    p = data.pack([[1, 2, 3], [4, 5]], seq_len=4, sep_id=9, pad_id=0)
    # stream 1 2 3 9 4 5 9 -> [1 2 3 9] [4 5 9 pad]
    np.testing.assert_array_equal(p.input_ids, [[1, 2, 3, 9], [4, 5, 9, 0]])
    np.testing.assert_array_equal(p.lengths, [4, 3])
    np.testing.assert_array_equal(p.doc_starts, [1, 1])
    # a trailing single token has no target: dropped
    p = data.pack([[1, 2, 3, 4]], seq_len=4, sep_id=9, pad_id=0)
    np.testing.assert_array_equal(p.lengths, [4])


def test_streaming_packer_equals_packing_at_once():
    """Windows taken after every document, after every few, or once at the end are the same windows."""
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 50, rng.integers(0, 40))) for _ in range(60)]
    whole = data.pack(docs, 16, 99, 0)
    for every in (1, 7):
        p = data.Packer(16, 99, 0, with_text=False)
        parts = []
        for i, d in enumerate(docs):
            p.add(d)
            if i % every == 0:
                parts.append(p.take())
        parts.append(p.take(final=True))
        np.testing.assert_array_equal(np.concatenate([w.input_ids for w in parts]), whole.input_ids)
        np.testing.assert_array_equal(np.concatenate([w.lengths for w in parts]), whole.lengths)
        assert sum(int(w.doc_starts.sum()) for w in parts) == sum(1 for d in docs if d)


def test_file_formats_read_the_same_documents(tmp_path):
    """Every file reader of the registry (kd.data.sources.READERS), and its compressed versions where it has them,
    reads the same documents, empty ones included."""
    import csv
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from kd.data.sources import READERS, Piece, read_piece

    docs = ["alpha beta", "", "line one\nline two", "ünïcode ✓", "x" * 5000]
    recs = [{"text": d, "id": i} for i, d in enumerate(docs)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "a.json").write_text(json.dumps(recs))
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["id", "text"])
        w.writeheader()
        w.writerows(recs)
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet", row_group_size=2)
    (tmp_path / "a.txt").write_text(docs[2])  # one document per file
    expected = {".txt": [docs[2]]}
    assert set(READERS) == {".txt", ".json", ".jsonl", ".csv", ".parquet"}  # a new reader gets its case here
    for suffix, reader in READERS.items():
        plain = tmp_path / f"a{suffix}"
        variants = [plain]
        if reader.compressible:
            (tmp_path / f"a{suffix}.gz").write_bytes(gzip.compress(plain.read_bytes()))
            (tmp_path / f"a{suffix}.zst").write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
            variants += [tmp_path / f"a{suffix}.gz", tmp_path / f"a{suffix}.zst"]
        for path in variants:
            got = [t for t, _ in read_piece(Piece(str(path), 0, os.path.getsize(path)), "text", "strict")]
            assert got == expected.get(suffix, docs), path.name


def test_units_cut_jsonl_at_line_boundaries(tmp_path):
    """A .jsonl cut into many byte ranges: every record read exactly once, whatever the unit size; small files
    share units; non-splittable files belong whole to one unit."""
    from kd.data.sources import plan_file_units, unit_documents

    docs = [f"record {i} " + "w" * (i % 17) for i in range(300)]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for i in range(5):
        (tmp_path / f"small{i}.txt").write_text(f"small {i}")
    files = [str(tmp_path / "big.jsonl")] + [str(tmp_path / f"small{i}.txt") for i in range(5)]
    for unit_bytes in (1, 7, 64, 1000, 10**9):
        units = plan_file_units(files, unit_bytes, "main")
        got = [t for u in units for t, _ in unit_documents(u, "text", "strict")]
        assert got == docs + [f"small {i}" for i in range(5)], unit_bytes
    assert len(plan_file_units(files, 10**9, "main")) == 1
    assert len(plan_file_units(files, 64, "main")) > 50


def test_bad_records_name_file_and_line(tmp_path):
    from kd.data.sources import BadRecord, Piece, plan_file_units, read_piece, unit_documents

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "caf\xe9"}\n')
    piece = Piece(str(bad), 0, bad.stat().st_size)
    with pytest.raises(KDError, match=r"bad.jsonl, line 3: invalid UTF-8 \(byte 0xe9\).*decode_errors=replace"):
        list(read_piece(piece, "text", "strict"))
    assert [t for t, _ in read_piece(piece, "text", "replace")][2] == "caf\ufffd"
    # the line number is right when the error lies in a unit that starts mid-file
    units = plan_file_units([str(bad)], 20, "main")
    assert len(units) > 1
    with pytest.raises(KDError, match="line 3: invalid UTF-8"):
        [t for u in units for t, _ in unit_documents(u, "text", "strict")]
    (tmp_path / "t.txt").write_bytes(b"ok\nok\n\xff\n")
    with pytest.raises(KDError, match=r"t.txt, line 3: invalid UTF-8"):
        list(read_piece(Piece(str(tmp_path / "t.txt"), 0, 8), "text", "strict"))
    # records without usable text come back as BadRecord (ingest applies data.bad_records), naming file and line
    for name, content, message in (
        ("j.jsonl", '{"text": "a"}\n{"text": \n', "j.jsonl, line 2: not valid JSON"),
        ("k.jsonl", '{"text": "a"}\n{"body": "b"}\n', "k.jsonl, line 2: text field 'text' is not in the record"),
        ("n.jsonl", '{"text": "a"}\n{"text": 7}\n', "n.jsonl, line 2: field 'text' holds int '7', not text"),
        ("l.jsonl", '{"text": "a"}\n["b"]\n', "l.jsonl, line 2: a record must be a JSON object"),
        ("a.json", '[{"text": "a"}, {"text": [1]}]', "a.json, record 2: field 'text' holds list"),
    ):
        (tmp_path / name).write_text(content)
        got = list(read_piece(Piece(str(tmp_path / name), 0, len(content)), "text", "strict"))
        assert got[0] == ("a", str(tmp_path / name)) and isinstance(got[1][0], BadRecord), name
        assert message in got[1][0].message, got[1][0].message
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([b"ok", b"x"], pa.binary())}), tmp_path / "b.parquet")
    got = list(read_piece(Piece(str(tmp_path / "b.parquet"), 0, 1), "text", "strict"))
    assert [g.message.split(": ", 1)[0] for g, _ in got] == [f"{tmp_path / 'b.parquet'}, row {i}" for i in (1, 2)]
    from kd.data.sources import plan_hf_units

    records = [{"text": "a"}, {"text": 3.5}, {"text": "b"}]
    got = [t for u in plan_hf_units(records, "dataset 'd'", "text", 10**6, "main") for t, _ in u.documents_fn()]
    assert got[0] == "a" and got[1].message.startswith("dataset 'd', record 2: field 'text' holds float")
    (tmp_path / "x.docx").write_text("t")
    with pytest.raises(KDError, match="unsupported data file"):
        data.expand_files([str(tmp_path / "x.docx")])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    """Every shipped config (the original pair's included: fp16, 2 x 256 tokens, GA 16, warmup as a fraction) parses
    into its script's config with no unknown key or bad value."""
    from kd.cache_config import CacheConfig
    from kd.train_config import TrainConfig

    raw = yaml.safe_load(path.read_text())
    cls = CacheConfig if "cache" in raw else TrainConfig  # a config is for one script: its top-level keys tell which
    cfg = load_config(cls, path, [])
    # what the YAML says is what loaded: every key it names, at its value (nothing dropped or defaulted over it)
    loaded = flatten(to_dict(cfg))
    for key, value in flatten(raw).items():
        assert key in loaded and loaded[key] == value, (path.name, key, value, loaded.get(key))
    if path.name == "original_pair_train.yaml":
        t = cfg.train
        assert (t.mixed_precision, t.micro_batch_size, t.gradient_accumulation_steps) == ("fp16", 2, 16)
        assert t.warmup_fraction > 0 and t.warmup_steps == 0 and t.schedule == "cosine"
        assert cfg.loss.cross_tokenizer == "mapped" and cfg.student.pretrained == "HuggingFaceTB/SmolLM-135M"
    if path.name == "original_pair_cache.yaml":
        assert cfg.teacher.model == "huihui-ai/Huihui-MoE-1B-A0.6B" and cfg.teacher.dtype == "fp16"
        assert cfg.cache.store_text and cfg.data.seq_len == 256


@pytest.mark.parametrize("script", ["cache_teacher.py", "train_student.py"])
def test_help_lists_every_config_key_with_type_default_and_doc(script):
    """A user configures a run from `--help` alone: every key of the script's config tree, documented."""
    import sys

    from kd.cache_config import CacheConfig
    from kd.config import defaults, flatten
    from kd.train_config import TrainConfig

    result = warm.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    cls = CacheConfig if script == "cache_teacher.py" else TrainConfig
    lines = {ln.strip().split(" ", 1)[0]: ln for ln in result.stdout.splitlines() if ln.startswith("  ")}
    keys = sorted(flatten(defaults(cls)))
    assert len(keys) > 30
    for key in keys:
        assert key in lines, key
        line = lines[key]
        assert "default " in line and "(undocumented)" not in line and len(line.split("): ", 1)[1]) > 10, line
    example = {
        "cache_teacher.py": "cache.top_k (int, default 256): ",
        "train_student.py": "loss.target ('topk' | 'sampled' | 'online', default 'topk'): the teacher signal",
    }[script]
    assert example in result.stdout


@dataclass
class _Inner:
    a: int = field(default=1, metadata=NOT_CONTENT)
    b: int = 2


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    c: int = field(default=3, metadata=RESUME_FREE)


def test_content_and_resume_free_keys_come_from_field_metadata():
    """What a key means beyond its value is said on its field (kd.config NOT_CONTENT, RESUME_FREE), not in a list
    kept apart: a nested tree is walked, and the shipped configs mark exactly these keys."""
    from kd.cache_config import NON_CONTENT_KEYS
    from kd.train_config import RESUME_FREE_KEYS

    assert marked_keys(_Outer, NOT_CONTENT) == ("inner.a",) and marked_keys(_Outer, RESUME_FREE) == ("c",)
    assert set(NON_CONTENT_KEYS) == {
        "teacher.batch_size",
        "teacher.device_map",
        "teacher.devices_per_process",
        "teacher.server",  # a served teacher's identity is the served model (kd.served.ServedModel.record)
        "cache.output_dir",
        "cache.overwrite",
        "data.streaming",
    }
    assert set(RESUME_FREE_KEYS) == {
        "train.cache_dir",  # found by its identity on resume, wherever it is now
        "train.output_dir",  # a moved run directory resumes
        "train.resume",
        "train.num_workers",
        "train.trust_cache",
        "train.save_final_state",
        "train.log_with",
        "train.on_weaker_teacher",
    }


@pytest.mark.parametrize(
    "key,value", [("feature_kind", "normalized_mse"), ("contrastive_temperature", 0.5), ("uld_weight", 0.3)]
)
def test_alpha_form_options_are_refused_beside_terms(key, value):
    """With loss.terms each term carries its own options: an alpha_*-form option given beside them would be ignored,
    so it is refused, naming where the option goes."""
    from kd.train_config import LossConfig

    with pytest.raises(KDError, match=f"loss.{key} applies to loss.alpha_\\* only"):
        LossConfig(terms=[{"kind": "ce", "weight": 1.0}], **{key: value})
    LossConfig(terms=[{"kind": "ce", "weight": 1.0}])  # at their defaults they change nothing
