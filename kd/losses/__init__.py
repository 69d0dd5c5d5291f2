"""Distillation losses: pure fp32 functions returning sums (the caller divides once by the global count).

divergences.py  the divergences between two distributions over the same outcomes, and their registry
chunked.py      the two drivers of a per-chunk loss: over given logits, or over the LM head's input with the head
                applied per chunk (the student's logits never exist whole)
forward.py      forward KL's tail rules and its analytic-gradient chunk function (sparse, dense and mapped teachers)
terms.py        the loss as a weighted list of terms; the chunk functions of the logit-level ones; the
                per-position references (sparse and cross-tokenizer KD, token_losses) on the same signals
features.py     hidden-state distance and InfoNCE

This package's namespace holds the pure functions only: terms.py sits above the teacher signals (kd/signals.py),
which use divergences.py and forward.py, so it is imported as kd.losses.terms, never from here.
"""

from kd.losses.features import feature_per_position, info_nce_sum
from kd.losses.forward import fused_ce_kd

__all__ = [
    "feature_per_position",
    "fused_ce_kd",
    "info_nce_sum",
]
