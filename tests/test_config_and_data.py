"""Config loading (YAML + dotted overrides, strict keys and types) and the data split/packing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
import pytest

from conftest import ROOT
from kd import data
from kd.cache_config import CacheConfig
from kd.config import diff_keys, load_config, to_dict
from kd.errors import KDError


def test_every_shipped_config_loads():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        # a config is for one script: the top-level keys tell which
        import yaml

        keys = set(yaml.safe_load(path.read_text()))
        if "cache" in keys:
            cls = CacheConfig
        else:
            from kd.train_config import TrainConfig as cls
        cfg = load_config(cls, path)
        assert to_dict(cfg), path


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


def test_diff_keys():
    assert diff_keys({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 0}) == ["a.c", "d"]


def test_document_split_is_deterministic_and_disjoint():
    train, ev = data.split_documents(20, 0, 0.2, seed=3)
    assert (train, ev) == data.split_documents(20, 0, 0.2, seed=3)
    assert len(ev) == 4 and set(train).isdisjoint(ev) and sorted(train + ev) == list(range(20))
    assert data.split_documents(20, 0, 0.2, seed=4)[1] != ev
    assert len(data.split_documents(20, 5, 0.2, seed=3)[1]) == 5  # a count takes precedence over a fraction
    with pytest.raises(KDError, match="leaving none for training"):
        data.split_documents(3, 3, 0.1, seed=0)


def test_pack_joins_documents_and_keeps_the_last_partial_window():
    p = data.pack([[1, 2, 3], [4, 5]], [0, 1], seq_len=4, sep_id=9, pad_id=0)
    # stream 1 2 3 9 4 5 9 -> [1 2 3 9] [4 5 9 pad]
    np.testing.assert_array_equal(p.input_ids, [[1, 2, 3, 9], [4, 5, 9, 0]])
    np.testing.assert_array_equal(p.lengths, [4, 3])
    assert p.num_tokens == 7
    # a trailing single token has no target: dropped
    p = data.pack([[1, 2, 3, 4]], [0], seq_len=4, sep_id=9, pad_id=0)
    np.testing.assert_array_equal(p.lengths, [4])
    assert len(data.pack([[1, 2, 3, 4, 5, 6, 7]], [0], 4, 9, 0, max_sequences=1).lengths) == 1


def test_jsonl_documents(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"body": "alpha"}\n{"body": ""}\n{"body": "beta"}\n')
    assert data.load_documents([str(f)], None, None, "train", "body") == ["alpha", "beta"]
    with pytest.raises(KDError, match="mix formats"):
        (tmp_path / "x.txt").write_text("t")
        data.expand_files([str(f), str(tmp_path / "x.txt")])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    """Every shipped config (the original pair's included: fp16, 2 x 256 tokens, GA 16, warmup as a fraction) parses
    into its script's config with no unknown key or bad value."""
    from kd.cache_config import CacheConfig
    from kd.train_config import TrainConfig

    raw = yaml.safe_load(path.read_text())
    cfg = load_config(CacheConfig if "cache" in raw else TrainConfig, path, [])
    if path.name == "original_pair_train.yaml":
        t = cfg.train
        assert (t.mixed_precision, t.micro_batch_size, t.gradient_accumulation_steps) == ("fp16", 2, 16)
        assert t.warmup_fraction > 0 and t.warmup_steps == 0 and t.schedule == "cosine"
        assert cfg.loss.cross_tokenizer == "mapped" and cfg.student.pretrained == "HuggingFaceTB/SmolLM-135M"
    if path.name == "original_pair_cache.yaml":
        assert cfg.teacher.model == "huihui-ai/Huihui-MoE-1B-A0.6B" and cfg.teacher.dtype == "fp16"
        assert cfg.cache.store_text and cfg.data.seq_len == 256
