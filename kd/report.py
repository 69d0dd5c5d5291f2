"""Curves of a run: `python -m kd.report RUN_DIR [--out FILE.png]` (default RUN_DIR/report.png).

Four panels: raw loss components and the total per optimizer step; LR; gradient norm (skipped steps marked);
held-out bits per character per eval with the cached teacher's level as a dashed line (runs logged before kd
measured bits per character: CE and perplexity instead; EMA weights dashed when present). A chat run's latest
greedy replies to held-out prompts (kd/train/generations.py) are printed below the panels.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from kd.errors import KDError, run_cli
from kd.io import disk_error
from kd.train import read_metrics
from kd.train.generations import GENERATIONS_FILE, read_generations


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise KDError("kd.report needs matplotlib: pip install -e '.[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise KDError(f"{run_dir} has no metrics.jsonl: not a run directory")
    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/ce" in r]
    if not steps:
        raise KDError(f"{run_dir}/metrics.jsonl has no training steps yet")
    replies = read_generations(run_dir)
    last = [r for r in replies if r["step"] == replies[-1]["step"]] if replies else []
    if last:  # a chat run: its latest greedy replies to held-out prompts under the curves
        fig = plt.figure(figsize=(12, 8 + 0.9 * len(last)))
        grid = fig.add_gridspec(3, 2, height_ratios=[1, 1, 0.25 * len(last)])
        ax = np.array([[fig.add_subplot(grid[i, j]) for j in range(2)] for i in range(2)])
        text_ax = fig.add_subplot(grid[2, :])
        text_ax.axis("off")
        lines = [f"greedy replies to held-out prompts at step {last[0]['step']} (all steps: {GENERATIONS_FILE})"]
        for r in last:
            prompt = " ".join(r["prompt"].split())[-90:]
            lines += [
                f"prompt  ...{prompt}",
                f"  reference: {_short(r['reference'])}",
                f"  student: {_short(r['student'])}",
            ]
        text_ax.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8)
    else:
        fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    x = [r["step"] for r in steps]
    # the loss terms are the names with a weighted twin `w_<name>` in the step records
    for name in ["loss"] + [k[2:] for k in steps[0] if k.startswith("w_")]:
        if name in steps[0]:
            ax[0, 0].plot(x, [r[name] for r in steps], label=name, lw=2 if name == "loss" else 1)
    ax[0, 0].set(title="training loss (total = weighted sum; raw components)", xlabel="optimizer step")
    ax[0, 0].legend()
    ax[0, 1].plot(x, [r["lr"] for r in steps])
    ax[0, 1].set(title="learning rate", xlabel="optimizer step")
    ax[1, 0].plot(x, [r["grad_norm"] for r in steps], lw=1)
    skipped = [r["step"] for r in steps if r["skipped"]]
    if skipped:
        ax[1, 0].scatter(skipped, [0] * len(skipped), color="red", marker="x", label="skipped (non-finite)")
        ax[1, 0].legend()
    ax[1, 0].set(title="gradient norm (before clipping)", xlabel="optimizer step", yscale="log")
    teacher = next((r for r in records if r.get("event") == "teacher_reference"), None)
    if evals and "eval/bits_per_char" in evals[0]:  # tokenizer-free, so the teacher's level can be drawn beside it
        ex = [r["step"] for r in evals]
        ax[1, 1].plot(ex, [r["eval/bits_per_char"] for r in evals], "o-", label="student eval/bits_per_char")
        if "ema_eval/bits_per_char" in evals[0]:
            ax[1, 1].plot(ex, [r["ema_eval/bits_per_char"] for r in evals], "o--", label="EMA student")
        if teacher is not None:
            ax[1, 1].axhline(teacher["teacher/bits_per_char"], color="black", ls="--", label="teacher (cached score)")
        ax[1, 1].legend(loc="upper right")
        ax[1, 1].set(title="held-out bits per character", xlabel="optimizer step")
    elif evals:
        ex = [r["step"] for r in evals]
        ax[1, 1].plot(ex, [r["eval/ce"] for r in evals], "o-", label="eval/ce")
        if "ema_eval/ce" in evals[0]:
            ax[1, 1].plot(ex, [r["ema_eval/ce"] for r in evals], "o--", label="EMA eval/ce")
        twin = ax[1, 1].twinx()
        twin.plot(ex, [r["eval/ppl"] for r in evals], "s:", color="gray", label="eval/ppl")
        twin.set(ylabel="perplexity = exp(eval/ce)", yscale="log")
        ax[1, 1].legend(loc="upper right")
        ax[1, 1].set(title="held-out cross-entropy", xlabel="optimizer step")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else run_dir / "report.png"
    formats = fig.canvas.get_supported_filetypes()
    if out.is_dir() or out.suffix[1:].lower() not in formats:
        plt.close(fig)
        raise KDError(f"--out {out} must be a file ending in one of .{', .'.join(sorted(formats))}")
    if not out.parent.is_dir():
        plt.close(fig)
        raise KDError(f"--out {out}: the folder {out.parent} does not exist")
    # written under a temporary name and renamed: a full disk leaves the previous report (or none), never half one
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}{out.suffix}")
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise KDError(f"writing {out} failed: {disk_error(e)}") from None
    finally:
        plt.close(fig)
    return out


def _short(text: str, n: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def main(argv: list[str] | None = None, prog: str = "python -m kd.report") -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    print(plot(args.run_dir, args.out))


if __name__ == "__main__":
    run_cli(main)
