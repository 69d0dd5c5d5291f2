"""Why sampled targets end behind the top-256 at the KD-only objective, and what closes the gap: the same short runs
as bench_peers.py (its arms, init, windows, order and optimizer), with caches that differ only in the number of
draws per position, and the gradient each target gives measured against the full teacher's.

    python bench/bench_sampled_gap.py --caches n16=caches/shakespeare_smollm2_n16 n50=caches/shakespeare_smollm2 \
        n255=caches/shakespeare_smollm2_n255 [--steps 20] [--seeds 0 1 2]

The caches: the demo's config with cache.sample_n = 16, 50 (the demo cache itself) and 255 (the most uint8 counts
hold); every other field is the same teacher output over the same windows, so the top-256 arm is run once per seed
(on the first cache listed) and every sampled arm differs from it only in its targets.

Per seed (its student init and data order, as bench_peers.py): the held-out CE after `--steps` KD-only steps
(loss.alpha_ce=0, alpha_kd=1, T = 1) on the top-256 (tail bucket) and on each cache's sampled targets; printed: each
arm's mean and standard error, and the paired difference sampled - top-256 per number of draws.

The cause, measured: on the first window batch of each seed's order, at the student's init, the gradient of the KD
loss with respect to the student's logits (kd.losses.terms.logit_term_sums, the trainer's own function) for each
target, against the gradient on the teacher's full distribution (its logits, online): relative error
||g - g_full|| / ||g_full||, and the angle between the gradients w.r.t. the student's parameters (what the optimizer
sees). For sampled targets E ||g - g_full||^2 = the sum over positions of (1 - sum_i p_i^2) / n (the empirical
distribution's variance; the loss is a sum over positions here): an error that falls as 1/sqrt(n) and is noise, not
bias (its mean is g_full). The top-256's error is bias: the tail bucket spreads the teacher's tail mass in the
student's proportions. Also printed: the mean number of distinct drawn ids per position, and the bytes per
token they take in the cache (the storage of its sample datasets in the train shards).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_peers import MB, mean_se, student_init  # noqa: E402


def arm(kind: str, cache: str, student: Path, steps: int, seed: int) -> float:
    """Held-out CE of one bench_peers.py arm run in a process of its own."""
    cmd = [sys.executable, str(ROOT / "bench" / "bench_peers.py"), "--child", kind, "--cache", cache]
    cmd += ["--student", str(student), "--steps", str(steps), "--seeds", str(seed)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if r.returncode != 0:
        raise SystemExit(f"{kind} on {cache} (seed {seed}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.split("RESULT ", 1)[1])["heldout_ce"]


def sample_bytes_per_token(cache: Path) -> float:
    """Bytes the sampled targets take in the cache's train shards (their datasets' storage, as written by the
    cache's codec), per stored train token."""
    import h5py

    stored, tokens = 0, 0
    for shard in sorted(cache.glob("train-*.h5")):
        with h5py.File(shard, "r") as f:
            stored += sum(f[name].id.get_storage_size() for name in f if name.startswith("sample"))
            tokens += int(f["lengths"][:].sum())
    return stored / tokens


def gradients(caches: dict[str, str], student: Path, seed: int) -> dict[str, dict]:
    """At the init student, on the first MB windows of `seed`'s order: each target's KD gradient w.r.t. the
    logits against the full teacher's, and what each cache's samples hold per position."""
    import torch
    from transformers import AutoModelForCausalLM

    from kd.cache import TeacherCache
    from kd.losses.terms import Term, logit_term_sums
    from kd.models import load_causal_lm
    from kd.signals import Online, Sampled, TopK
    from kd.train import epoch_order

    first = next(iter(caches.values()))
    cache = TeacherCache(first)
    split = cache.split("train", ("input_ids", "topk_ids", "topk_logprobs"))
    rows = [int(i) for i in epoch_order(len(split), 0, seed, 0, 1, MB)[:MB]]
    items = [split[i] for i in rows]
    T = min(int(it["length"]) for it in items)  # full windows: the same positions in every row
    ids = torch.stack([it["input_ids"][:T] for it in items])
    t = cache.info.teacher
    with torch.no_grad():
        teacher = load_causal_lm(t.name_or_path, t.revision, "fp32", "sdpa").eval()
        full = teacher(input_ids=ids).logits.reshape(-1, teacher.config.vocab_size).float()
    model = AutoModelForCausalLM.from_pretrained(student)
    params = [q for q in model.parameters() if q.requires_grad]
    student_logits = model(input_ids=ids).logits  # with its graph: parameter gradients from logit gradients
    V = student_logits.shape[-1]
    flat = student_logits.reshape(-1, V)
    N = flat.shape[0]
    targets = torch.roll(ids, -1, 1).reshape(-1)
    mask = (torch.arange(T) < T - 1).repeat(MB)  # the last position of each window has no target

    def grad(signal) -> tuple[torch.Tensor, torch.Tensor]:
        """(the KD gradient w.r.t. the logits, and w.r.t. the student's parameters, flattened)."""
        x = flat.detach().clone().requires_grad_()
        loss, _ = logit_term_sums(x, targets, mask, mask, signal, [Term("kd", "forward_kl", 1.0)], [1.0], 1.0, 128)
        loss.backward()
        g_params = torch.autograd.grad(flat, params, grad_outputs=x.grad, retain_graph=True)
        return x.grad, torch.cat([g.reshape(-1) for g in g_params])

    def compare(g: tuple, ref: tuple) -> dict:
        (gl, gp), (rl, rp) = [(a.double(), b.double()) for a, b in (g, ref)]
        cos = float((gp * rp).sum() / (gp.norm() * rp.norm()))
        return {
            "rel_error": float((gl - rl).norm() / rl.norm()),
            "param_angle": math.degrees(math.acos(max(-1.0, min(1.0, cos)))),
        }

    student_logits = flat.detach().float()
    g_full = grad(Online(full))
    k = items[0]["topk_ids"].shape[-1]
    top_ids = torch.stack([it["topk_ids"][:T] for it in items]).reshape(N, k).long()
    top_lp = torch.stack([it["topk_logprobs"][:T] for it in items]).reshape(N, k).float()
    out = {f"top-{k} (bucket)": compare(grad(TopK(top_ids, top_lp, "bucket")), g_full)}
    p = torch.softmax(full, -1)
    expected = float(((1 - (p * p).sum(-1)) * mask).sum())  # x n: E ||q_hat - p||^2 summed over positions
    for label, path in caches.items():
        c = TeacherCache(path)
        s = c.split("train", ("input_ids", "sample_ids", "sample_counts"))
        its = [s[i] for i in rows]
        if any(not torch.equal(a["input_ids"][:T], b) for a, b in zip(its, ids)):
            raise SystemExit(f"{path}: its windows are not those of {first}; the caches must differ in sample_n only")
        n = c.info.sample_n
        width = its[0]["sample_ids"].shape[-1]
        s_ids = torch.stack([it["sample_ids"][:T] for it in its]).reshape(N, width).long()
        s_counts = torch.stack([it["sample_counts"][:T] for it in its]).reshape(N, width).long()
        r = compare(grad(Sampled(s_ids, s_counts)), g_full)
        distinct = float((s_counts > 0).sum(-1).float().mean())
        # the variance term alone, predicted from the teacher's p: the expected error of the empirical distribution
        predicted = math.sqrt(expected / n) / float(((p - torch.softmax(student_logits, -1)) * mask[:, None]).norm())
        out[f"sampled n={n} ({label})"] = {
            **r,
            "predicted_rel_error": predicted,
            "distinct": distinct,
            "bytes_per_token": sample_bytes_per_token(Path(path)),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--caches", nargs="+", required=True, help="label=path, the top-256 arm runs on the first")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    caches = dict(c.split("=", 1) for c in args.caches)
    first = next(iter(caches.values()))
    work = Path(tempfile.mkdtemp(prefix="kd-sampled-gap-"))
    ce: dict[str, list[float]] = {"top-256": [], **{label: [] for label in caches}}
    grads = []
    for seed in args.seeds:
        student = student_init(first, work / f"student-{seed}", seed)
        grads.append(gradients(caches, student, seed))
        ce["top-256"].append(arm("kd cached topk", first, student, args.steps, seed))
        for label, path in caches.items():
            ce[label].append(arm("kd cached sampled", path, student, args.steps, seed))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in ce.items()), flush=True)

    print(f"\nKD-only, {args.steps} steps of {MB} x 256 tokens, {len(args.seeds)} seeds (mean ± standard error):")
    print(f"{'target':<24} {'held-out CE':>18} {'minus top-256 (paired)':>24}")
    for label, values in ce.items():
        diff = (
            ""
            if label == "top-256"
            else "{:+.4f} ± {:.4f}".format(*mean_se([a - b for a, b in zip(values, ce["top-256"])]))
        )
        print(f"{label:<24} {'{:.4f} ± {:.4f}'.format(*mean_se(values)):>18} {diff:>24}")
    print(
        "\nthe KD gradient at the student's init, against the full teacher's (mean over seeds): relative error of the"
    )
    print(
        "gradient w.r.t. the logits (and the variance's prediction for sampled targets), angle of the gradient w.r.t."
    )
    print("the parameters (what the optimizer sees: the per-position noise partly cancels across positions)")
    print(f"{'target':<28} {'rel. error':>10} {'predicted':>10} {'angle':>8} {'distinct ids':>13} {'bytes/token':>12}")
    for name in grads[0]:
        rows = [g[name] for g in grads]
        cells = [
            mean_se([r[key] for r in rows])[0] if key in rows[0] else math.nan
            for key in ("rel_error", "predicted_rel_error", "param_angle", "distinct", "bytes_per_token")
        ]
        print(f"{name:<28} {cells[0]:>10.4f} {cells[1]:>10.4f} {cells[2]:>7.2f}° {cells[3]:>13.1f} {cells[4]:>12.1f}")
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
