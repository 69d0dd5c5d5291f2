"""Property tests of the pure loss functions and the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd.losses import divergences, feature_per_position, info_nce_sum
from kd.losses.terms import Term, logit_term_sums, sparse_kd_per_position, token_losses
from kd.schedule import lr_at
from kd.signals import TopK


def teacher_topk(logits: torch.Tensor, k: int):
    lp = torch.log_softmax(logits.double(), -1)
    v, i = lp.topk(k, -1)
    return i, v.float()


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 50, generator=g) * 3, torch.randn(12, 50, generator=g) * 3


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_kd_is_zero_for_identical_distributions(logits, tail):
    s, _ = logits
    ids, lp = teacher_topk(s, 50)  # k = V
    kd = sparse_kd_per_position(s, ids, lp, 1.0, tail)
    assert kd.abs().max() < 1e-5


@pytest.mark.parametrize("tail, T", [("renormalize", 1.0), ("renormalize", 2.5), ("bucket", 1.0)])
def test_kd_with_k_equal_v_equals_dense_kl_div(logits, tail, T):
    s, t = logits
    ids, lp = teacher_topk(t, 50)
    dense = (
        F.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1)
        * T
        * T
    )
    torch.testing.assert_close(sparse_kd_per_position(s, ids, lp, T, tail), dense, atol=1e-4, rtol=1e-4)


def test_bucket_equals_dense_kl_of_bucketed_distributions(logits):
    s, t = logits
    k = 5
    ids, lp = teacher_topk(t, k)
    p_t, p_s = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    q = torch.cat([p_t.gather(-1, ids), 1 - p_t.gather(-1, ids).sum(-1, keepdim=True)], -1)
    p = torch.cat([p_s.gather(-1, ids), 1 - p_s.gather(-1, ids).sum(-1, keepdim=True)], -1)
    ref = (q * (q.log() - p.log())).sum(-1)
    torch.testing.assert_close(sparse_kd_per_position(s, ids, lp, 1.0, "bucket").double(), ref, atol=1e-4, rtol=1e-4)


def test_renormalize_equals_kl_to_renormalised_teacher_with_full_student(logits):
    s, t = logits
    k = 7
    ids, lp = teacher_topk(t, k)
    q = torch.softmax(lp.double(), -1)
    ref = (q * (q.log() - torch.log_softmax(s.double(), -1).gather(-1, ids))).sum(-1)
    torch.testing.assert_close(
        sparse_kd_per_position(s, ids, lp, 1.0, "renormalize").double(), ref, atol=1e-5, rtol=1e-5
    )
    assert (ref >= 0).all()


def test_temperature_squared_factor(logits):
    s, t = logits
    ids, lp = teacher_topk(t, 50)
    a = sparse_kd_per_position(s, ids, lp, 2.0, "renormalize")
    b = F.kl_div(torch.log_softmax(s / 2, -1), torch.log_softmax(t / 2, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(a, 4 * b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_chunked_equals_unchunked_values_and_gradients(tail):
    g = torch.Generator().manual_seed(1)
    N, V, k = 37, 64, 8
    t = torch.randn(N, V, generator=g)
    ids, lp = teacher_topk(t, k)
    targets = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.3
    s1 = (torch.randn(N, V, generator=g) * 2).requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    full = token_losses(s1, targets, ids, lp.half(), mask, 1.5, tail)
    # the chunked pass training (autograd path) and eval (no gradient) use, 10 positions at a time
    terms = [Term("ce", "ce", 1.0), Term("kd", "forward_kl", 1.0)]
    signal = TopK(ids, lp.half(), tail)
    total, chunked = logit_term_sums(s2, targets, mask, mask, signal, terms, [1.0, 1.0], 1.5, 10, fused=False)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-4)
    _, no_grad = logit_term_sums(s2.detach(), targets, mask, mask, signal, terms, [1.0, 1.0], 1.5, 10, with_grad=False)
    torch.testing.assert_close(no_grad, full.detach(), rtol=1e-5, atol=1e-4)
    (full[0] + full[1]).backward()
    total.backward()
    torch.testing.assert_close(s2.grad, s1.grad)


def test_ce_alone_reads_no_teacher_and_equals_cross_entropy():
    """A training plan of CE alone (kd.train_config.LossConfig.trained_terms drops the weight-0 KD term) passes no
    teacher signal: its analytic chunk path gives F.cross_entropy's value and gradient, and zero gradient at masked
    positions even where their logits are not finite."""
    g = torch.Generator().manual_seed(3)
    N, V = 23, 50
    targets = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.3
    s1 = (torch.randn(N, V, generator=g) * 2).requires_grad_()
    s2 = s1.detach().clone()
    s2[~mask] = float("nan")
    s2.requires_grad_()
    F.cross_entropy(s1[mask], targets[mask], reduction="sum").mul(0.7).backward()
    terms = [Term("ce", "ce", 1.0)]
    total, sums = logit_term_sums(s2, targets, mask, mask, None, terms, [0.7], 1.0, 8)
    total.backward()
    torch.testing.assert_close(sums[0], F.cross_entropy(s1[mask], targets[mask], reduction="sum").detach())
    assert sums[1] == 0  # no teacher: no agreement counted
    torch.testing.assert_close(s2.grad[mask], s1.grad[mask])
    assert (s2.grad[~mask] == 0).all()
    _, no_grad = logit_term_sums(s2.detach(), targets, mask, mask, None, terms, [0.7], 1.0, 8, with_grad=False)
    torch.testing.assert_close(no_grad, sums)


def test_token_losses_ce_matches_cross_entropy_and_masks():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(10, 30, generator=g)
    targets = torch.randint(0, 30, (10,), generator=g)
    mask = torch.tensor([True] * 6 + [False] * 4)
    ids, lp = teacher_topk(torch.randn(10, 30, generator=g), 4)
    ce, kd, agree = token_losses(s, targets, ids, lp, mask, 1.0, "bucket")
    torch.testing.assert_close(ce, F.cross_entropy(s[:6], targets[:6], reduction="sum"))
    assert agree == (s[:6].argmax(-1) == ids[:6, 0]).sum()
    # a NaN in a masked-out position does not leak into the sums
    lp_nan = lp.clone()
    lp_nan[8] = float("nan")
    assert torch.isfinite(token_losses(s, targets, ids, lp_nan, mask, 1.0, "bucket")).all()


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_nan_teacher_is_never_hidden(logits, tail):
    s, t = logits
    ids, lp = teacher_topk(t, 5)
    lp[3] = float("nan")
    kd = sparse_kd_per_position(s, ids, lp, 1.0, tail)
    assert torch.isnan(kd[3]) and torch.isfinite(kd[torch.arange(12) != 3]).all()


def test_feature_losses_are_scale_free():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(20, 16, generator=g), torch.randn(20, 16, generator=g)
    for kind in ("cosine", "normalized_mse"):
        assert feature_per_position(a, a, kind).abs().max() < 1e-5
        torch.testing.assert_close(
            feature_per_position(a, 100 * b, kind), feature_per_position(a, b, kind), atol=1e-4, rtol=1e-4
        )
    assert (feature_per_position(a, b, "cosine") <= 2).all()


def test_info_nce_prefers_matching_pairs():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 16, generator=g)
    matched = info_nce_sum(x, x, 0.1) / 32
    shuffled = info_nce_sum(x, x[torch.randperm(32, generator=g)], 0.1) / 32
    assert matched < 0.1 < math.log(32) < shuffled


# ---- LR schedule: closed forms, in optimizer steps ----


def test_cosine_closed_form():
    kw = dict(schedule="cosine", lr=1e-3, min_lr=1e-4, warmup_steps=4, total_steps=20)
    assert [lr_at(s, **kw) for s in (1, 2, 4)] == pytest.approx([2.5e-4, 5e-4, 1e-3])
    for s in range(5, 21):
        expected = 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 16))
        assert lr_at(s, **kw) == pytest.approx(expected)
    lrs = [lr_at(s, **kw) for s in range(1, 21)]
    assert min(lrs) > 0 and lrs[-1] == pytest.approx(1e-4) and min(lrs[:-1]) > 1e-4


def test_linear_and_constant_closed_forms():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=2, total_steps=12)
    assert [lr_at(s, schedule="linear", **kw) for s in (1, 2, 7, 12)] == pytest.approx([0.5, 1.0, 0.55, 0.1])
    assert [lr_at(s, schedule="constant", **kw) for s in (1, 2, 3, 12)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(1, schedule="cosine_with_restarts", **kw)
    with pytest.raises(ValueError, match="outside"):
        lr_at(13, schedule="linear", **kw)


@pytest.mark.parametrize("tail, T", [("renormalize", 1.0), ("renormalize", 2.0), ("bucket", 1.0), ("bucket", 2.0)])
def test_fused_training_loss_equals_reference_values_and_gradients(tail, T):
    from kd.losses import fused_ce_kd

    g = torch.Generator().manual_seed(5)
    N, V, k = 29, 80, 6
    ids, lp = teacher_topk(torch.randn(N, V, generator=g) * 2, k)
    targets = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.25
    s1 = (torch.randn(N, V, generator=g) * 2).requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    ref = token_losses(s1, targets, ids, lp.half(), mask, T, tail)
    (0.3 * ref[0] + 0.7 * ref[1]).mul(1.7).backward()
    total, sums = fused_ce_kd(s2, targets, ids, lp.half(), mask, 0.3, 0.7, T, tail, chunk=8)
    (total * 1.7).backward()
    torch.testing.assert_close(sums, ref.detach())
    torch.testing.assert_close(total, 0.3 * ref[0] + 0.7 * ref[1])
    torch.testing.assert_close(s2.grad, s1.grad, atol=1e-6, rtol=1e-5)
    assert (s2.grad[~mask] == 0).all()


def test_fused_loss_keeps_nan_visible():
    from kd.losses import fused_ce_kd

    s = torch.randn(4, 20, requires_grad=True)
    ids, lp = teacher_topk(torch.randn(4, 20), 3)
    lp[1] = float("nan")
    total, sums = fused_ce_kd(
        s, torch.zeros(4, dtype=torch.long), ids, lp, torch.ones(4, dtype=torch.bool), 0.5, 0.5, 1.0, "bucket", 2
    )
    assert torch.isnan(total) and torch.isnan(sums[1]) and torch.isfinite(sums[0])


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_fused_dense_teacher_equals_kl_div(T):
    from kd.losses import fused_ce_kd

    g = torch.Generator().manual_seed(6)
    N, V = 21, 40
    t = torch.randn(N, V, generator=g) * 2
    targets = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.25
    s1 = (torch.randn(N, V, generator=g) * 2).requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    kl = (
        F.kl_div(
            torch.log_softmax(s1[mask] / T, -1), torch.log_softmax(t[mask] / T, -1), log_target=True, reduction="sum"
        )
        * T
        * T
    )
    ce = F.cross_entropy(s1[mask], targets[mask], reduction="sum")
    (0.4 * ce + 0.6 * kl).backward()
    total, sums = fused_ce_kd(s2, targets, None, t, mask, 0.4, 0.6, T, "bucket", chunk=8)
    total.backward()
    torch.testing.assert_close(sums[:2], torch.stack([ce, kl]).detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(s2.grad, s1.grad, atol=1e-6, rtol=1e-5)


def test_sampled_targets_as_renormalized_counts():
    """Sampled targets enter as log(count / n) with -inf padding: KD = KL(empirical || student), padding inert."""
    from kd.losses import fused_ce_kd

    g = torch.Generator().manual_seed(7)
    s1 = torch.randn(3, 10, generator=g).requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    ids = torch.tensor([[4, 1, 0, 0], [2, 0, 0, 0], [7, 3, 5, 0]])
    counts = torch.tensor([[3, 2, 0, 0], [5, 0, 0, 0], [2, 2, 1, 0]])
    lp = torch.log(counts / 5)
    q = torch.zeros(3, 10).scatter_add_(1, ids, counts / 5)
    ref = (torch.where(q > 0, q * (q.log() - torch.log_softmax(s1, -1)), torch.zeros_like(q))).sum()
    ref.backward()
    total, sums = fused_ce_kd(
        s2,
        torch.zeros(3, dtype=torch.long),
        ids,
        lp,
        torch.ones(3, dtype=torch.bool),
        0.0,
        1.0,
        1.0,
        "renormalize",
        chunk=2,
    )
    total.backward()
    torch.testing.assert_close(sums[1], ref.detach())
    torch.testing.assert_close(s2.grad, s1.grad)


# every entry of the term-kind registry, with where it is checked beyond the property below (a new kind fails
# test_every_term_kind_is_listed until it is listed here and tested)
TESTED_TERM_KINDS = {
    "ce": "test_token_losses_ce_matches_cross_entropy_and_masks, test_fused_training_loss_equals_reference_values_...",
    "uld": "tests/test_cross_tokenizer.py (cross_kd_per_position, the uld kind end to end)",
    # every divergence is a term kind; tests/test_divergences.py builds its cases from the divergence registry
    **{name: "tests/test_divergences.py (float64 reference, chunked, fused)" for name in divergences.REGISTRY},
    "feature": "test_feature_losses_are_scale_free, test_cosine_closed_form",
    "contrastive": "test_info_nce_prefers_matching_pairs",
}


def test_every_term_kind_is_listed():
    from kd.losses.terms import KINDS

    assert set(KINDS) == set(TESTED_TERM_KINDS)


@pytest.mark.parametrize("kind", sorted(TESTED_TERM_KINDS))
def test_each_term_kind_is_zero_where_the_student_is_the_teacher_and_positive_elsewhere(kind):
    """Through the registry entry itself: a logit kind on one chunk (kd.losses.terms.ChunkTerms) with the teacher's
    full distribution cached as its top-k at k = V (ce: the data's targets, the teacher's argmax); a hidden kind on
    the projected states. Zero (up to rounding) when the student equals the teacher, finite and > 0 otherwise."""
    from kd.losses.terms import KINDS, ChunkTerms, parse_terms
    from kd.signals import Mapped, TopK

    torch.manual_seed(0)
    (term,) = parse_terms([{"kind": kind, "weight": 1.0}])
    entry = KINDS[kind]
    N, V = 6, 11
    mask = torch.ones(N, dtype=torch.bool)
    if entry.level == "logit":
        teacher = torch.randn(N, V) * 2
        lp, ids = torch.log_softmax(teacher, -1).topk(V, -1)
        signal = Mapped(ids, lp) if kind == "uld" else TopK(ids, lp, "bucket")
        targets = teacher.argmax(-1)
        values = {}
        for name, z in (("same", teacher.clone()), ("other", torch.randn(N, V) * 2)):
            chunk = ChunkTerms(z, slice(None), targets, mask, mask, signal, 1.0)
            v, m = entry.chunk(chunk, term)
            values[name] = v[m]
        if kind == "ce":  # CE is the teacher's own entropy-like loss at its argmax: smaller for the teacher itself
            assert (values["same"] >= 0).all() and values["same"].sum() < values["other"].sum()
            return
    else:
        h = torch.randn(N, 8)
        con_idx = torch.arange(N)
        values = {
            "same": entry.hidden_sum(h, h.clone(), term, mask, con_idx).reshape(1),
            "other": entry.hidden_sum(h, torch.randn(N, 8), term, mask, con_idx).reshape(1),
        }
        if kind == "contrastive":  # InfoNCE is not 0 at a match: it prefers the matching pairs
            assert values["same"].sum() < values["other"].sum()
            return
    assert torch.isfinite(values["other"]).all() and values["other"].sum() > 1e-3
    torch.testing.assert_close(values["same"], torch.zeros_like(values["same"]), atol=1e-5, rtol=0)
