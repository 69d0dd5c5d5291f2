"""What a run keeps besides the model: EMA weights, the metrics log, peak memory."""

from __future__ import annotations

import contextlib
import json
import math
import resource
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from kd.errors import KDError
from kd.io import append_line

RUN_FORMAT_VERSION = 1


@dataclass
class TrainState:
    """Where a run is: what a checkpoint's trainer_state.json holds besides the Accelerate state."""

    step: int = 0  # optimizer steps done (skipped ones included)
    tokens_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    best_eval: float = math.inf  # best eval/ce so far
    evals_without_improvement: int = 0
    stopped: str = ""  # why training ended (max_steps, early_stopping), once it has: the state saved to finish from

    def to_dict(self) -> dict:
        return {**asdict(self), "format_version": RUN_FORMAT_VERSION}

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        # `stopped` came later than the other fields: a checkpoint without it is one of a run still training
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d or f.name != "stopped"})

    def record_eval(self, ce: float) -> int:
        """Count an eval for early stopping; returns evals in a row without a new best."""
        if ce < self.best_eval:
            self.best_eval, self.evals_without_improvement = ce, 0
        else:
            self.evals_without_improvement += 1
        return self.evals_without_improvement


class EMA:
    """Exponential moving average of the trained parameters, kept in fp32."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Temporarily put the EMA weights into `model` (for eval and saving)."""
        backup = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.shadow}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self.shadow:
                    p.copy_(self.shadow[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in backup:
                        p.copy_(backup[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = {n: t.clone() for n, t in state["shadow"].items()}


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated when on CUDA, else the process's peak resident set size (resident_mb)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resident_mb(peak=True)


def resident_mb(peak: bool) -> float:
    """This process's resident memory, now or at its peak. On Linux from /proc/self/status (VmRSS, VmHWM): the
    rusage maximum survives exec, so a process started by a large one (a notebook, a test runner) would report its
    parent's size as its own peak."""
    try:
        key = "VmHWM:" if peak else "VmRSS:"
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLog:
    """`metrics.jsonl`: one JSON object per optimizer step or eval, flushed as written (main process only)."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None = None):
        self.path, self.enabled = path, enabled
        self.tracker = None  # an Accelerator with trackers (train.log_with): gets every record's numbers too
        if enabled and keep_until_step is not None and path.exists():
            # a resumed run drops what the interrupted run logged after its checkpoint
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= keep_until_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        append_line(self.path, json.dumps(clean))
        if self.tracker is not None:
            numbers = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            numbers.pop("step", None)
            self.tracker.log(numbers, step=record["step"])


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (kd writes whole lines only: a bad one means a damaged copy)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise KDError(
                f"{path}, line {number}, is not a JSON record: the file is damaged (a truncated copy?)"
            ) from None
    return records
