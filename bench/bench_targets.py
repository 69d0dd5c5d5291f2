"""How much of the full teacher do cached targets keep? Size per field, and gradient fidelity.

    python bench/bench_targets.py [--cache caches/shakespeare_smollm2] [--batches 4] [--trained runs/<demo run>]

(a) Bytes per token of each field stored in the cache (HDF5 storage size / tokens).
(b) On the same batches and the same student (the demo's random-init student, and the same student after it was
    trained by a demo run if --trained RUN_DIR is given), the gradient of the KD term alone (alpha_kd = 1) under each
    cached target, against the gradient of full-vocabulary KD with the teacher online: angle (degrees) and norm ratio.
The cache must hold sampled targets (cache_teacher.py ... cache.sample_n=50).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import h5py
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.cache import TeacherCache, shard_records  # noqa: E402
from kd.config import load_config  # noqa: E402
from kd.models import load_causal_lm, load_tokenizer  # noqa: E402
from kd.train import DistillModel, accumulate_window  # noqa: E402
from kd.train.model import build_student  # noqa: E402
from kd.train_config import TrainConfig  # noqa: E402

TARGETS = {
    "top-256, tail bucket": ("topk", "bucket"),
    "top-256, renormalized": ("topk", "renormalize"),
    "sampled (n=50)": ("sampled", "bucket"),
    "full vocabulary (online)": ("online", "bucket"),
}


def bytes_per_field(cache: TeacherCache) -> dict[str, float]:
    sizes: dict[str, int] = {}
    tokens = 0
    for split_name, split in cache.manifest["splits"].items():
        tokens += split["num_tokens"]
        for shard in shard_records(cache.root, cache.manifest, split_name):
            with h5py.File(cache.root / shard["file"], "r") as f:
                for name, dset in f.items():
                    sizes[name] = sizes.get(name, 0) + dset.id.get_storage_size()
    return {k: v / tokens for k, v in sizes.items()}


def kd_gradient(model, batches, cfg, accelerator, teacher) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    accumulate_window(model, batches, cfg.loss, accelerator, [], teacher)
    # float64: the cosine of two ~10^7-element vectors near 1 rounds to exactly 1 in fp32
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()


def main() -> None:
    from accelerate import Accelerator

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="caches/shakespeare_smollm2")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--trained", help="a run directory whose final/ student is measured too")
    args = ap.parse_args()
    cache = TeacherCache(args.cache)
    print(f"{'field':<16}{'bytes/token':>12}")
    fields = bytes_per_field(cache)
    for name, b in sorted(fields.items(), key=lambda kv: -kv[1]):
        print(f"{name:<16}{b:>12.1f}")
    print(
        f"{'top-k targets':<16}{fields['topk_ids'] + fields['topk_logprobs'] + fields.get('topk_logprobs_q8', 0):>12.1f}"
    )
    if "sample_ids" in fields:  # plain (format version 1 layout)
        print(f"{'sampled targets':<16}{fields['sample_ids'] + fields['sample_counts']:>12.1f}")
    if "sample_bytes" in fields:  # ragged
        print(f"{'sampled targets':<16}{fields['sample_bytes'] + fields['sample_offsets']:>12.1f}")

    accelerator = Accelerator()
    split = cache.split("train")
    batches = [torch.utils.data.default_collate([split[i * 4 + j] for j in range(4)]) for i in range(args.batches)]
    t = cache.manifest["teacher"]
    teacher = load_causal_lm(t["name_or_path"], t["revision"], t["dtype"], "sdpa").eval()
    students = {"random init": None}
    if args.trained:
        students["trained (" + Path(args.trained).name + ")"] = Path(args.trained) / "final"
    for label, path in students.items():
        base = ["loss.alpha_ce=0.0", "loss.alpha_kd=1.0", "loss.alpha_feature=0.0", f"train.cache_dir={args.cache}"]
        if path is not None:
            base.append(f"student.pretrained={path}")
            base.append("student.config=null")
        cfg0 = load_config(TrainConfig, ROOT / "configs/train_shakespeare.yaml", base)
        torch.manual_seed(0)
        lm = build_student(cfg0, load_tokenizer(t["name_or_path"]), t["vocab_size"])
        model = DistillModel(lm, [], t["hidden_size"])
        grads = {}
        for name, (target, tail) in TARGETS.items():
            cfg = load_config(
                TrainConfig,
                ROOT / "configs/train_shakespeare.yaml",
                base + [f"loss.target={target}", f"loss.tail={tail}"],
            )
            grads[name] = kd_gradient(model, batches, cfg, accelerator, teacher)
        ref = grads["full vocabulary (online)"]
        print(f"\nstudent: {label}; KD gradient vs full-vocabulary KD, {args.batches} batches of 4 x 256 tokens")
        print(f"{'target':<28}{'angle (deg)':>12}{'norm ratio':>12}")
        for name, g in grads.items():
            cos = float(torch.dot(g, ref) / (g.norm() * ref.norm()))
            print(
                f"{name:<28}{math.degrees(math.acos(max(-1.0, min(1.0, cos)))):>12.3f}{float(g.norm() / ref.norm()):>12.3f}"
            )
    print(json.dumps({"cache": args.cache, "sample_n": cache.manifest.get("sample_n")}))


if __name__ == "__main__":
    main()
