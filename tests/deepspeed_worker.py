"""Run under torchrun by tests/test_deepspeed.py: kd's window step (kd.train.optimizer_step with the
DeepSpeedBackend) on a real DeepSpeed ZeRO engine, on CPU with gloo. Writes, per ZeRO stage, the whole weights after
each window, whether each step was applied, and the weights of a run resumed from a DeepSpeed checkpoint.

    python -m torch.distributed.run --nproc_per_node 2 tests/deepspeed_worker.py CACHE OUT STAGE [STAGE ...]
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import importlib  # noqa: E402

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed_reference import GA, LRS, MB, build, nan_window, rank_window  # noqa: E402

from kd.cache import TeacherCache  # noqa: E402
from kd.models import load_tokenizer  # noqa: E402
from kd.train import LossPlan, TrainState, optimizer_step  # noqa: E402
from kd.train.backend import DeepSpeedBackend  # noqa: E402
from kd.train.checkpoint import save_final  # noqa: E402

# DeepSpeed's CPU-only shared-memory all-reduce is JIT-compiled on first use (~50 s): unused here, as in
# tests/launch_worker.py (the module from sys.modules: deepspeed.comm.torch as an attribute is the torch library)
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def whole_weights(engine) -> dict[str, torch.Tensor]:
    if engine.zero_optimization_stage() == 3:  # gathered from the partitions, as the final save does (on rank 0)
        state = engine._zero3_consolidated_16bit_state_dict()  # a collective: every rank calls it
        return {k: v.detach().clone() for k, v in (state or {}).items()}
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def optimizer_moments(engine) -> list[torch.Tensor]:
    return [t.detach().clone() for s in engine.optimizer.optimizer.state.values() for t in s.values() if t.ndim]


def make_engine(cache: Path, stage: int):
    cfg, model, optimizer, split = build(cache)
    ds_config = {
        "train_micro_batch_size_per_gpu": MB,
        "gradient_accumulation_steps": GA,
        "train_batch_size": MB * GA * dist.get_world_size(),
        "gradient_clipping": cfg.train.max_grad_norm,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    plan = LossPlan.build(cfg.loss)

    def reduce_sum(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    backend = DeepSpeedBackend(None, engine, reduce_sum=reduce_sum, num_processes=dist.get_world_size())
    return cfg, engine, engine.optimizer, split, plan, backend


def step(engine, optimizer, split, plan, backend, cfg, state, w: int, window=None):
    window = window if window is not None else rank_window(split, w, dist.get_rank(), dist.get_world_size())
    result = optimizer_step(engine, optimizer, window, plan, backend, LRS[w], cfg.train.max_grad_norm)
    state.step += 1  # as the recipe's loop advances it
    state.skipped_steps += int(not result.applied)
    return result.grad_norm, result.nonfinite


def main() -> None:
    cache, out, stages = Path(sys.argv[1]), Path(sys.argv[2]), [int(s) for s in sys.argv[3:]]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    for stage in stages:
        cfg, engine, optimizer, split, plan, backend = make_engine(cache, stage)
        state, record = TrainState(), {"weights": [], "grad_norm": []}
        for w in range(3):
            if w == 2:
                ckpt = out / f"ckpt_{stage}"
                engine.save_checkpoint(str(ckpt), tag="w2")  # a collective: every rank writes its partition
                before_moments = optimizer_moments(engine)
            grad_norm, nonfinite = step(engine, optimizer, split, plan, backend, cfg, state, w)
            record["weights"].append(whole_weights(engine))
            record["grad_norm"].append(grad_norm)
        # a window with a NaN teacher log-prob on rank 0 only: skipped on every rank, nothing moves
        moments = optimizer_moments(engine)
        window = nan_window(split, rank, dist.get_world_size())
        grad_norm, nonfinite = step(engine, optimizer, split, plan, backend, cfg, state, 3, window)
        record["skip"] = {
            "nonfinite": nonfinite,
            "skipped_steps": state.skipped_steps,
            "weights": whole_weights(engine),
            "moments_unchanged": all(torch.equal(a, b) for a, b in zip(moments, optimizer_moments(engine))),
        }
        # resume: a fresh engine loads the checkpoint taken before window 2 and runs window 2 again
        cfg, engine2, optimizer2, split, plan, backend2 = make_engine(cache, stage)
        engine2.load_checkpoint(str(ckpt), tag="w2")
        record["resumed_moments_equal"] = all(
            torch.equal(a, b) for a, b in zip(before_moments, optimizer_moments(engine2))
        )
        step(engine2, optimizer2, split, plan, backend2, cfg, TrainState(), 2)
        record["resumed"] = whole_weights(engine2)
        # the final save_pretrained folder through kd's own save_final, with what Accelerate's get_state_dict does
        # under DeepSpeed (ZeRO-3: the weights gathered from the partitions, on rank 0)
        shim = SimpleNamespace(
            unwrap_model=lambda m: m.module,
            get_state_dict=whole_weights,
            is_main_process=rank == 0,
            wait_for_everyone=dist.barrier,
        )
        tokenizer = load_tokenizer(TeacherCache(cache).manifest["teacher"]["name_or_path"])
        save_final(shim, engine, tokenizer, out / f"final_{stage}", {"stage": stage})
        if rank == 0:
            torch.save(record, out / f"stage{stage}.pt")
        dist.barrier()


if __name__ == "__main__":
    main()
