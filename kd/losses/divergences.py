"""Divergences between a teacher and a student distribution over the same outcomes, and their registry.

Every divergence here is a pure function `fn(s, t, **options) -> [N]` of two log-probability tensors [N, M]: `s` the
student's and `t` the teacher's, each row a distribution over M outcomes (log 0 = -inf allowed). What the outcomes
are is the teacher signal's business (kd/signals.py): the full vocabulary for the online teacher, the k cached ids
plus one tail bucket for cached top-k targets, the mapped ids plus a bucket across tokenizers. Both sides arrive
already at the KD temperature T (log_softmax(z / T) and the tempered teacher); the caller multiplies every kind by
T^2 (Hinton et al. 2015), so a term's weight means the same at every temperature and at T = 1 nothing changes.
fp32 or fp64 in, the same dtype out.

Conventions, so that every value is finite where the maths is: a term whose weight is a probability 0 contributes 0
(xlogy), and reverse-direction kinds, whose log-ratio has the teacher in the denominator, floor the teacher's
probabilities at 1e-30 (as the student's tail bucket is floored in forward KL; the teacher has no gradient, so this
only bounds the penalty for student mass where the teacher has none).

Adding a kind: one function with a docstring that defines it, one `Divergence` entry in REGISTRY, and its cases in
tests/test_divergences.py (value and gradient against the float64 reference, the properties).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kd.errors import KDError

_LOG_FLOOR = math.log(1e-30)


def _kl(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum a (log a - log b) per row, with 0 log 0 = 0 (tested as a == 0 so a NaN stays NaN and is caught). Where
    a == 0 the logs are replaced by 0 before the product, so the branch not taken has no NaN gradient either
    (0 * (-inf - x) would make one)."""
    zero = a == 0
    la = torch.where(zero, torch.zeros_like(log_a), log_a)
    lb = torch.where(zero, torch.zeros_like(log_b), log_b)
    return torch.where(zero, torch.zeros_like(a), a * (la - lb)).sum(-1)


def _log_mix(x: torch.Tensor, wx: float, y: torch.Tensor, wy: float) -> torch.Tensor:
    """log(wx e^x + wy e^y) for weights in (0, 1); -inf where both are -inf, with a zero (not NaN) gradient there."""
    both = (x == float("-inf")) & (y == float("-inf"))
    xs, ys = torch.where(both, torch.zeros_like(x), x), torch.where(both, torch.zeros_like(y), y)
    m = torch.logaddexp(xs + math.log(wx), ys + math.log(wy))
    return torch.where(both, torch.full_like(m, float("-inf")), m)


def forward_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) = sum_i q_i (log q_i - log p_i): mass-covering; what kd has always trained with. The
    gradient is unbiased when q is replaced by an empirical distribution of draws (sampled targets)."""
    return _kl(t.exp(), t, s)


def reverse_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) = sum_i p_i (log p_i - log q_i): mode-seeking (MiniLLM, Gu et al. 2024); q floored at
    1e-30 in the log-ratio."""
    return _kl(s.exp(), s, t.clamp(min=_LOG_FLOOR))


def jsd(s: torch.Tensor, t: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1; TRL's `generalized_jsd_loss`):
    M = beta q + (1 - beta) p, JSD_beta = beta KL(q || M) + (1 - beta) KL(p || M). The mixture form vanishes at both
    ends, so, as in TRL, beta = 0 IS forward KL and beta = 1 IS reverse KL. beta = 0.5 is the symmetric JSD,
    bounded by log 2. (TRL does not multiply by T^2: kd's value is TRL's times T^2.)"""
    if beta == 0.0:
        return forward_kl(s, t)
    if beta == 1.0:
        return reverse_kl(s, t)
    m = _log_mix(t, beta, s, 1.0 - beta)
    return beta * _kl(t.exp(), t, m) + (1.0 - beta) * _kl(s.exp(), s, m)


def tvd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Total variation distance, 1/2 sum_i |p_i - q_i|, in [0, 1] (DistillKit's `tvd`)."""
    return 0.5 * (s.exp() - t.exp()).abs().sum(-1)


def skew_kl(s: torch.Tensor, t: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew KL of DistiLLM (Ko et al. 2024): KL(q || alpha q + (1 - alpha) p). The mixture keeps the log-ratio bounded
    (by -log alpha) where the student has no mass, which trains more stably from a cold student; alpha = 0 is
    forward KL."""
    if alpha == 0.0:
        return forward_kl(s, t)
    m = _log_mix(t, alpha, s, 1.0 - alpha)
    return _kl(t.exp(), t, m)


def skew_reverse_kl(s: torch.Tensor, t: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew reverse KL of DistiLLM: KL(p || alpha p + (1 - alpha) q); alpha = 0 is reverse KL (teacher floored)."""
    if alpha == 0.0:
        return reverse_kl(s, t)
    m = _log_mix(s, alpha, t, 1.0 - alpha)
    return _kl(s.exp(), s, m)


def _unit_interval(name: str, lo_open: bool = False, hi_open: bool = False):
    def check(v):
        if (
            not isinstance(v, (int, float))
            or isinstance(v, bool)
            or not ((0 < v if lo_open else 0 <= v) and (v < 1 if hi_open else v <= 1))
        ):
            lo, hi = "(" if lo_open else "[", ")" if hi_open else "]"
            raise KDError(f"option {name} must be a number in {lo}0, 1{hi}, got {v!r}")
        return float(v)

    return check


@dataclass(frozen=True)
class Divergence:
    """A registry entry. options: name -> (default, validator returning the cleaned value). unbiased_on_samples:
    whether training against an empirical distribution of teacher draws (sampled targets) gives an unbiased gradient
    of the divergence to the teacher itself; only a divergence linear in q does (forward KL: its q-dependent part is
    -sum q log p)."""

    fn: Callable[..., torch.Tensor]
    options: dict = field(default_factory=dict)
    unbiased_on_samples: bool = False


REGISTRY: dict[str, Divergence] = {
    "forward_kl": Divergence(forward_kl, unbiased_on_samples=True),
    "reverse_kl": Divergence(reverse_kl),
    "jsd": Divergence(jsd, {"beta": (0.5, _unit_interval("beta"))}),
    "tvd": Divergence(tvd),
    "skew_kl": Divergence(skew_kl, {"alpha": (0.1, _unit_interval("alpha", hi_open=True))}),
    "skew_reverse_kl": Divergence(skew_reverse_kl, {"alpha": (0.1, _unit_interval("alpha", hi_open=True))}),
}


def resolve(kind: str, options: dict) -> tuple[Divergence, dict]:
    """The entry of `kind` and its options with defaults filled in; unknown kinds and options raise KDError."""
    if kind not in REGISTRY:
        raise KDError(f"unknown divergence kind {kind!r}; choose one of {sorted(REGISTRY)}")
    entry = REGISTRY[kind]
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        allowed = sorted(entry.options) or "none"
        raise KDError(f"divergence {kind} has no option(s) {unknown}; its options: {allowed}")
    clean = {}
    for name, (default, check) in entry.options.items():
        try:
            clean[name] = check(options.get(name, default))
        except KDError as e:
            raise KDError(f"divergence {kind}: {e}") from None
    return entry, clean
