"""`--dry-run`: the plans of both passes against what the passes then do (kd/cache/plan.py, kd/train/plan.py)."""

from __future__ import annotations

import json
import sys

import pytest
import warm
from conftest import cache_overrides, make_text
from test_chat_cache import chat_files, chat_overrides, chat_teacher  # noqa: F401  (fixtures)
from test_train import overrides as train_overrides
from transformers import AutoModelForCausalLM

import kd.cache.plan
from kd import cache_teacher
from kd.cache import MANIFEST
from kd.cache.build import plan
from kd.cache_config import CacheConfig
from kd.config import load_config
from kd.train import read_metrics


def cache_and_plan(overrides: list[str]):
    cfg = load_config(CacheConfig, None, overrides)
    estimate = plan(cfg)
    assert not (estimate.output_dir).exists()  # a dry run writes nothing where the cache goes
    manifest = json.loads((cache_teacher.main(cfg) / MANIFEST).read_text())
    return estimate, manifest


def assert_close(estimate, manifest, exact: bool):
    """The cache's bytes within 10% (the goal) and under the bound; windows and shards exact for a corpus ingested
    whole, else the total within 10% and each split within 20% (a sample's documents fall on either side of the
    per-document hash split by chance, so the plan uses the expected shares)."""
    real = {s: manifest["splits"][s]["num_sequences"] for s in ("train", "eval")}
    shards = sum(manifest["splits"][s]["shard_index"]["num_shards"] for s in ("train", "eval"))
    if exact:
        assert estimate.windows == real and estimate.shards == shards
    else:
        assert sum(estimate.windows.values()) == pytest.approx(sum(real.values()), rel=0.10)
        assert all(estimate.windows[s] == pytest.approx(real[s], rel=0.20) for s in real), (estimate.windows, real)
        assert estimate.shards == pytest.approx(shards, rel=0.10, abs=1)
    assert estimate.bytes[0] == pytest.approx(manifest["bytes"], rel=0.10)
    assert estimate.bytes[0] <= estimate.bytes[1] and manifest["bytes"] <= estimate.bytes[1]


def test_a_cache_plan_ingested_whole_counts_exactly(llama_teacher, corpus_dir, tmp_path):
    """The fixture corpus fits the sample: the plan's windows and shards are the pass's own, the bytes within 10%."""
    estimate, manifest = cache_and_plan(
        cache_overrides(llama_teacher, corpus_dir, tmp_path / "c", **{"data.max_train_sequences": 100})
    )
    assert estimate.exact
    assert_close(estimate, manifest, exact=True)


def test_a_sampled_cache_plan_is_within_ten_percent(llama_teacher, tmp_path, monkeypatch):
    """A corpus larger than the sample: windows and bytes scaled from its first ~8 KB; the split by document hash."""
    monkeypatch.setattr(kd.cache.plan, "SAMPLE_BYTES", 3000)
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "docs.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": make_text(1000 + i, 8 + i % 12)}) + "\n")
    extra = {"data.max_train_sequences": "null", "data.eval_files": "[]", "data.eval_fraction": 0.3}
    extra["cache.sequences_per_shard"] = "null"
    extra["data.files"] = f"[{data}/docs.jsonl]"
    estimate, manifest = cache_and_plan(cache_overrides(llama_teacher, data, tmp_path / "c", **extra))
    assert not estimate.exact and estimate.sampled_bytes < estimate.input_bytes / 3
    assert_close(estimate, manifest, exact=False)


def test_a_chat_cache_plan_is_within_ten_percent(chat_teacher, chat_files, tmp_path, monkeypatch):  # noqa: F811
    # half the training conversations sampled (the held-out file, a quarter of the train file's size, whole)
    monkeypatch.setattr(kd.cache.plan, "SAMPLE_BYTES", (chat_files / "train.jsonl").stat().st_size // 2)
    extra = {"cache.store_text": "true", "cache.sequences_per_shard": "null"}
    estimate, manifest = cache_and_plan(chat_overrides(chat_teacher, chat_files, tmp_path / "c", **extra))
    assert not estimate.exact
    assert_close(estimate, manifest, exact=False)


def test_the_dry_run_prints_the_plan_and_writes_nothing(llama_teacher, corpus_dir, tmp_path, capsys):
    out = tmp_path / "c"
    assert cache_teacher.cli(["--dry-run", *cache_overrides(llama_teacher, corpus_dir, out)]) is None
    text = capsys.readouterr().out
    for word in ("input", "windows", "shards", "cache", "disk", "not estimated: time"):
        assert any(line.startswith(word) for line in text.splitlines()), word
    assert not out.exists()


def test_a_training_plan_matches_the_run(tiny_cache, tmp_path):
    """The dry run's steps, tokens and parameters are the run's; its peak-memory estimate is within 25% of the peak
    resident size the run logs (each in a process of its own, as a user runs them)."""
    args = train_overrides(tiny_cache, tmp_path, **{"train.max_steps": 4})
    dry = warm.run([sys.executable, "-m", "kd", "train", "--dry-run", *args], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert not (tmp_path / "r").exists()
    lines = {line.split()[0]: line for line in dry.stdout.splitlines()}
    real = warm.run([sys.executable, "-m", "kd", "train", *args], capture_output=True, text=True)
    assert real.returncode == 0, real.stderr
    record = json.loads((tmp_path / "r" / "config.json").read_text())
    steps = [r for r in read_metrics(tmp_path / "r") if "loss" in r]
    assert f"{record['total_steps']:,} optimizer steps ({record['steps_per_epoch']:,} per epoch" in lines["schedule"]
    assert f"{2 * 2 * 32:,} per step" in lines["tokens"]
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "final")
    assert lines["student"].startswith(f"student     {lm.num_parameters():,} parameters")
    estimate = float(lines["memory"].split("~")[1].split()[0].replace(",", ""))
    measured = max(r["peak_mem_mb"] for r in steps)
    assert estimate == pytest.approx(measured, rel=0.25), (estimate, measured)
