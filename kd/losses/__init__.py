"""Distillation losses: pure fp32 functions returning sums (the caller divides once by the global count).

divergences.py  the divergences between two distributions over the same outcomes, and their registry
forward.py      forward KL against sparse (top-k / sampled) and dense teachers: references + the fused path
terms.py        the loss as a weighted list of terms; the chunked pass over the logit-level ones
features.py     hidden-state distance and InfoNCE
"""

from kd.losses.features import feature_per_position, info_nce_sum
from kd.losses.forward import TAIL_FLOOR, TAIL_POLICIES, TailPolicy, fused_ce_kd, sparse_kd_per_position, token_losses
from kd.losses.terms import cross_kd_per_position, logit_term_sums

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
