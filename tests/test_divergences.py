"""Every divergence kind on every teacher signal against a float64 reference written from its definition, and the
properties the loss interface promises (issue 12)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from kd.errors import KDError
from kd.losses import divergences, fused_ce_kd
from kd.losses.terms import Term, logit_term_sums, parse_terms, sparse_kd_per_position
from kd.signals import Mapped, Online, TopK
from kd.train_config import LossConfig

# every registry entry at its default options (so a new divergence is tested by every test below), plus settings
# of the parameterised ones away from their defaults
KINDS = [(kind, divergences.resolve(kind, {})[1]) for kind in divergences.REGISTRY] + [
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.9}),
    ("skew_kl", {"alpha": 0.3}),
    ("skew_reverse_kl", {"alpha": 0.3}),
]


# ---- the float64 reference: textbook formulas on explicit probability vectors ---------------------------------


def ref_divergence(kind: str, lp: torch.Tensor, lq: torch.Tensor, **o) -> torch.Tensor:
    """lp student, lq teacher: [N, M] float64 log-probabilities (log space, so 1e4-sized logits do not underflow);
    0 log 0 = 0; the teacher floored at 1e-30 in reverse ratios."""
    lp, lq = lp.clamp(min=-1e300), lq.clamp(min=-1e300)  # log 0 as a finite number: no NaN gradients from -inf

    def kl(la, lb):
        a = la.exp()
        return torch.where(a > 0, a * (la - lb), torch.zeros_like(a)).sum(-1)

    def mix(la, wa, lb, wb):
        return torch.logaddexp(la + math.log(wa), lb + math.log(wb))

    if kind == "forward_kl":
        return kl(lq, lp)
    if kind == "reverse_kl":
        return kl(lp, lq.clamp(min=math.log(1e-30)))
    if kind == "jsd":
        b = o["beta"]
        lm = mix(lq, b, lp, 1 - b)
        return b * kl(lq, lm) + (1 - b) * kl(lp, lm)
    if kind == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    if kind == "skew_kl":
        return kl(lq, mix(lq, o["alpha"], lp, 1 - o["alpha"]))
    if kind == "skew_reverse_kl":
        return kl(lp, mix(lp, o["alpha"], lq, 1 - o["alpha"]))
    raise AssertionError(kind)


def ref_distributions(z, teacher_logits, signal: str, k: int, T: float, tail: str = "bucket", cached=None):
    """(student, teacher) log-probs over the signal's outcomes, float64, from the teacher's FULL distribution, or
    from `cached` = (ids, log-probs) as the cache stores them (fp32: the reference then sees the same input).

    online: the vocabulary. topk: the teacher's k most likely ids + one tail outcome; the teacher's tail is
    1 - top-k mass at T = 1 (0 with renormalize, and 0 when below 2^-20), tempered as one outcome; the student's
    bucket is its full softmax at T summed outside the k ids (floored at 1e-30; 0 where both tails are below 2^-20)."""
    lp_full = torch.log_softmax(z.double() / T, -1)
    if signal == "online":
        return lp_full, torch.log_softmax(teacher_logits.double() / T, -1)
    top_lp, ids = torch.log_softmax(teacher_logits.double(), -1).topk(k, -1)
    if cached is not None:
        ids, top_lp = cached[0], cached[1].double()
    t_mass = 1 - top_lp.exp().sum(-1, keepdim=True)
    t_tail = torch.where(
        (t_mass < 2**-20) | torch.tensor(tail == "renormalize"),
        torch.full_like(t_mass, -math.inf),
        torch.log(t_mass.clamp(min=1e-300)),
    )
    lq = torch.log_softmax(torch.cat([top_lp, t_tail], -1) / T, -1)
    lp_top = lp_full.gather(-1, ids)
    s_mass = 1 - lp_top.exp().sum(-1, keepdim=True)
    s_tail = torch.where(
        (t_tail == -math.inf) & (s_mass < 2**-20),
        torch.full_like(s_mass, -math.inf),
        torch.log(s_mass.clamp(min=1e-30)),
    )
    return torch.cat([lp_top, s_tail], -1), lq


def make_case(seed: int, N: int = 12, V: int = 40, pad: int = 3, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    z[:, V - pad :] = float("-inf")  # a padded vocabulary: both sides give those ids probability 0
    t[:, V - pad :] = float("-inf")
    mask = torch.rand(N, generator=g) > 0.25
    mask[0] = True
    return z, t, mask


def signal_for(name: str, t64: torch.Tensor, k: int, tail: str = "bucket"):
    if name == "online":
        return Online(t64.float())
    lp, ids = torch.log_softmax(t64, -1).float().topk(k, -1)
    return TopK(ids, lp, tail)


def chunked(z, signal, terms, mask, T, chunk=5, fused=False):
    """(value, gradient w.r.t. z) through kd's chunked path, unit weights."""
    z = z.float().clone().requires_grad_(True)
    targets = torch.zeros(len(z), dtype=torch.long)
    total, sums = logit_term_sums(z, targets, mask, mask, signal, terms, [1.0] * len(terms), T, chunk, fused=fused)
    total.backward()
    return sums, z.grad


@pytest.mark.parametrize("kind,opts", KINDS)
@pytest.mark.parametrize(
    "signal,k,tail", [("online", None, None), ("topk", 8, "bucket"), ("topk", 37, "bucket"), ("topk", 8, "renormalize")]
)
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_kind_matches_float64_reference(kind, opts, signal, k, tail, T):
    """Value and gradient of every kind equal the float64 definition: dense, top-k with the tail bucket (k = V - pad
    included: every real token cached), renormalized; masked positions and padded vocabulary ids (-inf) in."""
    z, t, mask = make_case(zlib.crc32(repr((kind, opts, signal, k, T)).encode()) % 1000)
    sig = signal_for(signal, t, k, tail)
    sums, grad = chunked(z, sig, [Term(kind, kind, 1.0, opts)], mask, T)

    z_ref = z.clone().requires_grad_(True)
    p, q = ref_distributions(
        z_ref, t, signal, k or 0, T, tail or "bucket", None if signal == "online" else (sig.ids, sig.logprobs)
    )
    per = ref_divergence(kind, p, q, **opts) * T * T
    ref = per[mask].sum()
    ref.backward()
    torch.testing.assert_close(sums[0].double(), ref.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), z_ref.grad, rtol=2e-4, atol=2e-5)
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,opts", KINDS)
def test_kind_on_logits_of_magnitude_1e4_in_half_precision(kind, opts, dtype):
    """Half-precision logits of magnitude 1e4 are upcast per chunk: values and gradients stay finite and equal the
    float64 reference on the same (rounded) logits."""
    z, t, mask = make_case(7, scale=1.0)
    z = (z * 1e4).to(dtype)
    t = (t * 1e4).to(dtype)
    sig = signal_for("topk", t.double(), 8)
    zz = z.clone().requires_grad_(True)
    total, sums = logit_term_sums(
        zz, torch.zeros(len(z), dtype=torch.long), mask, mask, sig, [Term(kind, kind, 1.0, opts)], [1.0], 1.0, 4
    )
    total.backward()
    assert torch.isfinite(sums).all() and torch.isfinite(zz.grad.float()).all()
    z_ref = z.double().clone().requires_grad_(True)
    p, q = ref_distributions(z_ref, t.double(), "topk", 8, 1.0)
    ref = ref_divergence(kind, p, q, **opts)[mask].sum()
    ref.backward()
    torch.testing.assert_close(sums[0].double(), ref.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(zz.grad.double(), z_ref.grad, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("kind,opts", KINDS)
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_identical_distributions_give_zero_and_random_ones_are_positive(kind, opts, T):
    z, _, mask = make_case(3)
    for sig in (Online(z.float()), signal_for("topk", z, z.shape[1] - 3)):  # k = every real token
        sums, grad = chunked(z, sig, [Term(kind, kind, 1.0, opts)], mask, T)
        assert abs(float(sums[0])) < 1e-4 * T * T, (sig.name, float(sums[0]))
        if kind != "tvd":  # |p - q| has no gradient at p = q; rounding picks a side
            assert grad.abs().max() < 1e-4
    z2, t2, mask2 = make_case(4)
    for sig in (Online(t2.float()), signal_for("topk", t2, 8)):
        per_row = [
            chunked(z2[i : i + 1], _rows(sig, i), [Term(kind, kind, 1.0, opts)], mask2[i : i + 1], T)[0][0]
            for i in range(len(z2))
            if mask2[i]
        ]
        assert min(per_row) > 0


def _rows(sig, i):
    if isinstance(sig, Online):
        return Online(sig.logits[i : i + 1])
    return TopK(sig.ids[i : i + 1], sig.logprobs[i : i + 1], sig.tail)


def test_jsd_limits_are_forward_and_reverse_kl_and_half_is_symmetric():
    z, t, mask = make_case(5)
    s, q = torch.log_softmax(z.float() / 2, -1), torch.log_softmax(t.float() / 2, -1)
    assert torch.equal(divergences.jsd(s, q, beta=0.0), divergences.forward_kl(s, q))
    assert torch.equal(divergences.jsd(s, q, beta=1.0), divergences.reverse_kl(s, q))
    torch.testing.assert_close(divergences.jsd(s, q, beta=0.5), divergences.jsd(q, s, beta=0.5), rtol=1e-5, atol=1e-6)
    assert (divergences.jsd(s, q, beta=0.5) <= math.log(2) + 1e-6).all()
    assert torch.equal(divergences.skew_kl(s, q, alpha=0.0), divergences.forward_kl(s, q))
    assert torch.equal(divergences.skew_reverse_kl(s, q, alpha=0.0), divergences.reverse_kl(s, q))


@pytest.mark.parametrize("kind,opts", KINDS)
def test_chunked_equals_unchunked_and_micro_batches_add_up(kind, opts):
    z, t, mask = make_case(6, N=20)
    sig = signal_for("topk", t, 8)
    term = [Term(kind, kind, 1.0, opts)]
    whole, g_whole = chunked(z, sig, term, mask, 2.0, chunk=20)
    small, g_small = chunked(z, sig, term, mask, 2.0, chunk=3)
    torch.testing.assert_close(small, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_small, g_whole, rtol=1e-5, atol=1e-7)
    # two micro-batches: their sums over the global count equal the whole batch's mean
    halves = [
        chunked(z[a:b], TopK(sig.ids[a:b], sig.logprobs[a:b], "bucket"), term, mask[a:b], 2.0)[0]
        for a, b in ((0, 7), (7, 20))
    ]
    n = int(mask.sum())
    torch.testing.assert_close((halves[0] + halves[1])[0] / n, whole[0] / n, rtol=1e-5, atol=1e-7)


def test_fused_forward_kl_equals_the_chunked_autograd_path():
    """The analytic forward-KL path and the generic chunked path agree in value and gradient (CE + KD, bucket and
    renormalize, T != 1, dense teacher)."""
    z, t, mask = make_case(8)
    targets = torch.randint(0, 37, (len(z),), generator=torch.Generator().manual_seed(0))
    terms = [Term("ce", "ce", 0.3), Term("kd", "forward_kl", 0.7)]
    for sig in (signal_for("topk", t, 8, "bucket"), signal_for("topk", t, 8, "renormalize"), Online(t.float())):
        out = []
        for fused in (True, False):
            zz = z.float().clone().requires_grad_(True)
            total, sums = logit_term_sums(zz, targets, mask, mask, sig, terms, [0.3, 0.7], 2.0, 5, fused=fused)
            total.backward()
            out.append((total.detach(), sums, zz.grad))
        torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[0][2], out[1][2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_fused_mapped_forward_kl_equals_the_chunked_autograd_path(T):
    """Across tokenizers: unmapped teacher ids (-1) and KD counted at the aligned positions only (kd_mask), CE at
    every position; the analytic path equals autograd through kd.signals.Mapped in value and gradient."""
    z, t, mask = make_case(8)
    mask = mask.clone()
    mask[-2:] = False  # positions no term counts
    g = torch.Generator().manual_seed(1)
    lp, ids = torch.log_softmax(t, -1).float().topk(8, -1)
    ids = torch.where(torch.rand(ids.shape, generator=g) < 0.3, -1, ids)
    ids[:3, 0] = -1  # a teacher whose top token has no student token: top-1 never agrees there
    kd_mask = mask & (torch.rand(len(z), generator=g) < 0.6)
    targets = torch.randint(0, 37, (len(z),), generator=g)
    terms = [Term("ce", "ce", 0.3), Term("kd", "forward_kl", 0.7)]
    out = []
    for fused in (True, False):
        zz = z.float().clone().requires_grad_(True)
        total, sums = logit_term_sums(zz, targets, mask, kd_mask, Mapped(ids, lp), terms, [0.3, 0.7], T, 5, fused=fused)
        total.backward()
        out.append((total.detach(), sums, zz.grad))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0][2], out[1][2], rtol=1e-4, atol=1e-6)
    assert torch.isfinite(out[0][2]).all() and (out[0][2][~(mask | kd_mask)] == 0).all()


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_k_equal_v_is_the_exact_kl_for_both_tail_policies(tail, T):
    """Issue 12's bug: with k = V both policies equal T^2 * KL(teacher_T || student_T) at every temperature, in the
    reference and in the fused path (before the fix, bucket at T = 4 was off by up to 8 nats)."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(64, 4, generator=g) * 3
    lp, ids = torch.log_softmax(teacher, -1).topk(4, -1)
    for student in (teacher.clone(), torch.randn(64, 4, generator=g) * 3):
        exact = (
            torch.nn.functional.kl_div(
                torch.log_softmax(student / T, -1),
                torch.log_softmax(teacher / T, -1),
                log_target=True,
                reduction="none",
            ).sum(-1)
            * T
            * T
        )
        got = sparse_kd_per_position(student, ids, lp, T, tail)
        torch.testing.assert_close(got, exact, rtol=1e-4, atol=2e-5)
        mask = torch.ones(64, dtype=torch.bool)
        _, (_, kd, _) = fused_ce_kd(student, torch.zeros(64, dtype=torch.long), ids, lp, mask, 0.0, 1.0, T, tail, 16)
        torch.testing.assert_close(kd, exact.sum(), rtol=1e-4, atol=1e-3)


def test_a_non_finite_logit_at_an_ignored_position_leaves_the_gradient_finite():
    z, t, mask = make_case(9)
    z = z.float()
    z[~mask] = float("nan")
    mask_ignored = ~mask
    assert mask_ignored.any()
    sig = signal_for("topk", t, 8)
    for fused in (True, False):
        for terms in ([Term("ce", "ce", 0.5), Term("kd", "forward_kl", 0.5)], [Term("r", "reverse_kl", 1.0)]):
            zz = z.clone().requires_grad_(True)
            total, sums = logit_term_sums(
                zz,
                torch.zeros(len(z), dtype=torch.long),
                mask,
                mask,
                sig,
                terms,
                [t_.weight for t_ in terms],
                2.0,
                4,
                fused=fused,
            )
            total.backward()
            assert torch.isfinite(total) and torch.isfinite(zz.grad).all(), (fused, terms)
            assert (zz.grad[mask_ignored] == 0).all()


def test_sampled_targets_refuse_biased_kinds_and_mapped_targets_work():
    LossConfig(target="sampled", terms=[{"kind": "forward_kl", "weight": 1.0}])
    for kind in ("reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"):
        with pytest.raises(KDError, match="biased"):
            LossConfig(target="sampled", terms=[{"kind": kind, "weight": 1.0}])
    # cross-tokenizer: unmapped entries are inert, the rest of the mass is one bucket
    z, t, mask = make_case(10)
    lp, tid = torch.log_softmax(t, -1).float().topk(8, -1)
    mapped = torch.where(tid % 3 == 0, torch.full_like(tid, -1), tid)
    for kind, opts in KINDS:
        sums, grad = chunked(z, Mapped(mapped, lp), [Term(kind, kind, 1.0, opts)], mask, 1.0)
        assert torch.isfinite(sums).all() and torch.isfinite(grad).all() and float(sums[0]) >= 0


def test_registry_and_term_list_reject_bad_input_clearly():
    with pytest.raises(KDError, match="unknown loss kind 'kl'"):
        parse_terms([{"kind": "kl"}])
    with pytest.raises(KDError, match=r"loss.terms\[0\]: divergence jsd: option beta must be a number in \[0, 1\]"):
        parse_terms([{"kind": "jsd", "beta": 1.5}])
    with pytest.raises(KDError, match="no option"):
        parse_terms([{"kind": "tvd", "beta": 0.5}])
    with pytest.raises(KDError, match="alpha must be a number in"):
        parse_terms([{"kind": "skew_kl", "alpha": 1.0}])
    with pytest.raises(KDError, match="weight must be a number >= 0"):
        parse_terms([{"kind": "ce", "weight": -1}])
    with pytest.raises(KDError, match="more than once"):
        parse_terms([{"kind": "forward_kl"}, {"kind": "forward_kl", "weight": 0.5}])
    with pytest.raises(KDError, match="every weight is 0"):
        parse_terms([{"kind": "ce", "weight": 0}])
    with pytest.raises(KDError, match="non-empty list"):
        parse_terms([])
    terms = parse_terms(
        [
            {"kind": "ce", "weight": 0.5},
            {"kind": "forward_kl", "weight": 0.25},
            {"kind": "reverse_kl", "weight": 0.25, "name": "rkl"},
            {"kind": "jsd"},
        ]
    )
    assert [t.name for t in terms] == ["ce", "forward_kl", "rkl", "jsd"] and terms[3].options == {"beta": 0.5}


def test_every_target_is_listed_and_configurable():
    """The teacher signals a run trains against (kd.signals.TARGETS) are exactly loss.target's choices; each is run
    against the float64 reference above (topk, sampled, online) and end to end in tests/test_train.py."""
    import typing

    from kd.signals import TARGETS

    assert (
        set(typing.get_args(typing.get_type_hints(LossConfig)["target"]))
        == set(TARGETS)
        == {
            "topk",
            "sampled",
            "online",
        }
    )
