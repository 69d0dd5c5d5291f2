"""The trained module: the student LM plus its feature projectors."""

from __future__ import annotations

import torch
from torch import nn


class DistillModel(nn.Module):
    """The student LM plus one linear projector (student hidden -> teacher hidden) per mapped layer pair.

    One module, so one `accelerator.prepare`, one optimizer and one checkpoint hold everything trained, and
    under DDP/FSDP every trained parameter is used inside `forward`.
    """

    def __init__(self, lm: nn.Module, feature_pairs: list[tuple[int, int]], teacher_hidden: int):
        super().__init__()
        self.lm = lm
        self.feature_pairs = [tuple(p) for p in feature_pairs]
        student_hidden = lm.config.hidden_size
        self.projectors = nn.ModuleList(nn.Linear(student_hidden, teacher_hidden, bias=False) for _ in feature_pairs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_features: bool = False):
        """-> (logits [B, T, V], list of projected student states [B, T, H_teacher] per pair, or None)."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=with_features)
        if not with_features:
            return out.logits, None
        projected = [proj(out.hidden_states[s]) for proj, (s, _) in zip(self.projectors, self.feature_pairs)]
        return out.logits, projected
