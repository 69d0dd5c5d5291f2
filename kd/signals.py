"""What the student is compared with: one class per teacher signal, behind one interface.

A signal holds its teacher tensors for N flattened positions and, for a chunk of rows, turns the student's tempered
log-probabilities log_softmax(z / T) [c, V] into a pair of log-probability tensors over the same outcomes, the input
of every divergence in kd/losses/divergences.py:

  TopK      cached top-k log-probs. Outcomes: the k ids + one tail bucket. Teacher tail = 1 - its top-k mass
            (`bucket`) or 0 (`renormalize`: the teacher renormalised on its top-k); student tail = 1 - its mass on the
            k ids (floored at 1e-30). With `bucket` every divergence is a divergence between two distributions on
            k + 1 outcomes, exact at T = 1; with `renormalize` student mass outside the top-k meets a teacher 0.
  Sampled   cached draws: q = counts / n (tempered as log(counts / n) / T, renormalised), outcomes as TopK with
            `renormalize`. Only divergences whose gradient stays unbiased under q -> counts / n are allowed.
  Online    the teacher's full logits, computed in the training process: outcomes = the vocabulary, exact.
  Mapped    cross-tokenizer targets: cached teacher top-k with each id mapped to an identical student token (-1 =
            none). Outcomes: the mapped ids + one bucket holding all other mass on both sides (the teacher's unmapped
            top-k mass and its tail; the student's mass elsewhere). Unmapped entries are -inf on both sides.

A teacher tail below TAIL_FLOOR (2^-20) is rounding, not mass, and is exactly 0; where the
student's tail is below it too, so is the student's. So k = V gives the exact divergence at every temperature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from kd.errors import KDError

_NEG_INF = float("-inf")

# ---- tail rules: the teacher's and the student's mass outside the cached ids ------------------------------------

TailPolicy = Literal["renormalize", "bucket"]
TAIL_POLICIES = ("renormalize", "bucket")
# Smallest probability a student tail bucket is clamped to, so log(p_tail) stays finite when the student puts
# (numerically) all of its mass on the teacher's top-k.
MIN_TAIL = 1e-30
# A teacher tail (1 - the cached top-k mass) below this is taken as exactly 0: it cannot be told from the rounding
# of k fp32 log-probs that hold all the mass (~1e-7 each) or of the q8 codec (total mass kept to ~1e-6). Left in,
# tempering would inflate it (1e-7 ** (1 / 4) = 0.018 at T = 4) and charge it against a student tail clamped to
# 1e-30 (the bug of issue 12: up to 8 nats at k = V). A real tail this small changes KD by < 2^-20 * 69 nats at T = 1.
TAIL_FLOOR = 2.0**-20
LOG_TAIL_FLOOR = -20 * 0.6931471805599453


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable on both ends (Maechler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_bucket(t_lp: torch.Tensor, T: float) -> torch.Tensor:
    """The teacher's k + 1 log-probs at temperature T, [N, k+1]: the cached top-k full-softmax log-probs (at T = 1)
    and their tail log(1 - sum), divided by T and renormalised (the tail as one outcome: its inner shape is not
    cached). A tail below TAIL_FLOOR is exactly 0 (-inf), at every T."""
    # in fp64: a tail of 1e-6 is 1 - (the top-k sum), and fp32 would lose it to cancellation ([N, k], cheap)
    t64 = t_lp.double()
    t_tail = _log1mexp(torch.logsumexp(t64, dim=-1, keepdim=True))  # exact tail mass at T = 1
    t_tail = torch.where(t_tail < LOG_TAIL_FLOOR, torch.full_like(t_tail, float("-inf")), t_tail)
    return torch.log_softmax(torch.cat([t64, t_tail], dim=-1) / T, dim=-1).to(t_lp.dtype)


def student_tail(s_top: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(s_top)) per row [N, 1], floored at MIN_TAIL: the student's mass outside the cached ids.
    The sum is taken in fp64 (1 - S cancels when S is near 1); -inf entries (unmapped ids) carry no mass."""
    mass = -torch.expm1(torch.logsumexp(s_top.double(), dim=-1, keepdim=True))
    return torch.log(mass.clamp(min=MIN_TAIL)).to(s_top.dtype)


def gather_mapped(s_logp: torch.Tensor, ids: torch.Tensor, t_lp: torch.Tensor):
    """(student log-probs at the teacher's mapped ids, the teacher's log-probs), both -inf where an id is -1 (a
    teacher token with no identical student token: no outcome on either side, its mass left to the tail bucket)."""
    ok = ids >= 0
    neg = torch.full_like(t_lp, float("-inf"))
    return torch.where(ok, s_logp.gather(-1, ids.clamp(min=0)), neg), torch.where(ok, t_lp, neg)


def _with_buckets(s_top: torch.Tensor, t_kp1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the student's tail to s_top (the teacher's [c, k+1] already has its own). Where the teacher's tail
    is 0 and the student's is below TAIL_FLOOR too, both are rounding (k = V): the student's is then 0 as well, so
    that reverse-direction kinds do not charge ~1e-7 of fp32 noise against the teacher's floor."""
    s_tail = student_tail(s_top)
    noise = (t_kp1[:, -1:] == float("-inf")) & (s_tail < LOG_TAIL_FLOOR)
    s_tail = torch.where(noise, torch.full_like(s_tail, float("-inf")), s_tail)
    return torch.cat([s_top, s_tail], dim=-1), t_kp1


class Signal:
    """Base: `pair(s_logp, rows, T)` -> (student, teacher) log-probs over this signal's outcomes for `rows`;
    `top1(rows)` the teacher's most likely student token id per row (-1 = none), for top-1 agreement."""

    name = "signal"
    # whether `ids` may hold -1 (no student token): only a cross-tokenizer mapping's; known per signal, so the
    # loss never asks the device per chunk
    unmapped_ids = False

    def pair(self, s_logp: torch.Tensor, rows: slice | torch.Tensor, T: float):
        raise NotImplementedError

    def top1(self, rows) -> torch.Tensor:
        raise NotImplementedError


class TopK(Signal):
    name = "topk"

    def __init__(self, ids: torch.Tensor, logprobs: torch.Tensor, tail: str):
        if tail not in ("bucket", "renormalize"):
            raise KDError(f"unknown tail policy {tail!r}; expected bucket or renormalize")
        self.ids, self.logprobs, self.tail = ids, logprobs, tail

    def _teacher(self, t_lp: torch.Tensor, T: float) -> torch.Tensor:
        if self.tail == "bucket":
            return teacher_bucket(t_lp, T)
        q = torch.log_softmax(t_lp / T, dim=-1)
        return torch.cat([q, torch.full_like(q[:, :1], _NEG_INF)], dim=-1)

    def pair(self, s_logp, rows, T):
        s_top = s_logp.gather(-1, self.ids[rows])
        return _with_buckets(s_top, self._teacher(self.logprobs[rows].float(), T))

    def top1(self, rows):
        return self.ids[rows, 0]


class Sampled(TopK):
    """counts / n as log-probabilities (-inf for padding, probability 0), renormalised after tempering."""

    name = "sampled"

    def __init__(self, ids: torch.Tensor, counts: torch.Tensor):
        c = counts.float()
        super().__init__(ids, torch.log(c / c.sum(-1, keepdim=True)), "renormalize")


class Online(Signal):
    """The teacher's full logits [N, V] (V = the student's vocabulary)."""

    name = "online"

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def pair(self, s_logp, rows, T):
        return s_logp, torch.log_softmax(self.logits[rows].float() / T, dim=-1)

    def top1(self, rows):
        return self.logits[rows].argmax(-1)


class Mapped(Signal):
    name = "mapped"
    unmapped_ids = True

    def __init__(self, mapped_ids: torch.Tensor, logprobs: torch.Tensor):
        self.ids, self.logprobs = mapped_ids, logprobs

    def pair(self, s_logp, rows, T):
        s_top, t_lp = gather_mapped(s_logp, self.ids[rows], self.logprobs[rows].float())
        return _with_buckets(s_top, teacher_bucket(t_lp, T))

    def top1(self, rows):
        return self.ids[rows, 0]

    def sorted_teacher_probs(self, rows) -> torch.Tensor:
        """The teacher's cached top-k probabilities, most likely first (ULD compares these, not ids)."""
        return self.logprobs[rows].float().exp()


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _topk(tail: str, teacher):
    return lambda b, attention: TopK(_flat(b["topk_ids"]), _flat(b["topk_logprobs"]), tail)


def _sampled(tail: str, teacher):
    return lambda b, attention: Sampled(_flat(b["sample_ids"]), _flat(b["sample_counts"]))


def _online(tail: str, teacher):
    if teacher is None:
        raise KDError("loss.target=online needs the teacher model in the training process")

    def online(b, attention):
        with torch.inference_mode():
            logits = teacher(input_ids=b["input_ids"], attention_mask=attention).logits
        return Online(_flat(logits.clone()))  # clone: an inference tensor cannot take part in autograd

    return online


@dataclass(frozen=True)
class Target:
    """A teacher signal a run trains against (loss.target): the cache fields it reads, whether the cache must have
    been written with sampled targets, and `build(tail, teacher)` -> a function (batch, attention) -> Signal over the
    batch's flattened [B * T] positions. A new target is one entry of TARGETS plus its tests (tests/test_divergences.py
    enumerates them against LossConfig.target's choices)."""

    fields: tuple[str, ...]
    build: Callable
    needs_samples: bool = False


TARGETS: dict[str, Target] = {
    "topk": Target(("topk_ids", "topk_logprobs"), _topk),
    "sampled": Target(("sample_ids", "sample_counts"), _sampled, needs_samples=True),
    "online": Target((), _online),  # the reference mode: the teacher in memory, as the cache exists to avoid
}


def batch_signal(target: str, tail: str, cross_tokenizer: bool, teacher=None):
    """The one choice of teacher signal, made at set-up (TARGETS[target].build); across tokenizers the batch's top-k
    ids are already mapped to student ids (kd/align.py), and the signal is Mapped."""
    if cross_tokenizer:
        return lambda b, attention: Mapped(_flat(b["topk_ids"]), _flat(b["topk_logprobs"]))
    if target not in TARGETS:
        raise KDError(f"unknown loss.target {target!r}; choose one of {list(TARGETS)}")
    return TARGETS[target].build(tail, teacher)
