"""What the student says: at each eval, greedy replies to a few held-out chat prompts, kept in the run directory.

Held-out CE says how well the student predicts the assistant's tokens; a person also wants to read what it says.
The prompts come from the cache's eval split (a chat cache): for each conversation, in order, the tokens before
its first assistant reply (the system and user turns and the template's generation prompt) are the prompt, and
that reply (its loss-masked tokens) is the reference. The student continues each prompt greedily, alone (no
padding), until its end-of-turn token or `max_new_tokens`. Records go to RUN_DIR/generations.jsonl, one per prompt
and eval: {step, index, prompt, reference, student, student_tokens}; `python -m kd.report` shows the latest ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

GENERATIONS_FILE = "generations.jsonl"


def held_out_prompts(split, n: int) -> list[dict]:
    """The first `n` (prompt ids, reference ids) of a chat cache's eval split, in window and conversation order."""
    out: list[dict] = []
    for i in range(len(split)):
        if len(out) >= n:
            break
        w = split[i]
        ids, mask, seg = (w[k].numpy() for k in ("input_ids", "loss_mask", "segments"))
        for c in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == c)
            conv, cmask = ids[where], mask[where]
            first = np.flatnonzero(cmask)
            if not len(first) or first[0] == 0:
                continue  # nothing masked, or no prompt before it (a `loss_mask=all` cache)
            after = np.flatnonzero(~cmask[first[0] :].astype(bool))  # the reply ends at the next unmasked token
            end = first[0] + (int(after[0]) if len(after) else len(conv) - first[0])
            out.append({"prompt": conv[: first[0]].tolist(), "reference": conv[first[0] : end].tolist()})
            if len(out) >= n:
                break
    return out


@torch.no_grad()
def generate_replies(
    lm, tokenizer, prompts: list[dict], max_new_tokens: int, device, synced: bool = False
) -> list[dict]:
    """Greedy continuations of each prompt, decoded: [{prompt, reference, student, student_tokens}].
    `synced`: parameters are partitioned over the processes (ZeRO-3), every process generates the same prompts and
    keeps forwarding until all have stopped (transformers' synced_gpus), so the gathers stay in step."""
    was_training = lm.training
    lm.eval()
    out = []
    try:
        for p in prompts:
            ids = torch.tensor([p["prompt"]], device=device)
            stop = sorted(
                {t for t in (tokenizer.eos_token_id, p["reference"][-1] if p["reference"] else None) if t is not None}
            )
            gen = lm.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=stop[0] if stop else 0,
                synced_gpus=synced,
            )[0, ids.shape[1] :]
            out.append(
                {
                    "prompt": tokenizer.decode(p["prompt"]),
                    "reference": tokenizer.decode(p["reference"]),
                    "student": tokenizer.decode(gen.tolist()),
                    "student_tokens": len(gen),
                }
            )
    finally:
        lm.train(was_training)
    return out


class GenerationsLog:
    """RUN_DIR/generations.jsonl, written by the main process; on resume, records after the resumed step go (they
    belong to the part of the run that is redone), as the metrics log does."""

    def __init__(self, run_dir: Path, enabled: bool, keep_until_step: int | None):
        self.path, self.enabled = Path(run_dir) / GENERATIONS_FILE, enabled
        if enabled and keep_until_step is not None and self.path.exists():
            kept = [r for r in read_generations(run_dir) if r["step"] <= keep_until_step]
            self.path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))

    def write(self, step: int, replies: list[dict]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            for i, r in enumerate(replies):
                f.write(json.dumps({"step": step, "index": i, **r}, ensure_ascii=False) + "\n")


def read_generations(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / GENERATIONS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
