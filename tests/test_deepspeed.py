"""DeepSpeed ZeRO through kd's window step (kd/train/backend.py): the accumulation contract against a fake engine
that records its calls, then real ZeRO-2 and ZeRO-3 engines on CPU (2 processes, gloo) against the plain
one-process step; and the combinations kd refuses, with their messages."""

from __future__ import annotations

import copy
import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, torchrun
from deepspeed_reference import GA, LRS, full_window, nan_window, rank_window
from deepspeed_reference import build as build_reference

from kd.errors import KDError
from kd.train import LossPlan, optimizer_step
from kd.train.backend import AccelerateBackend, DeepSpeedBackend


class FakeEngine:
    """DeepSpeed's engine surface kd uses, recording every call; `step` applies the optimizer unless the gradients
    are non-finite (DeepSpeed's overflow path), or always with applies_nonfinite (an engine that would not skip)."""

    def __init__(self, model, optimizer, applies_nonfinite=False):
        self.module, self.optimizer, self.applies_nonfinite = model, optimizer, applies_nonfinite
        self.calls, self.device = [], torch.device("cpu")
        self._applied, self._norm = None, None

    def zero_optimization_stage(self):
        return 2

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def parameters(self):
        return self.module.parameters()

    def set_gradient_accumulation_boundary(self, is_boundary):
        self.calls.append(("boundary", is_boundary))

    def backward(self, loss, scale_wrt_gas=True):
        self.calls.append(("backward", scale_wrt_gas, bool(torch.isfinite(loss))))
        loss.backward()

    def step(self):
        self.calls.append(("step",))
        self._norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0))
        self._applied = math.isfinite(self._norm) or self.applies_nonfinite
        if self._applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def was_step_applied(self):
        return self._applied

    def get_global_grad_norm(self):
        return self._norm


def _window(split, w):  # one process, GA micro-batches
    return rank_window(split, w, 0, 1)


def test_the_window_contract_against_a_fake_engine(tiny_cache):
    from accelerate import Accelerator

    cfg, model, optimizer, split = build_reference(tiny_cache)
    ref_model = copy.deepcopy(model)
    ref_opt = type(optimizer)(ref_model.parameters(), lr=LRS[0])
    optimizer = type(optimizer)(model.parameters(), lr=LRS[0])  # the same single group on both sides
    plan = LossPlan.build(cfg.loss)
    engine = FakeEngine(model, optimizer)
    windows_of_other_rank = {"nan": False}

    def reduce_sum(t):  # one process; on demand a second "process" whose window sums are NaN
        if windows_of_other_rank["nan"] and t.dtype == torch.float64 and t.numel() == len(plan.terms) + 1:
            t = t.clone()
            t[1] = float("nan")
        return t

    ds = DeepSpeedBackend(None, engine, reduce_sum=reduce_sum, num_processes=1)
    plain = AccelerateBackend(Accelerator())
    for w in range(2):
        window = _window(split, w)
        norm_ds = optimizer_step(engine, optimizer, window, plan, ds, LRS[w], 1.0).grad_norm
        norm_plain = optimizer_step(ref_model, ref_opt, window, plan, plain, LRS[w], 1.0).grad_norm
        assert norm_ds == pytest.approx(norm_plain, rel=1e-6)
    # the boundary on the last micro-batch only, no division by the engine's accumulation steps, ONE step
    window_calls = [("boundary", False), ("backward", False, True)] * (GA - 1) + [
        ("boundary", True),
        ("backward", False, True),
        ("step",),
    ]
    assert engine.calls == window_calls * 2
    for (n, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)

    # the other process's window is NaN: this process's last backward is poisoned, the engine discards the window
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine.calls.clear()
    windows_of_other_rank["nan"] = True
    step = optimizer_step(engine, optimizer, _window(split, 2), plan, ds, LRS[2], 1.0)
    assert engine.calls[-2:] == [("backward", False, False), ("step",)]
    assert all(c[2] for c in engine.calls if c[0] == "backward" and c is not engine.calls[-2])
    assert "kd" in step.nonfinite and not step.applied
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    # an engine that applies such a window is refused, not trusted
    bad = DeepSpeedBackend(None, FakeEngine(model, optimizer, applies_nonfinite=True), reduce_sum, 1)
    with pytest.raises(KDError, match="applied an optimizer step whose loss was non-finite"):
        optimizer_step(bad.engine, optimizer, _window(split, 2), plan, bad, LRS[2], 1.0)


# slow (~50 s): train_student.py end to end under ZeRO-2 and ZeRO-3 (tests/test_sharded_training.py) checks the same
# in the default suite through Accelerate; this one adds bit-level checks of the weights after every window and of
# the Adam moments across a skipped window, on engines kd drives without Accelerate
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_real_zero2_and_zero3_engines_match_the_plain_step(tiny_cache, tmp_path):
    """2 processes x GA 2 on DeepSpeed ZeRO-2 and ZeRO-3 (CPU, gloo) against one plain process x GA 4 on the same
    sequences: equal weights and gradient norms after every window; a window NaN on one rank skipped on both
    (weights and Adam moments untouched); a DeepSpeed checkpoint resumed equal to uninterrupted; the final
    save_pretrained folder loading in transformers."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    worker = ROOT / "tests" / "deepspeed_worker.py"
    result = torchrun(worker, tiny_cache, tmp_path, 2, 3, env_extra={"DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-4000:]

    cfg, model, optimizer, split = build_reference(tiny_cache)
    plan, plain = LossPlan.build(cfg.loss), AccelerateBackend(Accelerator())
    ref_weights, ref_norms = [], []
    for w in range(3):
        norm = optimizer_step(model, optimizer, full_window(split, w, 2), plan, plain, LRS[w], 1.0).grad_norm
        ref_weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        ref_norms.append(norm)
    assert nan_window(split, 0, 2)  # the worker's skipped window exists

    for stage in (2, 3):
        rec = torch.load(tmp_path / f"stage{stage}.pt")
        for w in range(3):
            assert rec["weights"][w].keys() == ref_weights[w].keys()
            for k, v in ref_weights[w].items():
                torch.testing.assert_close(rec["weights"][w][k], v, atol=2e-6, rtol=1e-4, msg=f"ZeRO-{stage} {w} {k}")
            assert rec["grad_norm"][w] == pytest.approx(ref_norms[w], rel=1e-4), (stage, w)
        skip = rec["skip"]
        assert "kd" in skip["nonfinite"] and skip["skipped_steps"] == 1, skip["nonfinite"]
        assert skip["moments_unchanged"], stage
        for k, v in rec["weights"][2].items():
            assert torch.equal(skip["weights"][k], v), (stage, k)
        # the saved student (kd's save_final) loads in transformers with the weights of the last applied window
        lm = AutoModelForCausalLM.from_pretrained(tmp_path / f"final_{stage}")
        for k, v in lm.state_dict().items():
            torch.testing.assert_close(v, rec["weights"][2]["lm." + k], atol=0, rtol=0, msg=f"ZeRO-{stage} saved {k}")
        assert rec["resumed_moments_equal"], stage
        for k, v in rec["weights"][2].items():
            torch.testing.assert_close(rec["resumed"][k], v, atol=0, rtol=0, msg=f"ZeRO-{stage} resumed {k}")


# ---- what kd refuses under DeepSpeed, and what it fills in ----


def _tc(**extra):
    base = dict(
        micro_batch_size=2, gradient_accumulation_steps=16, max_grad_norm=1.0, ema_decay=None, extra_eval_files=[]
    )
    return SimpleNamespace(**{**base, **extra})


def _fake_accelerator(kind: str, ds_config: dict | None = None, world: int = 2):
    plugin = SimpleNamespace(deepspeed_config=ds_config or {})
    return SimpleNamespace(
        distributed_type=SimpleNamespace(name=kind),
        state=SimpleNamespace(deepspeed_plugin=plugin),
        num_processes=world,
        gradient_accumulation_steps=1,
    )


@pytest.mark.parametrize(
    "ds_config, tc, message",
    [
        ({"zero_optimization": {"stage": 0}}, _tc(), "ZeRO stage 0"),
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, _tc(), "sets `optimizer`"),
        ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, _tc(), "sets `scheduler`"),
        ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, _tc(), "compute_grad_norm: false"),
        ({"zero_optimization": {"stage": 2}, "bf16": {"check_grad_overflow": False}}, _tc(), "check_grad_overflow"),
        ({"zero_optimization": {"stage": 3}}, _tc(ema_decay=0.999), "train.ema_decay"),
        ({"zero_optimization": {"stage": 3}}, _tc(extra_eval_files=["x.txt"]), "train.extra_eval_files"),
    ],
)
def test_deepspeed_combinations_refused(ds_config, tc, message):
    from kd.train.backend import check_training_backend

    with pytest.raises(KDError, match=message):
        check_training_backend(_fake_accelerator("DEEPSPEED", ds_config), tc)


def test_zero3_init_refused():
    from kd.train.backend import check_training_backend

    acc = _fake_accelerator("DEEPSPEED", {"zero_optimization": {"stage": 3}})
    acc.state.deepspeed_plugin.zero3_init_flag = True
    with pytest.raises(KDError, match="zero3_init_flag: false"):
        check_training_backend(acc, _tc())


def test_deepspeed_too_old_refused(monkeypatch):
    import kd.train.backend

    monkeypatch.setattr(kd.train.backend, "_deepspeed_version", lambda: "0.14.4")
    with pytest.raises(KDError, match="older than"):
        kd.train.backend.check_training_backend(
            _fake_accelerator("DEEPSPEED", {"zero_optimization": {"stage": 2}}), _tc()
        )


def test_deepspeed_config_takes_kd_batch_accumulation_and_clipping():
    from kd.train.backend import configure_deepspeed

    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 1,  # Accelerate's default when the launch config names none
        "zero_optimization": {"stage": 3},
    }
    acc, notes = _fake_accelerator("DEEPSPEED", ds, world=4), []
    configure_deepspeed(acc, _tc(max_grad_norm=None), notes.append)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 16
    assert ds["train_batch_size"] == 2 * 16 * 4 and ds["gradient_clipping"] == 0.0
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert acc.gradient_accumulation_steps == 16
    assert notes == [
        "[deepspeed] gradient_accumulation_steps: 1 in the DeepSpeed config -> 16 from train.* (kd owns it)"
    ]


# ---- ZeRO-3 plumbing: every process runs the same forwards ----


def test_lockstep_eval_runs_the_extra_forwards_and_counts_none_of_them(tiny_cache):
    """A process with fewer eval batches than another repeats its last one (each forward gathers partitioned
    weights collectively under ZeRO-3) and its figures stay those of its own share."""
    from accelerate import Accelerator

    from kd.cache import TeacherCache
    from kd.train import evaluate, make_loader

    cfg, model, _, _ = build_reference(tiny_cache)
    split = TeacherCache(tiny_cache).split("eval", ("input_ids", "topk_ids", "topk_logprobs"))
    loader = make_loader(split, range(4), 2, 0, False)  # 2 batches
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    acc = Accelerator()
    plain = evaluate(model, loader, cfg.loss, acc)
    assert len(calls) == 2
    stepped = evaluate(model, loader, cfg.loss, acc, lockstep=5)
    assert len(calls) == 2 + 5 and stepped == plain


def test_generations_are_synced_when_weights_are_partitioned():
    from kd.train.generations import generate_replies

    seen = []

    class LM(torch.nn.Module):
        def generate(self, input_ids, **kwargs):
            seen.append(kwargs["synced_gpus"])
            return torch.cat([input_ids, torch.tensor([[7]])], dim=1)

    tok = SimpleNamespace(eos_token_id=0, decode=lambda ids: " ".join(map(str, ids)))
    prompts = [{"prompt": [3, 4], "reference": [5, 0]}]
    for synced in (False, True):
        (reply,) = generate_replies(LM(), tok, prompts, 4, "cpu", synced=synced)
        assert reply["student"] == "7"
    assert seen == [False, True]
