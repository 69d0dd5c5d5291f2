"""Distillation losses: pure fp32 functions returning sums (the caller divides once by the global count).

divergences.py  the divergences between two distributions over the same outcomes, and their registry
chunked.py      the two drivers of a per-chunk loss: over given logits, or over the LM head's input with the head
                applied per chunk (the student's logits never exist whole)
forward.py      forward KL's tail rules and its analytic-gradient chunk function (sparse, dense and mapped teachers)
terms.py        the loss as a weighted list of terms; the chunk functions of the logit-level ones; the
                per-position references (sparse and cross-tokenizer KD, token_losses) on the same signals
features.py     hidden-state distance and InfoNCE
"""

from kd.losses.features import feature_per_position, info_nce_sum
from kd.losses.forward import TAIL_FLOOR, TAIL_POLICIES, TailPolicy, fused_ce_kd
from kd.losses.terms import cross_kd_per_position, logit_term_sums, sparse_kd_per_position, token_losses

__all__ = [
    "TAIL_FLOOR",
    "TAIL_POLICIES",
    "TailPolicy",
    "cross_kd_per_position",
    "feature_per_position",
    "fused_ce_kd",
    "info_nce_sum",
    "logit_term_sums",
    "sparse_kd_per_position",
    "token_losses",
]
