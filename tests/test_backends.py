"""Accelerate back-ends: the trainer refuses the ones whose guarantees it does not keep (XLA, Megatron), before
anything is written; the shipped launch configs are valid Accelerate configs for their back-end. DeepSpeed's own
refusals and its step contract: tests/test_deepspeed.py; FSDP2 and both end to end: tests/test_sharded_training.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType
from conftest import ROOT

from kd.dist import check_training_backend
from kd.errors import KDError


@pytest.mark.parametrize(
    "kind,match",
    [
        (DistributedType.XLA, "has not been verified on Accelerate's XLA"),
        (DistributedType.MEGATRON_LM, "has not been verified"),
    ],
)
def test_unsupported_backends_are_refused_by_name(kind, match):
    with pytest.raises(KDError, match=match):
        check_training_backend(SimpleNamespace(distributed_type=kind))


@pytest.mark.parametrize(
    "kind", [DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.DEEPSPEED]
)
def test_ddp_deepspeed_and_one_process_pass(kind):
    check_training_backend(SimpleNamespace(distributed_type=kind))


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
    assert ds["zero_stage"] == stage and ds["zero3_init_flag"] is False  # kd builds the student whole (kd/dist.py)
    # kd owns accumulation and clipping (configure_deepspeed): a launch config naming them would only be overridden
    assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds


def test_the_shipped_fsdp2_config_loads_in_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(Path(ROOT) / "configs" / "accelerate" / "fsdp2.yaml"))
    assert cfg.distributed_type == DistributedType.FSDP and cfg.num_processes >= 2
    fsdp = cfg.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    # what kd refuses (kd/dist.py check_fsdp) is off in the shipped config
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is False and fsdp["fsdp_activation_checkpointing"] is False
