"""Hidden-state codecs: what each keeps of a real teacher's states, and of the feature loss's benefit.

    python bench/bench_hidden.py fidelity [--teacher asset:qwen2.5-coder-0.5b-instruct --layers 12,24]
    python bench/bench_hidden.py quality --caches fp16=DIR q8=DIR lowrank=DIR [--seeds 0,1,2 --steps 80]

fidelity: the teacher (offline asset; SmolLM2-135M by default, 576 wide, layers 15 and 30) runs over 256-token
windows of Shakespeare: the low-rank basis is fitted as the caching pass fits it (kd/cache/basis.py) on the first
--fit-tokens tokens of the demo's training plays, and every codec is applied to the states of held-out King Lear
windows. Per codec: bytes per token per layer, and how far the decoded states are from the originals in the terms
the feature losses use (kd/losses/features.py): mean 1 - cos and mean normalized MSE per token, and the
relative L2 error. Same windows for every codec, one process.

quality: the demo student (configs/train_shakespeare.yaml) trained for --steps optimizer steps with KD + CE
(top-256, tail bucket) and no feature loss on the first cache, then with the feature loss (alpha 0.1, the demo's
two layer pairs) on each cache; one train_student.py process per run, every run on the same data order per seed.
The feature-loss benefit of a cache = held-out CE without the feature loss - with it, paired by seed; the share
kept = a codec's benefit / fp16's benefit, per seed (mean ± sd over seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_quality import stdev, train_run  # noqa: E402

TRAIN_PLAYS = ["hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "tempest_gut.txt", "julius_caesar_gut.txt"]


def windows(tokenizer, files: list[str], T: int, limit_tokens: int) -> np.ndarray:
    from kd.paths import resolve_path

    ids: list[int] = []
    for name in files:
        ids += tokenizer(Path(resolve_path(f"asset:shakespeare/{name}")).read_text())["input_ids"]
        if len(ids) >= limit_tokens:
            break
    n = min(len(ids), limit_tokens) // T
    return np.asarray(ids[: n * T], dtype=np.int64).reshape(n, T)


def states(model, wins: np.ndarray, layers: list[int], batch: int = 8):
    import torch

    body = model.base_model
    out = []
    with torch.no_grad():
        for s in range(0, len(wins), batch):
            hs = body(input_ids=torch.from_numpy(wins[s : s + batch]), output_hidden_states=True).hidden_states
            out.append(torch.stack([hs[i] for i in layers], dim=1).float())
    return torch.cat(out)  # [N, L, T, H]


def per_token_errors(decoded: np.ndarray, original: np.ndarray) -> dict:
    d, o = decoded.astype(np.float64), original.astype(np.float64)
    cos = (d * o).sum(-1) / np.maximum(np.linalg.norm(d, axis=-1) * np.linalg.norm(o, axis=-1), 1e-12)

    def ln(a):
        a = a - a.mean(-1, keepdims=True)
        return a / np.sqrt((a**2).mean(-1, keepdims=True) + 1e-5)

    centered = o - o.mean(axis=(0, 2), keepdims=True)
    return {
        "1-cos": max(0.0, float((1 - cos).mean())),  # not -0.0000 from rounding
        "nmse": float(((ln(d) - ln(o)) ** 2).mean(-1).mean()),
        "rel_l2": float(np.linalg.norm(d - o) / np.linalg.norm(centered)),
    }


def fidelity(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd.cache.basis import BasisFit
    from kd.cache.codecs import field_codec
    from kd.paths import resolve_path

    torch.set_grad_enabled(False)
    path = resolve_path(args.teacher)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layers = [int(x) for x in args.layers.split(",")]
    H = model.config.hidden_size
    t0 = time.time()
    fit_w = windows(tok, TRAIN_PLAYS, 256, args.fit_tokens)
    eval_w = windows(tok, ["lear_gut.txt"], 256, args.eval_tokens)
    fit = BasisFit(len(layers), H, "cpu")
    for s in range(0, len(fit_w), 8):
        x = states(model, fit_w[s : s + 8], layers)
        fit.add(x, torch.full((len(x),), 256))
    held = states(model, eval_w, layers).numpy()  # [N, L, T, H]
    print(
        f"teacher {args.teacher}: hidden {H}, layers {layers}; basis fitted on {fit.n} tokens of the training plays, "
        f"codecs applied to {held.shape[0] * held.shape[2]} tokens of King Lear ({time.time() - t0:.0f} s)\n"
    )
    print(
        f"{'codec':28}{'bytes/token/layer':>18}{'layer':>7}{'1 - cos':>10}{'norm. MSE':>11}{'rel. L2':>9}{'var kept':>10}"
    )
    specs = [("fp16", {"name": "plain", "dtype": "float16"}), ("q8", {"name": "q8", "rounding": "nearest"})]
    specs += [(f"lowrank r={r} q8", {"name": "lowrank", "rank": r, "coefficients": "q8"}) for r in args.ranks]
    for label, spec in specs:
        basis = fit.finish(spec["rank"], {}) if spec["name"] == "lowrank" else None
        codec = field_codec(spec, basis)
        shape = held.shape[1:]
        nbytes = sum(int(np.prod(sh)) * dt.itemsize for sh, dt in codec.datasets("h", shape).values())
        per = nbytes / (shape[0] * shape[1])
        decoded = []
        for seq in held:
            rows = {k: v[0] for k, v in codec.encode("h", seq[None]).items()}
            decoded.append(codec.decode(lambda ds, rows=rows: rows[ds], "h", shape))
        decoded = np.stack(decoded)
        for j, layer in enumerate(layers):
            e = per_token_errors(decoded[:, j], held[:, j])
            kept = f"{basis.variance_kept()[j]:.3f}" if basis is not None else ""
            print(
                f"{label if j == 0 else '':28}{per if j == 0 else '':>18}{layer:>7}{e['1-cos']:>10.4f}"
                f"{e['nmse']:>11.4f}{e['rel_l2']:>9.4f}{kept:>10}"
            )


def quality(args) -> None:
    caches = dict(c.split("=", 1) for c in args.caches)
    if "fp16" not in caches:
        raise SystemExit("--caches needs fp16=DIR: the other codecs are compared with it")
    seeds = [int(x) for x in args.seeds.split(",")]
    out = Path(tempfile.mkdtemp(prefix="kd-bench-hidden-"))
    kd = ["loss.alpha_ce=0.5", "loss.alpha_kd=0.5", "loss.target=topk", "loss.tail=bucket"]
    variants = [("KD + CE, no feature loss", caches["fp16"], kd + ["loss.alpha_feature=0.0"])]
    variants += [(f"+ feature loss, {name} states", d, kd + ["loss.alpha_feature=0.1"]) for name, d in caches.items()]
    ce = {}
    for label, cache, overrides in variants:
        ce[label] = []
        for seed in seeds:
            final = train_run(
                "configs/train_shakespeare.yaml", overrides, cache, out, f"{len(ce)}-{seed}", args.steps, seed
            )
            ce[label].append(final["eval/ce"])
        print(f"  {label}: {' '.join(f'{c:.4f}' for c in ce[label])}", flush=True)
    base = np.array(ce[variants[0][0]])
    fp16_gain = base - np.array(ce["+ feature loss, fp16 states"])
    print(
        f"\n{len(seeds)} seeds {seeds}, {args.steps} steps; benefit = CE without - with the feature loss, paired by seed\n"
    )
    print(f"{'variant':34}{'bytes/token':>12}{'held-out CE':>17}{'benefit':>17}{'share of fp16 benefit':>24}  per seed")
    for label, cache, _ in variants:
        m = json.loads((Path(cache) / "manifest.json").read_text())
        c = np.array(ce[label])
        gain = base - c
        share = gain / fp16_gain
        cells = f"{c.mean():>10.3f} ±{stdev(list(c)):5.3f}"
        if label != variants[0][0]:
            cells += f"{gain.mean():>+10.3f} ±{stdev(list(gain)):5.3f}{100 * share.mean():>16.0f}% ±{100 * stdev(list(share)):3.0f}"
        print(
            f"{label:34}{m['bytes_per_token']:>12.0f}{cells}"
            + (
                "  " + " ".join(f"{x:.3f}" for x in c)
                if label == variants[0][0]
                else "  " + " ".join(f"{x:+.3f}" for x in gain)
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fidelity")
    f.add_argument("--teacher", default="asset:smollm2-135m-instruct")
    f.add_argument("--layers", default="15,30")
    f.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64, 128, 248])
    f.add_argument("--fit-tokens", type=int, default=65536)
    f.add_argument("--eval-tokens", type=int, default=8192)
    q = sub.add_parser("quality")
    q.add_argument("--caches", nargs="+", required=True, help="NAME=DIR ...; fp16=DIR is the reference")
    q.add_argument("--seeds", default="0,1,2")
    q.add_argument("--steps", type=int, default=80)
    args = ap.parse_args()
    fidelity(args) if args.cmd == "fidelity" else quality(args)


if __name__ == "__main__":
    main()
