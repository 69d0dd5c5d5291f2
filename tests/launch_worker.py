"""train_student.py under Accelerate's FSDP2 or DeepSpeed back-end on CPU processes (gloo), configured from a launch
config as `accelerate launch --config_file configs/accelerate/fsdp2.yaml` (or zero2.yaml, zero3.yaml) configures it
on GPUs.

    python -m torch.distributed.run --nproc_per_node 2 tests/launch_worker.py LAUNCH_YAML [dotted.key=value ...]
    python -m torch.distributed.run --nproc_per_node 2 tests/launch_worker.py --whole-root LAUNCH_YAML

Accelerate starts FSDP and DeepSpeed only on GPUs (on CPUs its state stays MULTI_CPU), while torch's fully_shard and
DeepSpeed's ZeRO engines run on CPUs with gloo. So this worker passes the launch config through Accelerate's own
launcher code (the environment it gives every process), creates the Accelerator on CPU, and switches its state to
the config's back-end with the plugin built from that environment. From there on prepare (fully_shard, or
deepspeed.initialize), no_sync, backward, clipping, save_state / load_state and get_state_dict are Accelerate's
real code for that back-end, driven by the real train_student.main.

KD_TEST_STOP_AFTER=N: every process stops (exit 3) once step N is logged, as a killed job would (the test resumes).
KD_TEST_ZERO_OPTIMIZATION='{...}': merged into the DeepSpeed config's zero_optimization (the tests set ZeRO-3's
persistence threshold to 0, so that even a tiny student's parameters are really partitioned).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def launch_environment(launch_yaml: str) -> tuple[str, dict[str, str]]:
    """The back-end ("FSDP" or "DEEPSPEED") of `launch_yaml`, and the part of the environment `accelerate launch
    --config_file launch_yaml` gives each process that configures it."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", launch_yaml, "train_student.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
        return "DEEPSPEED", {
            k: v for k, v in env.items() if k.startswith(("ACCELERATE_DEEPSPEED", "ACCELERATE_USE_DEEP"))
        }
    if not args.use_fsdp:
        raise SystemExit(f"{launch_yaml}: neither FSDP nor DeepSpeed")
    env = prepare_multi_gpu_env(args)
    env = {k: v for k, v in env.items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}
    # FSDP1's sync_module_states (the launcher's default), which Accelerate's plugin refuses on CPU; FSDP2 never
    # reads it. Without this, an FSDP1 config would fail in Accelerate's constructor before kd could refuse it
    env["FSDP_SYNC_MODULE_STATES"] = "false"
    return "FSDP", env


def backend_on_cpu(launch_yaml: str) -> None:
    """From here on `accelerate.Accelerator()` starts on CPU in the back-end `launch_yaml` configures."""
    kind, env = launch_environment(launch_yaml)
    os.environ.update(env)

    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    class OnCPU(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            state = self.state
            if kind == "FSDP":
                state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* environment, as on GPUs
            else:  # as AcceleratorState does for DeepSpeed on GPUs: the engine's config carries the precision
                plugin = DeepSpeedPlugin()  # reads the ACCELERATE_DEEPSPEED_* environment
                zero = json.loads(os.environ.get("KD_TEST_ZERO_OPTIMIZATION", "{}"))
                plugin.deepspeed_config["zero_optimization"].update(zero)
                plugin.set_mixed_precision(state.mixed_precision)
                plugin.select(_from_accelerator_state=True)
                state.deepspeed_plugins = plugin
                state._mixed_precision = "no"
            state.distributed_type = getattr(DistributedType, kind)
            PartialState._shared_state["distributed_type"] = state.distributed_type

    real = accelerate.Accelerator
    for module in list(sys.modules.values()):  # and every kd module that imported it first (tests/warm.py)
        if module.__name__.split(".")[0] in ("accelerate", "kd") and getattr(module, "Accelerator", None) is real:
            module.Accelerator = OnCPU
    if kind == "DEEPSPEED":
        # DeepSpeed's CPU-only shared-memory all-reduce op is JIT-compiled (~50 s, a C++ compiler) on a fresh
        # machine; without it DeepSpeed reduces through torch.distributed (gloo), as it does wherever the op is
        # unavailable. Nothing of kd depends on it, and it does not exist on GPUs.
        # (the module itself, from sys.modules: the attribute deepspeed.comm.torch is the torch library, which
        # `from .comm import *` binds over the submodule's name, so patching through it patched nothing)
        import importlib

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def whole_root_check(launch_yaml: str) -> None:
    """--whole-root: a call of the inner LM past the sharded model's forward (as chat generations make) sees whole
    weights inside AccelerateBackend.whole_root, and the same greedy tokens as the model before sharding; outside
    it the root group's weights are shards again. Exit 0 when all holds."""
    backend_on_cpu(launch_yaml)
    import accelerate
    import torch
    from conftest import TINY  # this script's folder (tests/) is first on sys.path
    from torch.distributed.tensor import DTensor
    from transformers import AutoConfig, AutoModelForCausalLM

    from kd.train import DistillModel
    from kd.train.backend import backend_for

    acc = accelerate.Accelerator()
    torch.manual_seed(0)
    # the tests' tiny Llama (conftest.TINY), with tied embeddings as SmolLM's: one parameter in the root group
    cfg = AutoConfig.for_model("llama", **TINY, vocab_size=96, tie_word_embeddings=True)
    model = DistillModel(AutoModelForCausalLM.from_config(cfg), [(1, 0)], 48).eval()
    prompt = torch.tensor([[5, 17, 3, 60, 2]])
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, synced_gpus=True)
    want = model.lm.generate(prompt, **{**greedy, "synced_gpus": False})
    model, _ = acc.prepare(model, torch.optim.AdamW(model.parameters()))
    backend = backend_for(acc, model)
    embed = lambda: model.lm.get_input_embeddings().weight  # noqa: E731
    assert backend.sharded and isinstance(embed(), DTensor), type(embed())  # sharded between forwards
    with backend.whole_root(model):
        assert not isinstance(embed(), DTensor) and embed().shape == (96, 32), type(embed())
        got = model.lm.generate(prompt, **greedy)
    assert isinstance(embed(), DTensor)  # freed again
    assert torch.equal(got, want), (got, want)
    print(f"whole_root ok on rank {acc.process_index}", flush=True)
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()  # a clean exit: no gloo thread left running at interpreter shutdown


def main() -> None:
    if sys.argv[1] == "--whole-root":
        return whole_root_check(sys.argv[2])
    launch_yaml, overrides = sys.argv[1], sys.argv[2:]
    backend_on_cpu(launch_yaml)

    from kd import train_student
    from kd.config import parse_cli
    from kd.errors import run_cli
    from kd.train import MetricsLog
    from kd.train_config import TrainConfig

    stop_after = int(os.environ.get("KD_TEST_STOP_AFTER", "0"))
    if stop_after:
        real_write = MetricsLog.write

        def write_then_stop(self, record):
            real_write(self, record)
            if record.get("step") == stop_after and "loss" in record:
                sys.exit(3)

        MetricsLog.write = write_then_stop
    run_cli(
        lambda: train_student.main(
            parse_cli(TrainConfig, overrides, "train_student.py under FSDP2 or DeepSpeed on CPU").cfg
        )
    )


if __name__ == "__main__":
    main()
