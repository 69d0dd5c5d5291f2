"""What tests/test_deepspeed.py and its torchrun worker share: the tiny student, its optimizer, and the windows.
Every window holds the same sequences whatever the number of processes: rank r of W takes micro-batches
r*GA .. r*GA+GA-1 of the window's W*GA, one process takes them all (the same gradient, by THE normalisation)."""

from __future__ import annotations

from pathlib import Path

import torch

MB, GA = 2, 2
LRS = [3e-3, 2e-3, 1e-3, 1e-3]  # a different LR per window: kd sets it on the (DeepSpeed-wrapped) optimizer


def build(cache: Path):
    """(TrainConfig, DistillModel, AdamW, the train split) with seeded weights: CE + forward KL, no feature term."""
    from test_train import STUDENT

    from kd.cache import TeacherCache
    from kd.config import load_config
    from kd.models import load_tokenizer
    from kd.train import DistillModel
    from kd.train.model import build_student
    from kd.train_config import TrainConfig

    cfg = load_config(
        TrainConfig,
        None,
        [
            f"student.config={STUDENT}",
            f"train.cache_dir={cache}",
            "train.max_grad_norm=1.0",
            "loss.alpha_feature=0.0",
            "loss.alpha_ce=0.5",
            "loss.alpha_kd=0.5",
        ],
    )
    c = TeacherCache(cache)
    torch.manual_seed(0)
    lm = build_student(cfg, load_tokenizer(c.manifest["teacher"]["name_or_path"]), 0)
    model = DistillModel(lm, [], c.manifest["teacher"]["hidden_size"])
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=LRS[0],
    )
    return cfg, model, optimizer, c.split("train", ("input_ids", "topk_ids", "topk_logprobs"))


def _micro_batches(split, first: int, count: int) -> list[dict]:
    out = []
    for m in range(first, first + count):
        items = [split[i] for i in range(m * MB, (m + 1) * MB)]
        for j, it in enumerate(items):  # ragged: each sequence its own valid length
            it["length"] = torch.tensor(int(it["length"]) - 2 * ((m + j) % 3))
        out.append(torch.utils.data.default_collate(items))
    return out


def rank_window(split, w: int, rank: int, world: int) -> list[dict]:
    return _micro_batches(split, (w * world + rank) * GA, GA)


def full_window(split, w: int, world: int) -> list[dict]:
    return _micro_batches(split, w * world * GA, world * GA)


def nan_window(split, rank: int, world: int) -> list[dict]:
    """Window 3 with one NaN teacher log-prob at a counted position of rank 0's first micro-batch."""
    window = rank_window(split, 3, rank, world)
    if rank == 0:
        window[0]["topk_logprobs"] = window[0]["topk_logprobs"].clone()
        window[0]["topk_logprobs"][0, 1, 0] = float("nan")
    return window
