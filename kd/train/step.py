"""One optimizer window: the loss plan chosen at set-up, the micro-batch sums, the single normalisation.

Normalisation, in ONE place (`accumulate_window`): every loss term is a sum over the positions of the whole
accumulation window on all processes, divided once by the global count of those positions. No back-end divides
again (kd/train/backend.py: Accelerate with gradient_accumulation_steps=1, DeepSpeed with scale_wrt_gas=False);
DDP, FSDP and ZeRO average gradients over processes, which the factor `num_processes` undoes. Hence GA=4 x
micro-batch 2 gives the same gradient as GA=1 x micro-batch 8, on any number of processes, whatever the sequence
lengths.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kd.data.pack import segment_positions
from kd.dist import gather_rows
from kd.errors import KDError
from kd.losses.terms import KINDS, Term, logit_term_sums, needs_hidden, needs_teacher_signal
from kd.signals import Signal, batch_signal
from kd.textscore import bits_per_unit
from kd.train.backend import as_backend
from kd.train_config import LossConfig


@dataclass
class LossPlan:
    """What the loss computes, decided once at set-up: the terms, the teacher signal of a batch, and the settings
    they share. `signal(batch, attention)` -> a Signal over the batch's flattened positions."""

    terms: list[Term]
    signal: Callable[[dict, torch.Tensor], Signal]
    temperature: float
    chunk: int
    teacher_slots: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, loss_cfg: LossConfig, teacher_slots: list[int] | None = None, teacher=None) -> LossPlan:
        return cls(
            loss_cfg.trained_terms(),
            batch_signal(loss_cfg.target, loss_cfg.tail, loss_cfg.cross_tokenizer is not None, teacher),
            loss_cfg.temperature,
            loss_cfg.position_chunk,
            list(teacher_slots or []),
        )

    @classmethod
    def for_eval(cls, loss_cfg: LossConfig) -> LossPlan:
        """Held-out metrics: CE and forward KL against the cached top-k (the mapped top-k across tokenizers),
        whatever the training terms, so that runs with different terms stay comparable."""
        return cls(
            [Term("ce", "ce", 1.0), Term("kd", "forward_kl", 1.0)],
            batch_signal("topk", loss_cfg.tail, loss_cfg.cross_tokenizer is not None),
            loss_cfg.temperature,
            loss_cfg.position_chunk,
        )

    @property
    def logit_terms(self) -> list[Term]:
        return [t for t in self.terms if not t.needs_hidden]

    @property
    def hidden_terms(self) -> list[Term]:
        return [t for t in self.terms if t.needs_hidden]

    @property
    def contrastive_term(self) -> Term | None:
        """The term averaged over the contrastive candidates, if any (its max_positions caps them)."""
        return next((t for t in self.terms if t.positions == "contrastive"), None)

    @property
    def needs_hidden(self) -> bool:
        return needs_hidden(self.terms)

    @property
    def needs_signal(self) -> bool:
        """Whether a term reads the teacher's distribution (not so for CE, alone or with hidden-state terms)."""
        return any(needs_teacher_signal(t) for t in self.terms)


def positions(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(attention_mask [B, T] long, loss_mask [B, T] bool, targets [B, T]) of a cache batch.

    A position t counts for the losses when t+1 is still a valid token of the window: its target is
    input_ids[t+1], and the cached teacher distribution at t is the teacher's prediction of that token. In a chat
    cache's batch (`loss_mask` and `segments` per token) t counts only when token t+1 is in the loss mask (the
    assistant's tokens) and in the same conversation as t: a conversation's first token is predicted from nothing of
    its own, and the teacher never saw the previous one. Every sum and count of the losses follows this one mask,
    so the normalisation stays global over the accumulation window. kd.textscore.chat_targets is the same rule in
    numpy (per target token), for the teacher's score and bits per character: change both together.
    """
    ids, lengths = batch["input_ids"], batch["length"]
    t = torch.arange(ids.shape[1], device=ids.device)[None, :]
    attention = (t < lengths[:, None]).long()
    loss_mask = t < (lengths[:, None] - 1)
    if "loss_mask" in batch:
        seg, keep = batch["segments"], batch["loss_mask"].bool()
        nxt = torch.zeros_like(keep)
        nxt[:, :-1] = keep[:, 1:] & (seg[:, 1:] == seg[:, :-1])
        loss_mask = loss_mask & nxt
    targets = torch.roll(ids, shifts=-1, dims=1)
    return attention, loss_mask, targets


def model_inputs(batch: dict, attention: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(attention_mask, position_ids) for the student's forward. Packed conversations (a chat batch's `segments`):
    no mask and position ids that restart per conversation, which transformers turns into block-diagonal causal
    attention (kd.data.pack.segment_positions; the trainer refuses a student that does not honour it). Otherwise
    the padding mask and the model's own positions."""
    if "segments" in batch:
        return None, segment_positions(batch["segments"])
    return attention, None


# The time axis of each [B, ...] batch field that has one: [B, T, ...] unless named here.
_TIME_AXIS = {"hidden_states": 2}


def trim_padding(batch: dict) -> dict:
    """The batch cut to its longest sequence: windows are right-padded to the split's longest (across tokenizers a
    student's windows vary in length, ~16% padding on the demo), and padded positions count for nothing, so they
    are not computed at all. Causal attention means a valid position never sees the padding: the same values."""
    t = int(batch["length"].max())
    if t >= batch["input_ids"].shape[1]:
        return batch
    return {k: v.narrow(_TIME_AXIS.get(k, 1), 0, t) if v.ndim >= 2 else v for k, v in batch.items()}


def contrastive_positions(loss_mask: torch.Tensor, max_positions: int) -> torch.Tensor:
    """Flat indices of at most `max_positions` valid positions, evenly spread (deterministic)."""
    idx = loss_mask.reshape(-1).nonzero().squeeze(-1)
    if len(idx) > max_positions:
        idx = idx[torch.linspace(0, len(idx) - 1, max_positions, device=idx.device).round().long()]
    return idx


def batch_counts(batch: dict, plan: LossPlan) -> torch.Tensor:
    """Positions each kind of term sums over in this micro-batch: [tokens, contrastive positions, KD positions],
    float64. KD positions are the tokens, except across tokenizers: the aligned tokens only."""
    _, loss_mask, _ = positions(batch)
    n_tok = loss_mask.sum()
    con = plan.contrastive_term
    n_con = min(int(n_tok), con.options["max_positions"]) if con is not None and con.weight > 0 else 0
    n_kd = (loss_mask & batch["kd_mask"]).sum() if "kd_mask" in batch else n_tok
    return torch.tensor([float(n_tok), float(n_con), float(n_kd)], dtype=torch.float64)


def micro_batch_sums(
    model, batch: dict, plan: LossPlan, weights: dict[str, float], with_grad: bool = True
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """(sum over terms of weights[name] * the term's sum over this micro-batch's positions, with gradient;
    {term name: its sum without gradient, "agree": top-1 agreement count}).

    The logit-level terms are computed together chunk by chunk (kd.losses.terms.logit_term_sums) inside the model's
    forward, on the logits or, with DistillModel.fused_head, on the final hidden states with the LM head applied
    per chunk (the [B * T, V] logits never exist); feature and
    contrastive terms use the projected student states at plan.teacher_slots (layer pair j's teacher layer sits
    at batch["hidden_states"][:, teacher_slots[j]]).
    """
    attention, loss_mask, targets = positions(batch)
    B, T = batch["input_ids"].shape
    mask = loss_mask.reshape(-1)
    # across tokenizers the teacher (and its hidden states) exists only at aligned positions
    kd_mask = (loss_mask & batch["kd_mask"]).reshape(-1) if "kd_mask" in batch else mask
    lt = plan.logit_terms
    signal = plan.signal(batch, attention) if plan.needs_signal else None  # CE alone: no teacher fields read

    def logit_loss(x):  # flat logits [B * T, V], or the final hidden states and the head (DistillModel.fused_head)
        return logit_term_sums(
            x,
            targets.reshape(-1),
            mask,
            kd_mask,
            signal,
            lt,
            [weights.get(t.name, 0.0) for t in lt],
            plan.temperature,
            plan.chunk,
            with_grad=with_grad,
        )

    mask_in, position_ids = model_inputs(batch, attention)
    (loss, sums), projected = model(
        batch["input_ids"], mask_in, plan.needs_hidden, logit_loss=logit_loss, position_ids=position_ids
    )
    out = {t.name: sums[i] for i, t in enumerate(lt)}
    out["agree"] = sums[-1]
    if plan.needs_hidden:
        contrastive = plan.contrastive_term
        con_idx = contrastive_positions(loss_mask, contrastive.options["max_positions"]) if contrastive else None
        hidden = {t.name: torch.zeros((), device=mask.device) for t in plan.hidden_terms}
        for proj, slot in zip(projected, plan.teacher_slots):
            student_h = proj.reshape(B * T, -1)
            teacher_h = batch["hidden_states"][:, slot].reshape(B * T, -1)
            for term in plan.hidden_terms:
                hidden[term.name] = hidden[term.name] + KINDS[term.kind].hidden_sum(
                    student_h, teacher_h, term, kd_mask, con_idx
                )
        # mean over the mapped layer pairs, so adding a pair does not change the term's scale
        for term in plan.hidden_terms:
            value = hidden[term.name] / len(plan.teacher_slots)
            out[term.name] = value.detach()
            if with_grad:
                loss = loss + weights[term.name] * value
    return loss, out


@dataclass
class WindowResult:
    raw: dict[str, float]  # term name -> global token mean over the window
    nonfinite: list[str]  # terms that were NaN/inf on any process
    tokens: int  # loss positions in the window, all processes
    agree: float = field(default=0.0)  # top-1 agreement with the teacher over the window


def accumulate_window(
    model,
    batches: list[dict],
    loss: LossPlan | LossConfig,
    accelerator,
    teacher_slots: list[int] | None = None,
    teacher=None,
) -> WindowResult:
    """Forward + backward over the micro-batches of one optimizer step; gradients end up where the back-end keeps
    them (`.grad`, or DeepSpeed's partitions). `accelerator` is an Accelerator or a kd.train.backend backend;
    `loss` the run's LossPlan (or a LossConfig, planned here with teacher_slots and teacher).

    The window's sums are reduced over processes after the last micro-batch's forward and before its backward, so
    that the back-end knows whether the window is skipped when it accumulates that backward (DeepSpeed needs it)."""
    backend = as_backend(accelerator)
    plan = loss if isinstance(loss, LossPlan) else LossPlan.build(loss, teacher_slots, teacher)
    counts = backend.reduce_sum(sum(batch_counts(b, plan) for b in batches).to(backend.device))
    n_tok, n_con, n_kd = float(counts[0]), float(counts[1]), float(counts[2])
    # KD (and feature, whose teacher states sit at the same positions) average over the KD positions: all tokens,
    # or across tokenizers the aligned ones.
    denom = {"tokens": n_tok, "kd": n_kd, "contrastive": max(n_con, 1.0)}
    # THE normalisation (see module docstring): sum / global count, times num_processes to undo DDP's mean.
    weights = {t.name: t.weight * backend.num_processes / max(denom[t.positions], 1.0) for t in plan.terms}
    names = [t.name for t in plan.terms]
    local = torch.zeros(len(names) + 1, dtype=torch.float64, device=backend.device)
    for i, batch in enumerate(batches):
        batch = {k: v.to(backend.device, non_blocking=True) for k, v in trim_padding(batch).items()}
        last = i == len(batches) - 1
        with backend.micro_batch(model, last):
            total, sums = micro_batch_sums(model, batch, plan, weights)
            local += torch.stack([sums[n].double() for n in names] + [sums["agree"].double()])
            if last:
                window = backend.reduce_sum(local)
                raw = {t.name: float(window[j]) / denom[t.positions] for j, t in enumerate(plan.terms)}
                nonfinite = [n for n in names if not math.isfinite(raw[n])]
            backend.backward(model, total, last, skip=last and bool(nonfinite))
    return WindowResult(raw=raw, nonfinite=nonfinite, tokens=int(n_tok), agree=float(window[-1]) / max(n_kd, 1.0))


@torch.no_grad()
def evaluate(
    model, loader, loss: LossPlan | LossConfig, accelerator, text_units=None, lockstep: int | None = None
) -> dict[str, float]:
    """Held-out metrics of the model as it is now, in eval mode (LossPlan.for_eval). eval/ppl = exp(eval/ce),
    uncapped. With `text_units` (batch -> [characters, bytes] of its scored targets, kd/textscore.py) also
    eval/bits_per_char and eval/bits_per_byte: the same CE sum over the text those targets cover, comparable
    across tokenizers and with the teacher's score in the cache's manifest.

    `lockstep`: the number of forwards every process must run (parameters partitioned over the processes, ZeRO-3:
    each forward gathers them collectively). A process whose share has fewer batches repeats its last one that
    many times and counts nothing of it, so the figures are those of the shares alone."""
    plan = loss if isinstance(loss, LossPlan) else LossPlan.for_eval(loss)
    was_training = model.training
    model.eval()
    total = torch.zeros(7, dtype=torch.float64, device=accelerator.device)
    done, batch = 0, None
    for batch in loader:
        done += 1
        units = [float(u) for u in text_units(batch)] if text_units is not None else [0.0, 0.0]
        batch = {k: v.to(accelerator.device) for k, v in trim_padding(batch).items()}
        _, sums = micro_batch_sums(model, batch, plan, {}, with_grad=False)
        n_tok, _, n_kd = batch_counts(batch, plan).to(accelerator.device)  # the positions CE and KD count at
        extra = torch.tensor(units, dtype=torch.float64, device=accelerator.device)
        total += torch.cat(
            [torch.stack([sums["ce"].double(), sums["kd"].double(), sums["agree"].double(), n_tok, n_kd]), extra]
        )
    for _ in range(max((lockstep or 0) - done, 0)):  # forwards to keep the processes in step, counted nowhere
        if batch is None:
            raise KDError("an eval share is empty on this process; evaluate at least one batch per process")
        micro_batch_sums(model, batch, plan, {}, with_grad=False)
    total = accelerator.reduce(total, "sum")
    model.train(was_training)
    n, n_kd = float(total[3]), max(float(total[4]), 1.0)
    ce = float(total[0]) / n
    record = {
        "eval/ce": ce,
        "eval/ppl": math.exp(ce),
        "eval/kd": float(total[1]) / n_kd,
        "eval/top1_agreement": float(total[2]) / n_kd,
        "eval/tokens": int(n),
    }
    if text_units is not None:
        record["eval/bits_per_char"] = bits_per_unit(float(total[0]), float(total[5]))
        record["eval/bits_per_byte"] = bits_per_unit(float(total[0]), float(total[6]))
    return record


@dataclass
class StepResult:
    """What one optimizer step did: the window's sums (WindowResult), the gradient norm, what was non-finite, and
    whether the update was applied (a skipped step leaves the weights and the optimizer state as they were)."""

    result: WindowResult
    grad_norm: float
    nonfinite: list[str]
    applied: bool


def optimizer_step(
    model, optimizer, window: list[dict], plan: LossPlan, accelerator, lr: float, max_grad_norm: float | None
) -> StepResult:
    """One optimizer step over `window` (the micro-batches of this process): set the LR, accumulate, clip, then
    step, or, if any loss term or the gradient norm is non-finite, skip: the weights and the optimizer state stay
    as they were (never clamped), and under fp16 the scaler still records the overflow, as its own step would.
    Changes nothing else: the caller advances its TrainState (and EMA weights) from the StepResult."""
    backend = as_backend(accelerator)
    for group in optimizer.param_groups:
        group["lr"] = lr
    result = accumulate_window(model, window, plan, backend)
    grad_norm, applied = backend.finish(model, optimizer, bool(result.nonfinite), max_grad_norm)
    nonfinite = result.nonfinite + ([] if math.isfinite(grad_norm) else ["grad_norm"])
    if not applied:
        nonfinite = nonfinite or ["step not applied by the back-end"]
    return StepResult(result, grad_norm, nonfinite, applied)


def weights_finite(model, accelerator) -> bool:
    """Whether every weight is finite on every process, each process looking at what it holds: FSDP2's shards
    (DTensor.to_local) and DeepSpeed ZeRO-3's partitions (ds_tensor) as much as whole tensors. A step taken with
    finite gradients can still overflow the weights (an enormous LR); they are then never saved."""
    mine = True
    with torch.no_grad():
        for p in model.parameters():
            local = p.ds_tensor if hasattr(p, "ds_tensor") else p.to_local() if hasattr(p, "to_local") else p
            if local.numel() and not bool(torch.isfinite(local).all()):
                mine = False
                break
    return bool(gather_rows(accelerator, [int(mine)]).min())


def eval_record(model, loader, plan: LossPlan, accelerator, ema, state, text_units=None, lockstep=None) -> dict:
    """The eval metrics record at `state`'s step; the EMA weights, when on, reported separately as ema_eval/*.
    `lockstep` as in evaluate()."""
    record = {
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        **evaluate(model, loader, plan, accelerator, text_units, lockstep),
    }
    if ema is not None:
        with ema.applied(accelerator.unwrap_model(model)):
            ema_eval = evaluate(model, loader, plan, accelerator, text_units, lockstep)
            record.update({f"ema_{k}": v for k, v in ema_eval.items()})
    return record
