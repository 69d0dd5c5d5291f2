"""The loss as a weighted list of terms, and the chunked pass that computes the logit-level ones together.

A term is `{kind, weight, name?, ...options}`:
  ce                        next-token cross-entropy on the data (every loss position)
  forward_kl, reverse_kl, jsd (beta), tvd, skew_kl (alpha), skew_reverse_kl (alpha)
                            a divergence (kd/losses/divergences.py) between the student and the teacher signal
                            (kd/signals.py), at loss.temperature, times T^2, at the KD positions
  uld                       Universal Logit Distillation across tokenizers (cross-tokenizer runs only)
  feature (distance)        hidden-state distance at loss.feature_layers
  contrastive (temperature, max_positions)
                            InfoNCE between projected student and teacher states of a micro-batch
Each kind is one entry of KINDS (a TermKind: its level, positions, options and how it is computed). Each term is a
token mean over the whole accumulation window on all processes (kd/train/step.py normalises once); the
loss is sum_i weight_i * term_i. A term of weight 0 is still computed and logged (a monitor). `name` (default: the
kind) is the term's metrics key; it must be unique.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from kd.errors import KDError
from kd.losses import divergences
from kd.losses.chunked import HeadInput, chunk_logits, head_chunked, logits_chunked
from kd.losses.features import feature_per_position, info_nce_sum
from kd.losses.forward import ce_kd_chunk
from kd.signals import Mapped, TailPolicy, TopK


@dataclass(frozen=True)
class Term:
    name: str
    kind: str
    weight: float
    options: dict = field(default_factory=dict)

    @property
    def positions(self) -> str:
        """Which positions the term averages over (TermKind.positions)."""
        return KINDS[self.kind].positions

    @property
    def needs_hidden(self) -> bool:
        return KINDS[self.kind].level == "hidden"

    def value(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return divergences.REGISTRY[self.kind].fn(s, t, **self.options)


class ChunkTerms:
    """What the logit-level kinds of one chunk of rows read, each computed once for all of them: the chunk's logits z
    [c, V] (fp32), its log-softmax at T = 1 (`logp`) and the (student, teacher) pair over the signal's outcomes at the
    temperature (`pair`: kd/signals.py)."""

    def __init__(self, z, rows, targets, mask, kd_mask, signal, T: float):
        self.z, self.rows, self.targets, self.mask, self.kd_mask, self.signal, self.T = (
            z, rows, targets, mask, kd_mask, signal, T,
        )  # fmt: skip
        self._logp = self._pair = None

    @property
    def logp(self) -> torch.Tensor:
        if self._logp is None:
            self._logp = torch.log_softmax(self.z, dim=-1)
        return self._logp

    def pair(self):
        if self._pair is None:  # at T = 1 the tempered log-softmax is logp itself (one [c, V] pass, one graph node)
            tempered = self.logp if self.T == 1.0 else torch.log_softmax(self.z / self.T, dim=-1)
            self._pair = self.signal.pair(tempered, self.rows, self.T)
        return self._pair


def _ce_chunk(c: ChunkTerms, term: Term):
    return -c.logp.gather(-1, c.targets[c.rows].clamp(min=0)[:, None]).squeeze(-1), c.mask[c.rows]


def _uld_chunk(c: ChunkTerms, term: Term):
    return _uld(c.z, c.signal.sorted_teacher_probs(c.rows)), c.kd_mask[c.rows]


def _divergence_chunk(c: ChunkTerms, term: Term):
    return term.value(*c.pair()) * (c.T * c.T), c.kd_mask[c.rows]


def _feature_sum(student_h, teacher_h, term: Term, kd_mask, con_idx):
    """Hidden-state distance summed over the KD positions (teacher states sit there across tokenizers too)."""
    per_pos = feature_per_position(student_h, teacher_h, term.options["distance"])
    return torch.where(kd_mask, per_pos, torch.zeros_like(per_pos)).sum()


def _contrastive_sum(student_h, teacher_h, term: Term, kd_mask, con_idx):
    """InfoNCE over the micro-batch's contrastive positions (kd.train.step.contrastive_positions)."""
    return info_nce_sum(student_h[con_idx], teacher_h[con_idx], term.options["temperature"])


def _check_feature(options: dict) -> str | None:
    if options["distance"] not in ("cosine", "normalized_mse"):
        return f"feature distance must be cosine or normalized_mse, got {options['distance']!r}"
    return None


def _check_contrastive(options: dict) -> str | None:
    if not isinstance(options["temperature"], (int, float)) or options["temperature"] <= 0:
        return f"contrastive temperature must be > 0, got {options['temperature']!r}"
    if not isinstance(options["max_positions"], int) or options["max_positions"] < 2:
        return f"contrastive max_positions must be an integer >= 2, got {options['max_positions']!r}"
    return None


@dataclass(frozen=True)
class TermKind:
    """One kind of loss term, declared once: what it needs and where it counts. A new kind is one entry of KINDS
    plus its tests (tests/test_losses.py enumerates KINDS).

    level: `logit` kinds are computed together chunk by chunk on the student's logits (`chunk`: (ChunkTerms, Term)
        -> (per-row values, the rows that count)); `hidden` kinds on the projected student and the cached teacher
        hidden states at the mapped layer pairs (`hidden_sum`: (student [N, H], teacher [N, H], Term, kd_mask [N],
        contrastive indices) -> the sum over the micro-batch).
    positions: what its sum is divided by: every token (`tokens`), the KD positions (`kd`: the tokens, or the
        aligned ones across tokenizers) or the contrastive candidates (`contrastive`).
    options: the options it takes and their defaults (a divergence's are its own: kd/losses/divergences.py);
    check: what is wrong with given options (a message), or None.
    cross_tokenizer: `any`, `only` (it compares across tokenizers) or `never` (it cannot run across tokenizers).
    """

    level: Literal["logit", "hidden"]
    positions: Literal["tokens", "kd", "contrastive"]
    chunk: Callable | None = None
    hidden_sum: Callable | None = None
    options: dict = field(default_factory=dict)
    check: Callable[[dict], str | None] = lambda options: None
    cross_tokenizer: Literal["any", "only", "never"] = "any"

    @property
    def divergence(self) -> bool:
        return self.chunk is _divergence_chunk


KINDS: dict[str, TermKind] = {
    "ce": TermKind("logit", "tokens", chunk=_ce_chunk),
    "uld": TermKind("logit", "kd", chunk=_uld_chunk, cross_tokenizer="only"),
    **{name: TermKind("logit", "kd", chunk=_divergence_chunk) for name in divergences.REGISTRY},
    "feature": TermKind("hidden", "kd", hidden_sum=_feature_sum, options={"distance": "cosine"}, check=_check_feature),
    "contrastive": TermKind(
        "hidden",
        "contrastive",
        hidden_sum=_contrastive_sum,
        options={"temperature": 0.1, "max_positions": 256},
        check=_check_contrastive,
        cross_tokenizer="never",
    ),
}


def needs_teacher_signal(term: Term) -> bool:
    """Whether a term reads the teacher's distribution (a logit term other than CE)."""
    return term.kind != "ce" and not term.needs_hidden


def needs_hidden(terms: list[Term]) -> bool:
    """Whether any term reads hidden states (the cache must then store them, the student return them)."""
    return any(t.needs_hidden for t in terms)


def parse_terms(specs: list, where: str = "loss.terms") -> list[Term]:
    """Validate a config list of term mappings into Terms; every mistake is one KDError naming the entry."""
    if not isinstance(specs, list) or not specs:
        raise KDError(f"{where} must be a non-empty list of {{kind, weight, ...options}} mappings")
    terms = []
    for i, spec in enumerate(specs):
        at = f"{where}[{i}]"
        if not isinstance(spec, dict) or "kind" not in spec:
            raise KDError(f"{at} must be a mapping with a `kind` (one of {list(KINDS)}), got {spec!r}")
        spec = dict(spec)
        kind, name = spec.pop("kind"), spec.pop("name", None)
        weight = spec.pop("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight >= 0:
            raise KDError(f"{at}: weight must be a number >= 0, got {weight!r}")
        if kind not in KINDS:
            raise KDError(f"{at}: unknown loss kind {kind!r}; choose one of {list(KINDS)}")
        entry = KINDS[kind]
        if entry.divergence:
            try:
                _, options = divergences.resolve(kind, spec)
            except KDError as e:
                raise KDError(f"{at}: {e}") from None
        else:
            unknown = sorted(set(spec) - set(entry.options))
            if unknown:
                takes = f"its options: {sorted(entry.options)}" if entry.options else "it takes no options"
                raise KDError(f"{at}: {kind} has no option(s) {unknown}; {takes}")
            options = {**entry.options, **spec}
            problem = entry.check(options)
            if problem:
                raise KDError(f"{at}: {problem}")
        terms.append(Term(name or kind, kind, float(weight), options))
    names = [t.name for t in terms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise KDError(f"{where}: term names {dup} appear more than once; give each a distinct `name`")
    if all(t.weight == 0 for t in terms):
        raise KDError(f"{where}: every weight is 0: nothing would be trained")
    hidden = [t.kind for t in terms if t.needs_hidden]
    if len(hidden) != len(set(hidden)):
        raise KDError(f"{where}: at most one term of each hidden-state kind ({', '.join(sorted(set(hidden)))})")
    return terms


# ----------------------------------------------------------------------------------------------------------
# The logit-level terms of one micro-batch, chunk by chunk of positions


def _uld(z: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """sum_i |p_t(i) - p_s(i)| over the k largest probabilities of each side, sorted (Boizard et al. 2024); T = 1,
    ids are not compared."""
    p_s = torch.softmax(z, dim=-1).topk(teacher_probs.shape[-1], dim=-1, sorted=True).values
    return (p_s - teacher_probs).abs().sum(-1)


def _chunk_sums(z, rows, targets, mask, kd_mask, signal, terms, T):
    """Masked sums of every term over one chunk of rows (fp32 scalars, in `terms` order) and the top-1 count."""
    chunk = ChunkTerms(z, rows, targets, mask, kd_mask, signal, T)
    out = []
    for term in terms:
        v, m = KINDS[term.kind].chunk(chunk, term)
        out.append(torch.where(m, v, torch.zeros_like(v)).sum())
    if signal is None:  # no teacher (CE alone): nothing to agree with
        return out, torch.zeros((), device=z.device)
    agree = ((z.detach().argmax(-1) == signal.top1(rows)) & kd_mask[rows]).sum().float()
    return out, agree


def _autograd_chunk_fn(targets, mask, kd_mask, signal, terms, weights, T):
    """A chunk function (kd/losses/chunked.py) for any mix of terms: autograd through the pure functions, per chunk,
    so only one chunk's [chunk, V] fp32 temporaries and their graph exist at a time."""
    keep = mask | kd_mask

    def fn(z, rows):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            values, agree = _chunk_sums(z, rows, targets, mask, kd_mask, signal, terms, T)
            total = sum(w * v for w, v in zip(weights, values))
            (g,) = torch.autograd.grad(total, z) if total.requires_grad else (torch.zeros_like(z),)
        # rows no term counts get exactly zero gradient, even where their logits are not finite
        g = torch.where(keep[rows, None], g, torch.zeros_like(g))
        return g, torch.stack([v.detach() for v in values] + [agree])

    return fn


def _analytic_chunk_fn(targets, mask, kd_mask, signal, terms, weights, T):
    """A chunk function for CE + forward KL (kd.losses.forward: the analytic gradient, one softmax per chunk, no
    graph), its [CE, KD, top-1] sums put in `terms` order."""
    w = {t.kind: wt for t, wt in zip(terms, weights)}
    if signal is None:  # CE alone
        ids, values, tail = None, None, "bucket"
    elif signal.name == "online":
        ids, values, tail = None, signal.logits, "bucket"
    else:  # a mapped signal is bucketed like top-k, its unmapped ids (-1) no outcome
        ids, values, tail = signal.ids, signal.logprobs, getattr(signal, "tail", "bucket")
    order = [{"ce": 0, "forward_kl": 1}[t.kind] for t in terms] + [2]

    def fn(z, rows):
        g, sums = ce_kd_chunk(
            z,
            targets[rows].clamp(min=0),
            mask[rows],
            None if ids is None else ids[rows],
            None if values is None else values[rows],
            w.get("ce", 0.0),
            w.get("forward_kl", 0.0),
            T,
            tail,
            kd_mask[rows],
            signal is not None and signal.unmapped_ids,
        )
        return g, sums[order]

    return fn


def fused_eligible(terms: list[Term], signal) -> bool:
    """The analytic path covers CE + forward KL (at most one of each) on every signal: top-k, sampled, online and
    mapped (cross-tokenizer)."""
    kinds = [t.kind for t in terms]
    return (
        (signal is None or signal.name in ("topk", "sampled", "online", "mapped"))
        and set(kinds) <= {"ce", "forward_kl"}
        and kinds.count("ce") <= 1
        and kinds.count("forward_kl") <= 1
    )


def logit_term_sums(
    logits: torch.Tensor | HeadInput,
    targets: torch.Tensor,
    mask: torch.Tensor,
    kd_mask: torch.Tensor,
    signal,
    terms: list[Term],
    weights: list[float],
    temperature: float,
    chunk: int,
    with_grad: bool = True,
    fused: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(sum_i weights[i] * term_i with gradient, or None without; [len(terms) + 1] sums: each term's masked sum
    over positions, then the top-1 agreement count) for the logit-level `terms`.

    `logits` is the student's logits [N, V], or a HeadInput (the final hidden states and the LM head): the head is
    then computed chunk by chunk inside the loss and the logits never exist whole (kd/losses/chunked.py).
    CE counts at `mask`, every other term at `kd_mask` (= mask, or the aligned positions across tokenizers).
    `weights` are the effective multipliers (the caller folds its normalisation in). CE + forward KL (on any
    signal, mapped cross-tokenizer targets included) take the analytic-gradient chunk function (kd.losses.forward)
    unless fused=False; everything else autograd per chunk. Without gradient, only chunk-sized temporaries exist
    either way."""
    T = float(temperature)
    weights = [float(w) for w in weights]
    if not with_grad:
        n = logits.num_rows if isinstance(logits, HeadInput) else logits.shape[0]
        sums = torch.zeros(len(terms) + 1, dtype=torch.float32, device=targets.device)
        with torch.no_grad():
            for s in range(0, n, chunk):
                rows = slice(s, min(s + chunk, n))
                values, agree = _chunk_sums(chunk_logits(logits, rows), rows, targets, mask, kd_mask, signal, terms, T)
                sums += torch.stack(values + [agree])
        return None, sums
    if fused and fused_eligible(terms, signal):
        fn = _analytic_chunk_fn(targets, mask, kd_mask, signal, terms, weights, T)
    else:
        fn = _autograd_chunk_fn(targets, mask, kd_mask, signal, terms, weights, T)
    if isinstance(logits, HeadInput):
        return head_chunked(logits, fn, weights, chunk)
    return logits_chunked(logits, fn, weights, chunk)


def cross_kd_per_position(
    student_logits: torch.Tensor,
    mapped_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    kind: str,
    temperature: float,
    uld_weight: float,
) -> torch.Tensor:
    """The older cross-tokenizer KD kinds per position, [N], on the same signal and functions training uses.
    mapped_ids [N, k]: the student id of each cached teacher top-k token, -1 where the student has none.

    mapped: T^2 * forward KL on the Mapped signal (the mapped ids plus one bucket holding all other mass).
    uld: sum_i |p_t(i) - p_s(i)| over the k largest probabilities of each side, sorted (T = 1, ids not compared).
    hybrid: mapped + uld_weight * uld.
    """
    if kind not in ("mapped", "uld", "hybrid"):
        raise ValueError(f"unknown cross-tokenizer loss {kind!r}")
    T = float(temperature)
    z = student_logits.float()
    signal, rows = Mapped(mapped_ids, topk_logprobs), slice(None)
    total = torch.zeros(z.shape[0], device=z.device)
    if kind in ("mapped", "hybrid"):
        total = total + divergences.forward_kl(*signal.pair(torch.log_softmax(z / T, dim=-1), rows, T)) * (T * T)
    if kind in ("uld", "hybrid"):
        total = total + (uld_weight if kind == "hybrid" else 1.0) * _uld(z, signal.sorted_teacher_probs(rows))
    return total


def sparse_kd_per_position(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    temperature: float,
    tail: TailPolicy,
) -> torch.Tensor:
    """T^2 * KL(teacher || student) per position, [N], from the student's logits [N, V] and the cached teacher
    top-k ids [N, k] (int64) and log-probs [N, k] (any float dtype; full-softmax log-probs at T = 1): forward KL on
    the TopK signal with `tail` (bucket or renormalize), the same functions training uses."""
    T = float(temperature)
    signal = TopK(topk_ids, topk_logprobs, tail)
    s_logp = torch.log_softmax(student_logits.float() / T, dim=-1)
    return divergences.forward_kl(*signal.pair(s_logp, slice(None), T)) * (T * T)


def token_losses(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    tail: TailPolicy,
) -> torch.Tensor:
    """Sums over masked positions of [CE, KD, top-1 agreement with the teacher], as a [3] fp32 tensor.

    student_logits [N, V]; targets [N] next-token ids; topk_ids/topk_logprobs [N, k]; mask [N] bool.
    Top-1 agreement counts positions where the student's argmax equals the teacher's most likely token; it has
    no gradient.
    """
    logits = student_logits.float()
    ce = F.cross_entropy(logits, targets.clamp(min=0), reduction="none")
    kd = sparse_kd_per_position(logits, topk_ids, topk_logprobs, temperature, tail)
    agree = (logits.argmax(-1) == topk_ids[:, 0]).float()
    zero = torch.zeros_like(ce)
    return torch.stack(
        [torch.where(mask, ce, zero).sum(), torch.where(mask, kd, zero).sum(), torch.where(mask, agree, zero).sum()]
    )
