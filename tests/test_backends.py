"""Accelerate back-ends: the trainer refuses the ones whose guarantees it does not keep (XLA, Megatron), before
anything is written; the shipped launch configs are valid Accelerate configs for their back-end. DeepSpeed's own
refusals and its step contract: tests/test_deepspeed.py; FSDP2 and both end to end: tests/test_sharded_training.py."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType
from conftest import ROOT

from kd.errors import KDError
from kd.train.backend import BACKENDS, check_training_backend
from kd.train_config import TrainSection


@pytest.mark.parametrize(
    "kind,match",
    [
        (DistributedType.XLA, "has not been verified on Accelerate's XLA"),
        (DistributedType.MEGATRON_LM, "has not been verified"),
    ],
)
def test_unsupported_backends_are_refused_by_name(kind, match):
    with pytest.raises(KDError, match=match):
        check_training_backend(SimpleNamespace(distributed_type=kind), TrainSection())


def _accelerator(kind: str):
    """A stand-in Accelerator of `kind` whose plugin holds a launch config the back-end accepts."""
    fsdp = SimpleNamespace(fsdp_version=2, cpu_ram_efficient_loading=False, activation_checkpointing=False)
    deepspeed = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 2}}, zero3_init_flag=False)
    return SimpleNamespace(
        distributed_type=SimpleNamespace(name=kind), state=SimpleNamespace(fsdp_plugin=fsdp, deepspeed_plugin=deepspeed)
    )


# every registry entry, with the test that runs it end to end (a new entry fails here until it is listed and tested)
TESTED_BACKENDS = {
    "NO": "every training test",
    "MULTI_CPU": "test_train.py: 2 processes = 1 (DDP over gloo)",
    "MULTI_GPU": "bench/gpu_check.sh (DDP; the same Accelerate calls as MULTI_CPU)",
    "MULTI_XPU": "the DDP calls of MULTI_GPU (not run here)",
    "MULTI_NPU": "the DDP calls of MULTI_GPU (not run here)",
    "MULTI_MLU": "the DDP calls of MULTI_GPU (not run here)",
    "MULTI_MUSA": "the DDP calls of MULTI_GPU (not run here)",
    "MULTI_HPU": "the DDP calls of MULTI_GPU (not run here)",
    "FSDP": "test_sharded_training.py: FSDP2 end to end",
    "DEEPSPEED": "test_sharded_training.py: ZeRO-2/3 end to end; test_deepspeed.py",
}


def test_every_backend_entry_is_listed_with_its_test():
    assert set(BACKENDS) == set(TESTED_BACKENDS)


@pytest.mark.parametrize("kind", sorted(TESTED_BACKENDS))
def test_each_backend_accepts_a_valid_launch(kind):
    check_training_backend(_accelerator(kind), TrainSection())


@pytest.mark.parametrize("name", ["ddp.yaml", "ddp_multinode.yaml"])
def test_shipped_launch_configs_load_in_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(Path(ROOT) / "configs" / "accelerate" / name))
    assert cfg.distributed_type == DistributedType.MULTI_GPU
    assert cfg.num_processes >= 2 and cfg.num_machines >= 1
    assert not cfg.deepspeed_config and not cfg.fsdp_config


@pytest.mark.parametrize("name,stage", [("zero2.yaml", 2), ("zero3.yaml", 3), ("zero3_multinode.yaml", 3)])
def test_shipped_deepspeed_configs_load_in_accelerate(name, stage):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(Path(ROOT) / "configs" / "accelerate" / name))
    assert cfg.distributed_type == DistributedType.DEEPSPEED and cfg.num_processes >= 2
    ds = cfg.deepspeed_config
    assert (
        ds["zero_stage"] == stage and ds["zero3_init_flag"] is False
    )  # kd builds the student whole (kd/train/backend.py)
    # kd owns accumulation and clipping (configure_deepspeed): a launch config naming them would only be overridden
    assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds


def test_the_shipped_fsdp2_config_loads_in_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(Path(ROOT) / "configs" / "accelerate" / "fsdp2.yaml"))
    assert cfg.distributed_type == DistributedType.FSDP and cfg.num_processes >= 2
    fsdp = cfg.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    # what kd refuses (kd/train/backend.py check_fsdp) is off in the shipped config
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is False and fsdp["fsdp_activation_checkpointing"] is False


def test_the_fp16_gradient_scaler_path_of_a_skipped_window():
    """Accelerate runs mixed_precision fp16 on a CPU as fp32 (no autocast, no scaler: accelerator.scaler is None), so
    no CPU run of train_student reaches the gradient scaler. Here a real torch GradScaler stands where Accelerate puts
    its own on a GPU (in the Accelerator before prepare, which hands it to the optimizer wrapper and wraps the forward
    in fp16 autocast): a window with a NaN teacher value is skipped with the scale halved and the weights and the
    optimizer state untouched, and the next windows step (had AccelerateBackend.finish not updated the scaler after
    the skipped window's unscale_, the next unscale_ would raise)."""
    import torch
    from accelerate import Accelerator
    from conftest import TINY
    from transformers import AutoConfig, AutoModelForCausalLM

    from kd.losses.terms import Term
    from kd.signals import TopK
    from kd.train import DistillModel, LossPlan, optimizer_step

    V, K, B, T = 64, 8, 2, 12
    acc = Accelerator(mixed_precision="fp16")
    assert acc.scaler is None and not acc.native_amp  # what Accelerate does on a CPU
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**10), True
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY, vocab_size=V))
    model, opt = acc.prepare(DistillModel(lm, [], 16), torch.optim.AdamW(lm.parameters(), lr=1e-3))
    g = torch.Generator().manual_seed(0)
    windows = []
    for _ in range(4):
        lp, ids = torch.log_softmax(torch.randn(B, T, V, generator=g) * 3, -1).topk(K, dim=-1)
        batch = {"input_ids": torch.randint(0, V, (B, T), generator=g), "length": torch.full((B,), T)}
        windows.append([{**batch, "topk_ids": ids, "topk_logprobs": lp}])
    windows[1][0]["topk_logprobs"][0, 3, 0] = float("nan")
    plan = LossPlan(
        [Term("ce", "ce", 0.5), Term("kd", "forward_kl", 0.5)],
        lambda b, a: TopK(b["topk_ids"].reshape(-1, K), b["topk_logprobs"].reshape(-1, K), "bucket"),
        1.0,
        64,
    )
    applied, scales = [], []
    for i, w in enumerate(windows):
        weights = [p.detach().clone() for p in model.parameters()]
        moments = [s["exp_avg"].clone() for s in opt.optimizer.state.values()]
        scales.append(acc.scaler.get_scale())
        r = optimizer_step(model, opt, w, plan, acc, 1e-3, 1.0)
        applied.append(r.applied)
        if i == 1:
            assert r.nonfinite[0] == "kd"
            assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
            assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, opt.optimizer.state.values()))
        else:
            assert math.isfinite(r.result.raw["kd"]) and math.isfinite(r.grad_norm)
    assert applied == [True, False, True, True]
    assert scales[2] == scales[1] / 2 and scales[3] == scales[2]  # halved by the skipped window only
