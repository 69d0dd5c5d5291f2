"""The run directory: refusing to overwrite, resumable checkpoints (newest only), the final save_pretrained folder."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from kd.config import diff_keys, resolved_paths
from kd.errors import KDError
from kd.io import DirLock, staged_dir, write_bytes_durable, write_json_atomic
from kd.train.state import TrainState
from kd.train_config import PATH_KEYS, RESUME_FREE_KEYS, TrainConfig

EXTENDABLE_KEYS = ("train.max_steps", "train.epochs")


def claim_run_name(run_dir: Path) -> DirLock:
    """The lock that makes this process the run directory's one writer: `.<name>.lock` beside it (not inside, so
    that a run refused before it writes anything leaves no directory to block its corrected re-run). The kernel
    drops it when the process ends, however it ends."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return DirLock(run_dir.parent, "training run", name=f".{run_dir.name}.lock").acquire()


@contextlib.contextmanager
def released_on_error(lock: DirLock | None):
    """Release `lock` if the block raises (and re-raise)."""
    try:
        yield
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def prepare_run_dir(run_dir: Path, cfg_dict: dict, resume: bool, cache_id: str | None = None) -> dict | None:
    """Refuse to overwrite a run; on resume, check the config and the cache's identity (its config hash: a cache
    overwritten since the run started is refused, never mixed) and return the latest checkpoint's state."""
    if not resume:
        if run_dir.exists():
            raise KDError(
                f"run directory {run_dir} already exists; pick another train.run_name, or continue it "
                "with train.resume=true"
            )
        return None
    if not (run_dir / "config.json").exists():
        raise KDError(f"train.resume=true but {run_dir} holds no run to resume")
    run_record = json.loads((run_dir / "config.json").read_text())
    saved = run_record["config"]
    started_on = run_record.get("cache", {}).get("config_hash")
    if started_on is not None and cache_id is not None and started_on != cache_id:
        raise KDError(
            f"cannot resume {run_dir}: the cache at {cfg_dict['train']['cache_dir']} changed since this run "
            f"started (cache identity {started_on[:12]}... then, {cache_id[:12]}... now); resume against the "
            "cache it started with, or start a new run"
        )
    # the run's length may grow on resume (kd.train.plan.continued_schedule); everything else must be as it was,
    # paths as the files they name: typed otherwise (relative, through a symlink, from another folder) is the same
    differing = [k for k in diff_keys(saved, cfg_dict, TrainConfig) if k not in RESUME_FREE_KEYS + EXTENDABLE_KEYS]
    then = run_record.get("paths") or resolved_paths(saved, TrainConfig)  # recorded before runs kept paths resolved
    now = resolved_paths(cfg_dict, TrainConfig)
    moved = [k for k in differing if k in PATH_KEYS and then.get(k) != now.get(k)]
    differing = [k for k in differing if k not in PATH_KEYS or k in moved]
    if differing:
        raise KDError(
            f"cannot resume {run_dir}: config differs in {', '.join(differing)}"
            + "".join(f" ({k}: {then.get(k)} then, {now.get(k)} now)" for k in moved)
            + "; an exact continuation needs the same config (start a new run instead)"
        )
    return read_latest(run_dir)


def save_checkpoint(accelerator, run_dir: Path, train_state: TrainState) -> Path:
    """Accelerate state (model, projectors, optimizer, scaler, RNG, EMA) + trainer state; keeps the newest only,
    since each holds the optimizer's two moments (3x the model) and resume needs just the last.

    Written as `step_N.partial` and renamed when whole (kd.io.staged_dir), then `latest.json` moves to it, then the
    previous one is removed: a full disk or a kill at any point leaves the previous checkpoint whole and current."""
    state = train_state.to_dict()
    ckpt_root = run_dir / "checkpoints"
    ckpt = ckpt_root / f"step_{state['step']:08d}"
    previous = read_latest(run_dir)
    with staged_dir(ckpt, accelerator.is_main_process, accelerator.wait_for_everyone) as tmp:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            write_json_atomic(tmp / "trainer_state.json", state)
    if accelerator.is_main_process:
        try:
            write_json_atomic(ckpt_root / "latest.json", dict(state, path=ckpt.name))
        except KDError:
            if not previous or previous["path"] != ckpt.name:
                shutil.rmtree(ckpt, ignore_errors=True)  # latest.json still names the previous one, whole
            raise
        if previous and previous["path"] != ckpt.name:
            shutil.rmtree(ckpt_root / previous["path"], ignore_errors=True)
    accelerator.wait_for_everyone()
    return ckpt


def read_latest(run_dir: Path) -> dict | None:
    latest = run_dir / "checkpoints" / "latest.json"
    return json.loads(latest.read_text()) if latest.exists() else None


def save_final(accelerator, model, tokenizer, out: Path, meta: dict, card: Callable[[int], str] | None = None) -> None:
    """save_pretrained folder (+ tokenizer, projectors, kd_meta.json, and the model card `card(parameters)` as
    README.md), written as `<out>.partial` and renamed when whole. The full state dict is gathered through
    Accelerate on every process (a collective under FSDP / DeepSpeed ZeRO-3), then written by the main one."""
    unwrapped = accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model)
    with staged_dir(out, accelerator.is_main_process, accelerator.wait_for_everyone) as tmp:
        if accelerator.is_main_process:
            unwrapped.lm.save_pretrained(
                tmp, state_dict={k[len("lm.") :]: v for k, v in state.items() if k.startswith("lm.")}
            )
            tokenizer.save_pretrained(tmp)
            if len(unwrapped.projectors):
                torch.save(
                    {
                        "feature_pairs": unwrapped.feature_pairs,
                        "state_dict": {
                            k[len("projectors.") :]: v for k, v in state.items() if k.startswith("projectors.")
                        },
                    },
                    tmp / "projectors.pt",
                )
            write_json_atomic(tmp / "kd_meta.json", meta)
            if card is not None:  # parameters counted on the gathered weights (a shard's own would be a fraction)
                lm = {v.data_ptr(): v.numel() for k, v in state.items() if k.startswith("lm.")}  # tied: counted once
                write_bytes_durable(tmp / "README.md", card(sum(lm.values())).encode())
    accelerator.wait_for_everyone()
