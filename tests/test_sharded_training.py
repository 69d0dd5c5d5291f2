"""train_student.py end to end under Accelerate's real FSDP2 and DeepSpeed ZeRO-2/3 code on CPU processes (gloo),
configured from the shipped launch configs (tests/launch_worker.py), against one plain process on the same windows:
losses, gradient norms, evals, a skipped NaN window, the final weights and projectors; sharded checkpoints resumed
equal to the uninterrupted run; chat generations on sharded weights; and every FSDP refusal the README names
(DeepSpeed's, and kd's step on bare ZeRO engines: tests/test_deepspeed.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, torchrun
from test_chat_cache import chat_caches, chat_files, chat_teacher  # noqa: F401 - the chat cache fixtures
from test_chat_cache import train as train_chat
from test_chat_cache import train_overrides as chat_overrides
from test_train import STUDENT, make_cfg, overrides, poisoned_cache

from kd import train_student
from kd.errors import KDError
from kd.train import epoch_order, read_metrics
from kd.train.backend import check_fsdp

LAUNCH = ROOT / "configs" / "accelerate"
FSDP2_YAML = LAUNCH / "fsdp2.yaml"


def launch_on_cpu(yaml: Path, cache: Path, out: Path, env_extra=None, chat=False, zero=None, **extra):
    """train_student.main on 2 CPU processes under the back-end `yaml` configures (tests/launch_worker.py), with
    test_train's run (test_chat_cache's with `chat`) and `extra` overrides; `zero`: DeepSpeed zero_optimization keys."""
    env_extra = dict(env_extra or {})
    if zero is not None:  # merged into the DeepSpeed config's zero_optimization (tests/launch_worker.py)
        env_extra["KD_TEST_ZERO_OPTIMIZATION"] = json.dumps(zero)
    args = (chat_overrides if chat else overrides)(cache, out, **extra)
    return torchrun(ROOT / "tests" / "launch_worker.py", yaml, *args, env_extra=env_extra)


def assert_logged_alike(run_a: Path, run_b: Path, rel: float) -> None:
    """The same steps and evals logged, every compared value equal within `rel`; a skipped window's non-finite
    terms null in both (DeepSpeed's overflow path may report the gradient norm as inf where kd logs null)."""
    a, b = read_metrics(run_a), read_metrics(run_b)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    keys = (
        "lr",
        "loss",
        "ce",
        "kd",
        "feature",
        "grad_norm",
        "tokens_seen",
        "skipped",
        "eval/ce",
        "eval/top1_agreement",
    )
    assert all(any(key in r for r in a) for key in keys)  # every compared key is really there
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in set(keys) & ra.keys():
            if ra[key] is None:
                assert rb[key] is None or (key == "grad_norm" and not math.isfinite(rb[key])), (ra["step"], key)
            else:
                assert rb[key] == pytest.approx(ra[key], rel=rel), (ra["step"], key)


def one_poisoned_sequence(tiny_cache: Path, tmp_path: Path) -> Path:
    """tiny_cache with NaN teacher log-probs for one train sequence: in the window of optimizer step 2 (and 8, the
    second epoch's) for 16 sequences a step, however they are dealt to processes."""
    return poisoned_cache(tiny_cache, tmp_path / "cache", [int(epoch_order(64, 0, 0, 0, 1, 16)[20])])


def per_process_files(ckpt: Path, launch: str) -> dict[str, int]:
    """How many files each process part of a checkpoint holds: FSDP2's DCP shards (model and optimizer folders),
    or ZeRO's partitioned optimizer states."""
    pattern = "*.distcp" if launch == "fsdp2.yaml" else "*zero_pp_rank_*optim_states.pt"
    found: dict[str, int] = {}
    for f in ckpt.rglob(pattern):
        found[f.parent.name] = found.get(f.parent.name, 0) + 1
    return found


# ZeRO-3 keeps parameters of under 1e5 elements whole on every process (all of a tiny student's): the test runs it
# both so (the mixed case of a real student, its norms whole) and with every parameter partitioned (threshold 0)
PARTITION_ALL = {"stage3_param_persistence_threshold": 0}


# ZeRO-3 with every parameter partitioned (and resumed) runs all the code of plain ZeRO-3 and more: that one is slow
@pytest.mark.parametrize(
    "launch,zero,resume",
    [
        ("fsdp2.yaml", None, True),
        ("zero2.yaml", None, False),
        pytest.param("zero3.yaml", None, False, marks=pytest.mark.slow),
        ("zero3.yaml", PARTITION_ALL, True),
    ],
    ids=["fsdp2", "zero2", "zero3", "zero3-partition-all"],
)
def test_two_sharded_processes_match_one_plain_process_and_resume_exactly(tiny_cache, tmp_path, launch, zero, resume):
    """GA 4 on 2 sharded processes vs GA 8 on one plain process: the same windows, so the same LR, losses, gradient
    norms and evals at every step, and the same final weights and projectors. One train sequence has NaN teacher
    log-probs: its window (steps 2 and 8) is skipped on both processes (whichever one read it) as on one, and every
    later step still agrees, so the skip left weights and Adam moments untouched. The checkpoint is really sharded
    (one file per process) and the final folder, gathered whole, loads in transformers. Under FSDP2 and ZeRO-3 the
    same sharded run killed after step 6 and resumed from its step-4 checkpoint logs every value the uninterrupted
    one logs, and ends with the same weights bit for bit (ZeRO-2's resume: the slow bare-engine test of
    tests/test_deepspeed.py; one launch costs ~10 s here)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cache = one_poisoned_sequence(tiny_cache, tmp_path)
    run = {"train.max_steps": 8, "train.eval_every": 4, "train.checkpoint_every": 4}
    result = launch_on_cpu(
        LAUNCH / launch, cache, tmp_path / "two", zero=zero, **run, **{"train.gradient_accumulation_steps": 4}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    two = tmp_path / "two" / "r"
    one = train_student.main(make_cfg(cache, tmp_path / "one", **run, **{"train.gradient_accumulation_steps": 8}))
    skipped = [r["skipped"] for r in read_metrics(one) if "loss" in r]
    assert skipped == [False, True, False, False, False, False, False, True]  # 4 steps an epoch: it comes back
    assert json.loads((two / "config.json").read_text())["num_processes"] == 2
    assert_logged_alike(one, two, rel=2e-4)
    ckpt = next((two / "checkpoints").glob("step_*"))
    parts = per_process_files(ckpt, launch)  # one file per process: FSDP2's model and optimizer, ZeRO's optimizer
    assert set(parts.values()) == {2} and len(parts) == (2 if launch == "fsdp2.yaml" else 1), parts
    whole_a = AutoModelForCausalLM.from_pretrained(one / "final").state_dict()
    whole_b = AutoModelForCausalLM.from_pretrained(two / "final").state_dict()
    assert whole_a.keys() == whole_b.keys()
    for k in whole_a:
        torch.testing.assert_close(whole_b[k], whole_a[k], atol=2e-5, rtol=1e-4, msg=k)
    pa, pb = (torch.load(r / "final" / "projectors.pt")["state_dict"] for r in (one, two))
    assert pa.keys() == pb.keys() and len(pa) == 2
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], atol=2e-5, rtol=1e-4, msg=k)

    if not resume:  # resumed from sharded checkpoints: FSDP2's, and ZeRO-3's with every parameter partitioned
        return
    # killed after step 6, resumed on 2 processes from the sharded step-4 checkpoint
    again = {**run, "train.gradient_accumulation_steps": 4}
    stop = {"KD_TEST_STOP_AFTER": "6"}
    killed = launch_on_cpu(LAUNCH / launch, cache, tmp_path / "b", env_extra=stop, zero=zero, **again)
    assert killed.returncode != 0 and not (tmp_path / "b" / "r" / "final").exists()
    assert max(r["step"] for r in read_metrics(tmp_path / "b" / "r")) == 6
    resumed = launch_on_cpu(LAUNCH / launch, cache, tmp_path / "b", zero=zero, **again, **{"train.resume": True})
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_logged_alike(two, tmp_path / "b" / "r", rel=1e-6)
    wa, wb = (load_file(r / "final" / "model.safetensors") for r in (two, tmp_path / "b" / "r"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("launch,precision", [("fsdp2.yaml", "fp16"), ("zero2.yaml", "bf16")])
def test_mixed_precision_skips_a_nonfinite_window_and_trains_on(tiny_cache, tmp_path, launch, precision):
    """fp16 under FSDP2 (as fp32 on these CPU processes: Accelerate makes no gradient scaler on a CPU; the scaler's
    skipped-window path is tests/test_backends.py's). bf16 under DeepSpeed: its overflow check, on which kd's skip relies there (kd refuses
    bf16.check_grad_overflow: false), discards the window. (DeepSpeed has no fp16 on CPU; FSDP2's bf16 is its
    mixed-precision policy, no scaler.) The poisoned window skipped, every other step finite."""
    cache = one_poisoned_sequence(tiny_cache, tmp_path)
    run = {"train.max_steps": 4, "train.gradient_accumulation_steps": 4, "train.mixed_precision": precision}
    result = launch_on_cpu(LAUNCH / launch, cache, tmp_path / "o", **run)
    assert result.returncode == 0, result.stderr[-4000:]
    steps = [r for r in read_metrics(tmp_path / "o" / "r") if "loss" in r]
    assert [r["skipped"] for r in steps] == [False, True, False, False]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for i, r in enumerate(steps) if i != 1)


@pytest.mark.parametrize("launch", ["fsdp2.yaml", "zero3.yaml"])
def test_chat_generations_on_sharded_weights_equal_one_process(chat_caches, tmp_path, launch):
    """Chat generations call the student LM directly, past the sharded model's forward: every process generates in
    step (FSDP2 with the root group gathered for it, ZeRO-3 gathering in its hooks, synced_gpus on both), and the
    replies equal one process's, as do the training losses of this tied-embedding student."""
    from transformers import AutoConfig

    from kd.train.generations import read_generations

    # a student with tied embeddings (as SmolLM's): one parameter for the embeddings and the head, in the root
    # group under FSDP2, registered with the DistillModel under ZeRO-3
    tied = STUDENT[:-1] + ", tie_word_embeddings: true}"
    gen = {"train.eval_generations": 2, "train.generation_tokens": 6, "student.config": tied}
    cache = chat_caches["first_fit"]
    result = launch_on_cpu(LAUNCH / launch, cache, tmp_path / "two", chat=True, zero=PARTITION_ALL, **gen)
    assert result.returncode == 0, result.stderr[-4000:]
    one = train_chat(cache, tmp_path / "one", **gen, **{"train.gradient_accumulation_steps": 4})
    a, b = read_generations(one), read_generations(tmp_path / "two" / "r")
    assert [(r["step"], r["index"]) for r in a] == [(s, i) for s in (0, 2, 4) for i in (0, 1)]
    assert_logged_alike(one, tmp_path / "two" / "r", rel=2e-4)
    assert AutoConfig.from_pretrained(one / "final").tie_word_embeddings
    assert [(r["step"], r["index"], r["student"]) for r in b] == [(r["step"], r["index"], r["student"]) for r in a]


def test_a_call_past_the_sharded_forward_sees_whole_weights_inside_whole_root():
    result = torchrun(ROOT / "tests" / "launch_worker.py", "--whole-root", FSDP2_YAML)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
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
    result = launch_on_cpu(fsdp1, tiny_cache, tmp_path / "out")
    assert result.returncode != 0
    assert result.stderr.count("error: the launch config selects FSDP version 1") == 2, result.stderr[-3000:]
    assert not (tmp_path / "out").exists()
