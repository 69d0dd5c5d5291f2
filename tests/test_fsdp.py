"""FSDP2 (torch's fully_shard through Accelerate) on CPU processes with gloo: the real train_student.main, configured
from the shipped configs/accelerate/fsdp2.yaml (tests/fsdp_worker.py), against one plain process on the same
windows; sharded checkpoints resumed equal to the uninterrupted run; the gathered final save loading in
transformers; chat generations through the sharded root; and every refusal the README names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT
from test_chat_cache import chat_caches, chat_files, chat_teacher  # noqa: F401 - the chat cache fixtures
from test_chat_cache import train as train_chat
from test_chat_cache import train_overrides as chat_overrides
from test_train import assert_same_metrics, make_cfg, overrides, poisoned_cache

import train_student
from kd.dist import check_fsdp
from kd.errors import KDError
from kd.train import read_metrics

FSDP2_YAML = ROOT / "configs" / "accelerate" / "fsdp2.yaml"


def run_fsdp(cache: Path, out: Path, port: int, yaml: Path = FSDP2_YAML, env_extra=None, chat=False, **extra):
    """train_student.main on 2 CPU processes under FSDP2 (tests/fsdp_worker.py), test_train's run otherwise."""
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    args = (chat_overrides if chat else overrides)(cache, out, **extra)
    return subprocess.run(
        [*cmd, str(ROOT / "tests" / "fsdp_worker.py"), str(yaml), *args],
        capture_output=True,
        text=True,
        env=env,
    )


def test_fsdp2_on_two_processes_matches_one_process(tiny_cache, tmp_path):
    """GA 4 on 2 sharded processes vs GA 8 on one plain process: the same windows, so the same LR, losses, gradient
    norms and evals at every step, and the same final weights. One train sequence has NaN teacher log-probs: its
    window is skipped on both processes (whichever one read it) as on one, and every later step still agrees, so
    the skip left weights and Adam moments untouched. The kept checkpoint is really sharded (one DCP file per
    process) and the final folder, gathered whole, loads in transformers."""
    from transformers import AutoModelForCausalLM

    from kd.train import epoch_order

    cache = poisoned_cache(tiny_cache, tmp_path / "cache", [int(epoch_order(64, 0, 0, 0, 1, 16)[20])])  # step 2
    common = {"train.max_steps": 4, "train.eval_every": 2, "train.save_final_state": True}
    result = run_fsdp(cache, tmp_path / "two", 29531, **common, **{"train.gradient_accumulation_steps": 4})
    assert result.returncode == 0, result.stderr[-4000:]
    two = tmp_path / "two" / "r"
    one = train_student.main(make_cfg(cache, tmp_path / "one", **common, **{"train.gradient_accumulation_steps": 8}))
    a, b = read_metrics(one), read_metrics(two)
    skipped = [r["skipped"] for r in a if "loss" in r]
    assert skipped == [False, True, False, False] and skipped == [r["skipped"] for r in b if "loss" in r]
    assert json.loads((two / "config.json").read_text())["num_processes"] == 2
    assert [r["step"] for r in a] == [r["step"] for r in b]
    keys = ("lr", "loss", "ce", "kd", "feature", "grad_norm", "tokens_seen", "eval/ce", "eval/top1_agreement")
    assert all(any(key in r for r in a) for key in keys)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in set(keys) & ra.keys():
            if ra[key] is None:  # the skipped window's non-finite terms, logged as null
                assert rb[key] is None, (ra["step"], key)
            else:
                assert rb[key] == pytest.approx(ra[key], rel=2e-4), (ra["step"], key)
    ckpt = next((two / "checkpoints").glob("step_*"))
    shards = sorted(p.name for p in ckpt.rglob("*.distcp"))
    assert len(shards) >= 2, sorted(p.name for p in ckpt.rglob("*"))  # every process wrote its own shard
    whole_a = AutoModelForCausalLM.from_pretrained(one / "final").state_dict()
    whole_b = AutoModelForCausalLM.from_pretrained(two / "final").state_dict()
    assert whole_a.keys() == whole_b.keys()
    for k in whole_a:
        torch.testing.assert_close(whole_b[k], whole_a[k], atol=2e-5, rtol=1e-4, msg=k)
    pa, pb = (torch.load(r / "final" / "projectors.pt")["state_dict"] for r in (one, two))
    assert pa.keys() == pb.keys() and len(pa) == 2
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], atol=2e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fsdp2_mixed_precision_skips_a_nonfinite_window_and_trains_on(tiny_cache, tmp_path, precision):
    """bf16 (FSDP2's mixed-precision policy) and fp16 (its gradient scaler, updated on the skipped window as its
    own skipped step would, else the next step fails): the poisoned window skipped, every other step finite."""
    import math

    from kd.train import epoch_order

    cache = poisoned_cache(tiny_cache, tmp_path / "cache", [int(epoch_order(64, 0, 0, 0, 1, 16)[20])])
    run = {"train.max_steps": 4, "train.gradient_accumulation_steps": 4, "train.mixed_precision": precision}
    result = run_fsdp(cache, tmp_path / "o", 29545 + (precision == "fp16"), **run)
    assert result.returncode == 0, result.stderr[-4000:]
    steps = [r for r in read_metrics(tmp_path / "o" / "r") if "loss" in r]
    assert [r["skipped"] for r in steps] == [False, True, False, False]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for i, r in enumerate(steps) if i != 1)


def test_fsdp2_resume_from_a_sharded_checkpoint_equals_the_uninterrupted_run(tiny_cache, tmp_path):
    """Killed after step 6 (its step-4 checkpoint sharded over both processes), resumed on 2 processes: every
    logged value and the final weights equal the run that was never stopped."""
    from safetensors.torch import load_file

    run = {"train.max_steps": 8, "train.checkpoint_every": 4, "train.eval_every": 4}
    full = run_fsdp(tiny_cache, tmp_path / "a", 29533, **run)
    assert full.returncode == 0, full.stderr[-4000:]
    killed = run_fsdp(tiny_cache, tmp_path / "b", 29535, env_extra={"KD_TEST_STOP_AFTER": "6"}, **run)
    assert killed.returncode != 0 and not (tmp_path / "b" / "r" / "final").exists()
    assert max(r["step"] for r in read_metrics(tmp_path / "b" / "r")) == 6
    resumed = run_fsdp(tiny_cache, tmp_path / "b", 29537, **run, **{"train.resume": True})
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_metrics(tmp_path / "a" / "r", tmp_path / "b" / "r")
    wa, wb = (load_file(tmp_path / x / "r" / "final" / "model.safetensors") for x in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fsdp2_chat_generations_gather_the_sharded_root(chat_caches, tmp_path):
    """Chat generations call the student LM directly, past the sharded model's forward: every process generates in
    step with the root group (embeddings, head) gathered for it, and the replies equal one process's."""
    from kd.train.generations import read_generations

    gen = {"train.eval_generations": 2, "train.generation_tokens": 6}
    cache = chat_caches["first_fit"]
    result = run_fsdp(cache, tmp_path / "two", 29539, chat=True, **gen)
    assert result.returncode == 0, result.stderr[-4000:]
    one = train_chat(cache, tmp_path / "one", **gen, **{"train.gradient_accumulation_steps": 4})
    a, b = read_generations(one), read_generations(tmp_path / "two" / "r")
    assert [(r["step"], r["index"]) for r in a] == [(s, i) for s in (0, 2, 4) for i in (0, 1)]
    assert [(r["step"], r["index"], r["student"]) for r in b] == [(r["step"], r["index"], r["student"]) for r in a]


def test_a_call_past_the_sharded_forward_sees_whole_weights_inside_whole_root():
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29543"]
    result = subprocess.run(
        [*cmd, str(ROOT / "tests" / "fsdp_worker.py"), "--whole-root", str(FSDP2_YAML)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("whole_root ok") == 2


def _plugin(**kw):
    base = {"fsdp_version": 2, "cpu_ram_efficient_loading": False, "activation_checkpointing": False}
    return SimpleNamespace(**{**base, **kw})


def _tc(**kw):
    return SimpleNamespace(**{"ema_decay": None, "extra_eval_files": [], **kw})


@pytest.mark.parametrize(
    "plugin,tc,match",
    [
        (None, _tc(), "holds no FSDP plugin"),
        (_plugin(fsdp_version=1), _tc(), "FSDP2 only"),
        (_plugin(cpu_ram_efficient_loading=True), _tc(), "fsdp_cpu_ram_efficient_loading: true"),
        (_plugin(activation_checkpointing=True), _tc(), "student.gradient_checkpointing=true"),
        (_plugin(), _tc(ema_decay=0.999), "train.ema_decay"),
        (_plugin(), _tc(extra_eval_files=["x.txt"]), "train.extra_eval_files"),
    ],
)
def test_what_fsdp_cannot_do_is_refused(plugin, tc, match):
    with pytest.raises(KDError, match=match):
        check_fsdp(plugin, tc)


def test_the_shipped_fsdp2_config_passes(tiny_cache):
    check_fsdp(_plugin(), _tc())


def test_fsdp1_is_refused_on_every_process_before_anything_is_written(tiny_cache, tmp_path):
    fsdp1 = tmp_path / "fsdp1.yaml"
    fsdp1.write_text(FSDP2_YAML.read_text().replace("fsdp_version: 2", "fsdp_version: 1"))
    result = run_fsdp(tiny_cache, tmp_path / "out", 29541, yaml=fsdp1)
    assert result.returncode != 0
    assert result.stderr.count("error: the launch config selects FSDP version 1") == 2, result.stderr[-3000:]
    assert not (tmp_path / "out").exists()
