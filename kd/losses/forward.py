"""Forward KL: the tail rules of a sparse (top-k) teacher and the fused analytic-gradient path. The per-position
references (sparse_kd_per_position, token_losses) live in kd/losses/terms.py, on the same signals training uses.

Distillation losses as pure functions: fp32 inside, each returns a SUM over positions (the caller divides
once by the global count of the accumulation window; see kd/train/step.py).

Shapes: N positions (flattened batch x time), V student vocabulary, k cached teacher entries, H hidden size.
`mask` [N] bool selects the positions that count (those with a next token inside the window).

KD against a sparse (top-k) teacher needs a policy for the probability mass outside the top-k, the "tail":
    renormalize: q = softmax(teacher_topk_logprobs / T) over the k cached tokens; the student keeps its full
                 softmax, so mass it puts outside the top-k is penalised: sum_i q_i (log q_i - log p_i) >= 0.
    bucket:      the tail is one extra (k+1-th) outcome. Teacher: [top-k log-probs, log(1 - sum top-k probs)],
                 exact at T = 1 because the cache stores log-probs under the full softmax. Student: its top-k
                 log-probs at the same ids and log(1 - their total). At T != 1 the teacher's k+1 log-probs are
                 divided by T and renormalised (the tail is treated as one token, since its inner shape is not
                 cached); the student's distribution is its exact full softmax at T, then bucketed. A teacher
                 tail below TAIL_FLOOR (2^-20) is fp32 rounding, not mass, and counts as 0, so with k = V both
                 policies equal the exact T^2 KL at every T.
KD is multiplied by T^2 (Hinton et al. 2015), so its gradient scale does not shrink as T grows and alpha_kd
means the same thing at every temperature.
"""

from __future__ import annotations

import torch

from kd.losses.chunked import logits_chunked
from kd.signals import MIN_TAIL, TAIL_POLICIES, TailPolicy, gather_mapped, teacher_bucket


def _dense_chunk(z, teacher_logits, tgt, m, alpha_ce: float, alpha_kd: float, T: float):
    """Full-vocabulary teacher (online KD): gradient alpha_ce (p1 - onehot) + alpha_kd T (p - q), q = softmax(t / T)."""
    logp = torch.log_softmax(z, dim=-1)
    logp_t = logp if T == 1.0 else torch.log_softmax(z / T, dim=-1)
    q_logp = torch.log_softmax(teacher_logits / T, dim=-1)
    q = q_logp.exp()
    kd = torch.where(q == 0, torch.zeros_like(q), q * (q_logp - logp_t)).sum(-1) * (T * T)
    ce = -logp.gather(-1, tgt[:, None]).squeeze(-1)
    agree = (z.argmax(-1) == teacher_logits.argmax(-1)).float()
    keep = m.float()[:, None]
    g = (alpha_ce * keep) * logp.exp() + (alpha_kd * T * keep) * (logp_t.exp() - q)
    g.scatter_add_(-1, tgt[:, None], -alpha_ce * keep)
    return torch.where(m[:, None], g, torch.zeros_like(g)), ce, kd, agree


def ce_kd_chunk(
    z, tgt, m, ids, t_values, alpha_ce: float, alpha_kd: float, T: float, tail: str, m_kd=None, unmapped_ids=False
):
    """One chunk of the analytic path: (the gradient of alpha_ce * CE + alpha_kd * KD summed over the chunk's
    masked rows w.r.t. its fp32 logits z [c, V], written over the chunk's softmax buffer; [CE, KD, top-1] sums [3]).

    ids [c, k] and t_values [c, k]: the cached top-k ids and log-probs, or ids None and t_values the teacher's full
    logits [c, V] (online KD). An id of -1 (a cross-tokenizer teacher token with no identical student token,
    kd.signals.Mapped; `unmapped_ids` says the ids may hold one) is no outcome on either side: its teacher mass joins
    the tail bucket (kd.signals.gather_mapped). m [c] bool: where CE
    counts; m_kd: where KD and top-1 agreement count (default m; the aligned positions across tokenizers); tgt [c]
    next-token ids (>= 0). Gradients (p = softmax(z / T), q = the
    teacher; equality with autograd through `token_losses` is tested):
      CE:                    p1 - onehot(target)                       (p1 = softmax(z))
      KD, renormalize:       T (p - q)                                 (q zero outside the top-k)
      KD, bucket:            T (p a) + T (r p - q) on the top-k ids    where S = sum_topk p, r = q_tail / (1 - S)
                             and a = (1 - q_tail) - r S; r = 0 where 1 - S is clamped, as autograd of the reference.
    """
    # Few passes over the [c, V] block (they dominate the cost): one log-softmax, an in-place exp, one in-place
    # multiply with per-row coefficients (masking folded in), and [c, k]-sized corrections scattered onto the top-k
    # ids and the target.
    m_kd = m if m_kd is None else m_kd
    if t_values is None:  # no teacher (a run training CE alone): the CE gradient, one log-softmax and one exp
        logp = torch.log_softmax(z, dim=-1)
        ce = -logp.gather(-1, tgt[:, None]).squeeze(-1)
        keep = m.float()
        g = logp.exp_().mul_((alpha_ce * keep)[:, None])
        g.scatter_add_(-1, tgt[:, None], (-alpha_ce * keep)[:, None])
        if not bool(m.all()):  # a non-finite logit at an ignored position would leave 0 * NaN = NaN there
            g[~m] = 0
        kd = agree = torch.zeros_like(ce)
    elif ids is None:
        g, ce, kd, agree = _dense_chunk(z, t_values.float(), tgt, m, alpha_ce, alpha_kd, T)
    else:
        t_lp = t_values.float()
        logp = torch.log_softmax(z, dim=-1)
        ce = -logp.gather(-1, tgt[:, None]).squeeze(-1)
        agree = (logp.argmax(-1) == ids[:, 0]).float()  # an unmapped top-1 (-1) never agrees
        p_t = None if T == 1.0 else torch.log_softmax(z / T, dim=-1)
        s_logp = logp if p_t is None else p_t
        if unmapped_ids:
            s_top, t_lp = gather_mapped(s_logp, ids, t_lp)
            ids = ids.clamp(min=0)  # the corrections scattered there are 0 (both probabilities are)
        else:
            s_top = s_logp.gather(-1, ids)
        if p_t is not None:
            p_t = p_t.exp_()
        p1 = logp.exp_()  # softmax at T = 1, in place: logp is not needed any more
        if tail == "renormalize":
            q_logp = torch.log_softmax(t_lp / T, dim=-1)
            q_top = q_logp.exp()
            kd = torch.where(q_top == 0, torch.zeros_like(q_top), q_top * (q_logp - s_top)).sum(-1) * (T * T)
            coef_kd = torch.full_like(kd, T)
            top_corr = -T * q_top
        elif tail == "bucket":
            q_logp = teacher_bucket(t_lp, T)
            q = q_logp.exp()
            p_top = s_top.exp()
            S = p_top.sum(-1, keepdim=True, dtype=torch.float64)
            p_tail_raw = (1.0 - S).float()  # fp64 difference: 1 - S cancels when S is near 1
            S = S.float()
            p_tail = p_tail_raw.clamp(min=MIN_TAIL)
            s_b = torch.cat([s_top, p_tail.log()], dim=-1)
            kd = torch.where(q == 0, torch.zeros_like(q), q * (q_logp - s_b)).sum(-1) * (T * T)
            q_top, q_tail = q[:, :-1], q[:, -1:]
            r = torch.where(p_tail_raw > MIN_TAIL, q_tail / p_tail, torch.zeros_like(q_tail))
            coef_kd = (T * ((1.0 - q_tail) - r * S)).squeeze(-1)
            top_corr = T * (r * p_top - q_top)  # 0 at unmapped entries: both of their probabilities are 0
        else:
            raise ValueError(f"unknown tail policy {tail!r}; expected one of {TAIL_POLICIES}")
        keep = m.float()
        # rows outside a term's mask get exactly zero gradient from it, even where their teacher values are NaN
        coef_kd = torch.where(m_kd, coef_kd, torch.zeros_like(coef_kd))
        top_corr = torch.where(m_kd[:, None], top_corr, torch.zeros_like(top_corr))
        if p_t is None:
            g = p1.mul_((alpha_ce * keep + alpha_kd * coef_kd)[:, None])
        else:
            g = p1.mul_((alpha_ce * keep)[:, None]).add_(p_t.mul_((alpha_kd * coef_kd)[:, None]))
        g.scatter_add_(-1, ids, alpha_kd * top_corr)
        g.scatter_add_(-1, tgt[:, None], (-alpha_ce * keep)[:, None])
        counted = m | m_kd
        if not bool(counted.all()):  # a non-finite logit at an ignored position would leave 0 * NaN = NaN there
            g[~counted] = 0
    zero = torch.zeros_like(ce)
    sums = torch.stack(
        [torch.where(m, ce, zero).sum(), torch.where(m_kd, kd, zero).sum(), torch.where(m_kd, agree, zero).sum()]
    )
    return g, sums


def fused_ce_kd(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    alpha_ce: float,
    alpha_kd: float,
    temperature: float,
    tail: TailPolicy,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training form of `token_losses`: (alpha_ce * CE_sum + alpha_kd * KD_sum with gradient, [CE, KD, top-1]
    sums without). Same shapes and values as `token_losses`; the gradient w.r.t. the logits is analytic
    (`ce_kd_chunk`), computed in the same chunked pass and stored as ONE logits-sized buffer, so backward is a
    multiply. (kd.losses.terms runs the same chunk function with the LM head inside, where neither buffer exists.)

    topk_ids=None means a dense teacher: topk_logprobs then holds the teacher's full logits [N, V] (online KD),
    and KD is the exact full-vocabulary KL."""
    T = float(temperature)

    def fn(z, rows):
        ids = None if topk_ids is None else topk_ids[rows]
        return ce_kd_chunk(
            z, targets[rows].clamp(min=0), mask[rows], ids, topk_logprobs[rows], alpha_ce, alpha_kd, T, tail
        )

    return logits_chunked(student_logits, fn, [float(alpha_ce), float(alpha_kd)], chunk)
