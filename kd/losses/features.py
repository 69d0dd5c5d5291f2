"""Hidden-state terms: a scale-free distance between projected student states and cached teacher states, and an
InfoNCE term over the positions of a micro-batch. Pure fp32 functions returning per-position values or sums."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def feature_per_position(
    student: torch.Tensor, teacher: torch.Tensor, kind: Literal["cosine", "normalized_mse"]
) -> torch.Tensor:
    """Scale-free distance per position between projected student states [N, H] and teacher states [N, H].

    cosine: 1 - cos(student, teacher), in [0, 2]. normalized_mse: mean squared difference after normalising
    each token's vector to zero mean and unit variance (layer norm without affine), so it cannot explode with
    the teacher's activation scale (late layers of LLMs have outlier dimensions in the hundreds).
    """
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-6)
    if kind == "normalized_mse":
        return (F.layer_norm(s, s.shape[-1:]) - F.layer_norm(t, t.shape[-1:])).pow(2).mean(-1)
    raise ValueError(f"unknown feature loss {kind!r}")


def info_nce_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Contrastive (InfoNCE) loss summed over M positions: each projected student state [M, H] must pick its own
    teacher state among the M teacher states of the same batch. Cosine similarities divided by `temperature`."""
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    logits = s @ t.T / temperature
    return F.cross_entropy(logits, torch.arange(len(s), device=s.device), reduction="sum")
