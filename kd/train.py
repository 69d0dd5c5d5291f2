"""Pieces of the student training loop (the loop itself reads top to bottom in train_student.py).

Normalisation, in ONE place (`accumulate_window`): every loss term is a sum over the positions of the whole
accumulation window on all processes, divided once by the global count of those positions. Accelerate is
created with gradient_accumulation_steps=1, so `accelerator.backward` divides by nothing; DDP averages
gradients over processes, which the factor `num_processes` undoes. Hence GA=4 x micro-batch 2 gives the same
gradient as GA=1 x micro-batch 8, on any number of processes, whatever the sequence lengths.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd.cache import CacheSplit
from kd.losses import chunked_token_losses, cross_kd_per_position, feature_per_position, fused_ce_kd, info_nce_sum
from kd.train_config import LossConfig

COMPONENTS = ("ce", "kd", "feature", "contrastive")
RUN_FORMAT_VERSION = 1


class DistillModel(nn.Module):
    """The student LM plus one linear projector (student hidden -> teacher hidden) per mapped layer pair.

    One module, so one `accelerator.prepare`, one optimizer and one checkpoint hold everything trained, and
    under DDP/FSDP every trained parameter is used inside `forward`.
    """

    def __init__(self, lm: nn.Module, feature_pairs: list[tuple[int, int]], teacher_hidden: int):
        super().__init__()
        self.lm = lm
        self.feature_pairs = [tuple(p) for p in feature_pairs]
        student_hidden = lm.config.hidden_size
        self.projectors = nn.ModuleList(nn.Linear(student_hidden, teacher_hidden, bias=False) for _ in feature_pairs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_features: bool = False):
        """-> (logits [B, T, V], list of projected student states [B, T, H_teacher] per pair, or None)."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=with_features)
        if not with_features:
            return out.logits, None
        projected = [proj(out.hidden_states[s]) for proj, (s, _) in zip(self.projectors, self.feature_pairs)]
        return out.logits, projected


def positions(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(attention_mask [B, T] long, loss_mask [B, T] bool, targets [B, T]) of a cache batch.

    A position t counts for the losses when t+1 is still a valid token of the window: its target is
    input_ids[t+1], and the cached teacher distribution at t is the teacher's prediction of that token.
    """
    ids, lengths = batch["input_ids"], batch["length"]
    t = torch.arange(ids.shape[1], device=ids.device)[None, :]
    attention = (t < lengths[:, None]).long()
    loss_mask = t < (lengths[:, None] - 1)
    targets = torch.roll(ids, shifts=-1, dims=1)
    return attention, loss_mask, targets


def contrastive_positions(loss_mask: torch.Tensor, max_positions: int) -> torch.Tensor:
    """Flat indices of at most `max_positions` valid positions, evenly spread (deterministic)."""
    idx = loss_mask.reshape(-1).nonzero().squeeze(-1)
    if len(idx) > max_positions:
        idx = idx[torch.linspace(0, len(idx) - 1, max_positions, device=idx.device).round().long()]
    return idx


def batch_counts(batch: dict, loss_cfg: LossConfig) -> torch.Tensor:
    """Positions each component sums over in this micro-batch: [tokens, contrastive positions, KD positions],
    float64. KD positions are the tokens, except across tokenizers: the aligned tokens only."""
    _, loss_mask, _ = positions(batch)
    n_tok = loss_mask.sum()
    n_con = min(int(n_tok), loss_cfg.contrastive_max_positions) if loss_cfg.alpha_contrastive > 0 else 0
    n_kd = (loss_mask & batch["kd_mask"]).sum() if "kd_mask" in batch else n_tok
    return torch.tensor([float(n_tok), float(n_con), float(n_kd)], dtype=torch.float64)


def cross_tokenizer_sums(logits: torch.Tensor, batch: dict, loss_mask: torch.Tensor, targets: torch.Tensor,
                         loss_cfg: LossConfig) -> dict[str, torch.Tensor]:
    """CE over every student token; KD and top-1 agreement over aligned tokens only (kd_mask), in position chunks
    (the KD needs the student's full softmax per position). Both CE and KD carry gradients."""
    B, T, V = logits.shape
    flat, k = logits.reshape(B * T, V), batch["topk_ids"].shape[-1]
    mask = loss_mask.reshape(-1)
    kd_mask = mask & batch["kd_mask"].reshape(-1)
    t_ids, t_lp = batch["topk_ids"].reshape(B * T, k), batch["topk_logprobs"].reshape(B * T, k)
    ce = torch.nn.functional.cross_entropy(flat.float(), targets.reshape(-1), reduction="none")
    idx = kd_mask.nonzero().squeeze(-1)
    kd = torch.zeros((), device=logits.device)
    agree = torch.zeros((), device=logits.device)
    for c in range(0, len(idx), loss_cfg.position_chunk):
        sel = idx[c:c + loss_cfg.position_chunk]
        kd = kd + cross_kd_per_position(flat[sel], t_ids[sel], t_lp[sel], loss_cfg.cross_tokenizer,
                                        loss_cfg.temperature, loss_cfg.uld_weight).sum()
        agree = agree + (flat[sel].detach().argmax(-1) == t_ids[sel, 0]).sum()
    return {"ce": torch.where(mask, ce, torch.zeros_like(ce)).sum(), "kd": kd, "agree": agree.float()}


def kd_targets(batch: dict, loss_cfg: LossConfig, teacher, attention: torch.Tensor):
    """(ids [B, T, k] or None, values [B, T, k or V], tail policy) of the configured KD target (see LossConfig.target).

    sampled: counts / n as log-probabilities, -inf for padding (probability 0, inert in the loss).
    online: ids None and the teacher's full logits, computed here without gradient.
    """
    if loss_cfg.target == "topk":
        return batch["topk_ids"], batch["topk_logprobs"], loss_cfg.tail
    if loss_cfg.target == "sampled":
        counts = batch["sample_counts"].float()
        return batch["sample_ids"], torch.log(counts / counts.sum(-1, keepdim=True)), "renormalize"
    with torch.inference_mode():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=attention).logits
    return None, logits.clone(), loss_cfg.tail  # clone: an inference tensor cannot be saved for backward


def micro_batch_sums(model, batch: dict, loss_cfg: LossConfig, teacher_slots: list[int],
                     teacher=None) -> dict[str, torch.Tensor]:
    """Loss sums of one micro-batch, fp32 scalars.

    "ce_kd" = alpha_ce * CE + alpha_kd * KD (carries the gradient; fused, see kd.losses.fused_ce_kd); "ce", "kd"
    and "agree" (top-1 agreement) are the same sums without gradient, for logging; "feature" and "contrastive"
    (with gradient) when their alphas are on. teacher_slots[j]: where layer pair j's teacher layer sits in the
    batch's hidden_states [B, L, T, H]. teacher: the online teacher, for loss.target == "online".
    """
    attention, loss_mask, targets = positions(batch)
    with_features = loss_cfg.alpha_feature > 0 or loss_cfg.alpha_contrastive > 0
    logits, projected = model(batch["input_ids"], attention, with_features)
    B, T, V = logits.shape
    if loss_cfg.cross_tokenizer is not None:
        sums = cross_tokenizer_sums(logits, batch, loss_mask, targets, loss_cfg)
    else:
        t_ids, t_values, tail = kd_targets(batch, loss_cfg, teacher, attention)
        ce_kd, (ce, kd, agree) = fused_ce_kd(
            logits.reshape(B * T, V), targets.reshape(-1), None if t_ids is None else t_ids.reshape(B * T, -1),
            t_values.reshape(B * T, -1), loss_mask.reshape(-1), loss_cfg.alpha_ce, loss_cfg.alpha_kd,
            loss_cfg.temperature, tail, loss_cfg.position_chunk)
        sums = {"ce_kd": ce_kd, "ce": ce, "kd": kd, "agree": agree}
    if with_features:
        # across tokenizers, teacher states exist only at aligned positions
        flat_mask = (loss_mask & batch["kd_mask"] if "kd_mask" in batch else loss_mask).reshape(-1)
        con_idx = contrastive_positions(loss_mask, loss_cfg.contrastive_max_positions)
        feature = torch.zeros((), device=logits.device)
        contrastive = torch.zeros((), device=logits.device)
        for proj, slot in zip(projected, teacher_slots):
            student_h = proj.reshape(B * T, -1)
            teacher_h = batch["hidden_states"][:, slot].reshape(B * T, -1)
            if loss_cfg.alpha_feature > 0:
                per_pos = feature_per_position(student_h, teacher_h, loss_cfg.feature_kind)
                feature = feature + torch.where(flat_mask, per_pos, torch.zeros_like(per_pos)).sum()
            if loss_cfg.alpha_contrastive > 0:
                contrastive = contrastive + info_nce_sum(student_h[con_idx], teacher_h[con_idx],
                                                         loss_cfg.contrastive_temperature)
        # mean over the mapped layer pairs, so adding a pair does not change the term's scale
        sums["feature"] = feature / len(teacher_slots)
        sums["contrastive"] = contrastive / len(teacher_slots)
    return sums


def active_components(loss_cfg: LossConfig) -> list[str]:
    """Terms that are computed and logged: CE and KD always (KD is an informative monitor even at alpha 0)."""
    return ["ce", "kd"] + [c for c in ("feature", "contrastive") if getattr(loss_cfg, f"alpha_{c}") > 0]


@dataclass
class WindowResult:
    raw: dict[str, float]               # component -> global token mean over the window
    nonfinite: list[str]                # components that were NaN/inf on any process
    tokens: int                         # loss positions in the window, all processes
    agree: float = field(default=0.0)   # top-1 agreement with the teacher over the window


def accumulate_window(model, batches: list[dict], loss_cfg: LossConfig, accelerator,
                      teacher_slots: list[int], teacher=None) -> WindowResult:
    """Forward + backward over the micro-batches of one optimizer step; gradients end up in `.grad`."""
    comps = active_components(loss_cfg)
    counts = accelerator.reduce(sum(batch_counts(b, loss_cfg) for b in batches).to(accelerator.device), "sum")
    n_tok, n_con, n_kd = float(counts[0]), float(counts[1]), float(counts[2])
    # KD (and feature, whose teacher states sit at the same positions) average over the KD positions: all tokens,
    # or across tokenizers the aligned ones.
    denom = {"ce": n_tok, "kd": n_kd, "feature": n_kd, "contrastive": max(n_con, 1.0)}
    # THE normalisation (see module docstring): sum / global count, times num_processes to undo DDP's mean.
    scale = {c: accelerator.num_processes / max(denom[c], 1.0) for c in comps}
    if loss_cfg.cross_tokenizer is None:
        # CE and KD share the token count, so their alpha-weighted sum (fused, one gradient buffer) takes one scale.
        weighted_terms = [("ce_kd", 1.0, scale["ce"])]
    else:
        weighted_terms = [("ce", loss_cfg.alpha_ce, scale["ce"]), ("kd", loss_cfg.alpha_kd, scale["kd"])]
    weighted_terms += [(c, getattr(loss_cfg, f"alpha_{c}"), scale[c]) for c in comps if c in ("feature", "contrastive")]
    local = torch.zeros(len(comps) + 1, dtype=torch.float64, device=accelerator.device)
    for i, batch in enumerate(batches):
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        # gradients are all-reduced once per window, on its last micro-batch
        sync = contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model)
        with sync:
            sums = micro_batch_sums(model, batch, loss_cfg, teacher_slots, teacher)
            loss = sum(alpha * sc * sums[name] for name, alpha, sc in weighted_terms)
            # Always backward, even when non-finite: skipping it on one process would deadlock DDP's all-reduce.
            # A non-finite window is detected below and its step skipped on every process.
            accelerator.backward(loss)
        local += torch.stack([sums[c].detach().double() for c in comps] + [sums["agree"].double()])
    total = accelerator.reduce(local, "sum")
    raw = {c: float(total[j]) / denom[c] for j, c in enumerate(comps)}
    return WindowResult(raw=raw, nonfinite=[c for c in comps if not math.isfinite(raw[c])], tokens=int(n_tok),
                        agree=float(total[-1]) / max(n_kd, 1.0))


@torch.no_grad()
def evaluate(model, loader, loss_cfg: LossConfig, accelerator) -> dict[str, float]:
    """Held-out metrics of the model as it is now, in eval mode. eval/ppl = exp(eval/ce), uncapped."""
    was_training = model.training
    model.eval()
    total = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        attention, loss_mask, targets = positions(batch)
        logits, _ = model(batch["input_ids"], attention, False)
        B, T, V = logits.shape
        k = batch["topk_ids"].shape[-1]
        if loss_cfg.cross_tokenizer is None:
            ce, kd, agree = chunked_token_losses(
                logits.reshape(B * T, V), targets.reshape(-1), batch["topk_ids"].reshape(B * T, k),
                batch["topk_logprobs"].reshape(B * T, k), loss_mask.reshape(-1), loss_cfg.temperature, loss_cfg.tail,
                loss_cfg.position_chunk)
        else:
            ce, kd, agree = cross_tokenizer_sums(logits, batch, loss_mask, targets, loss_cfg).values()
        n_kd = (loss_mask & batch["kd_mask"]).sum() if "kd_mask" in batch else loss_mask.sum()
        total += torch.stack([ce.double(), kd.double(), agree.double(), loss_mask.sum().double(), n_kd.double()])
    total = accelerator.reduce(total, "sum")
    model.train(was_training)
    n, n_kd = float(total[3]), max(float(total[4]), 1.0)
    ce = float(total[0]) / n
    return {"eval/ce": ce, "eval/ppl": math.exp(ce), "eval/kd": float(total[1]) / n_kd,
            "eval/top1_agreement": float(total[2]) / n_kd, "eval/tokens": int(n)}


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


def steps_per_epoch(num_sequences: int, world: int, micro_batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one pass over the train split (a remainder smaller than one window is dropped)."""
    return (num_sequences // world) // (micro_batch_size * accumulation)


def epoch_order(num_sequences: int, epoch: int, seed: int, rank: int, world: int, per_step: int,
                shard_starts: np.ndarray | None = None, buffer_shards: int = 0) -> np.ndarray:
    """This process's sequence indices for `epoch`, in order: a seeded order of all sequences dealt round-robin to
    ranks (so ranks never share a sequence), cut to whole optimizer windows. A pure function of (epoch, seed), so a
    resumed run sees the same data.

    exact (`shard_starts` None): a uniform permutation; every read may hit another shard.
    shard-aware (`shard_starts` = first sequence of each shard, `buffer_shards` = B >= 1): the shards in a seeded
    order, then the sequences of each run of B consecutive shards of that order permuted together (as
    mosaicml/streaming's shuffle blocks). Each process reads from B shards at a time, mostly sequentially within a
    file; two sequences of one shard can only be placed within B shards' worth of each other, a bias that vanishes
    as B grows (B = all shards is the exact shuffle)."""
    rng = np.random.default_rng([seed, epoch])
    if shard_starts is None:
        perm = rng.permutation(num_sequences)
    else:
        bounds = np.append(np.asarray(shard_starts, dtype=np.int64), num_sequences)
        shard_order = rng.permutation(len(bounds) - 1)
        B = max(1, buffer_shards)
        perm = np.concatenate([rng.permutation(np.concatenate([np.arange(bounds[j], bounds[j + 1])
                                                                for j in shard_order[g:g + B]]))
                               for g in range(0, len(shard_order), B)])
    mine = perm[rank::world][: num_sequences // world]
    return mine[: (len(mine) // per_step) * per_step]


def make_loader(split: CacheSplit, indices, batch_size: int, num_workers: int, pin_memory: bool):
    return torch.utils.data.DataLoader(torch.utils.data.Subset(split, list(map(int, indices))), batch_size=batch_size,
                                       shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                                       persistent_workers=False)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated when on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLog:
    """`metrics.jsonl`: one JSON object per optimizer step or eval, flushed as written (main process only)."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None = None):
        self.path, self.enabled = path, enabled
        if enabled and keep_until_step is not None and path.exists():
            # a resumed run drops what the interrupted run logged after its checkpoint
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= keep_until_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln]
