"""The model card every saved student carries (`final/README.md`): how it was made, in the Hugging Face model-card
format (YAML metadata, then Markdown), so that `hf upload USER/NAME runs/<run>/final` publishes a model that says
what its teacher, data, loss, budget and scores were. Written from the run's typed records only: no teacher, no
network."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import yaml

from kd.cache.manifest import Manifest
from kd.cache.reader import TeacherReference
from kd.train_config import TrainConfig

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class CardFacts:
    """What the card says, gathered where the run ends (kd.train.recipe.finish)."""

    cfg: TrainConfig
    cache: Manifest
    run_name: str
    folder: str  # final | final_ema: where in the run directory this card's weights are
    step: int
    tokens: int
    stop_reason: str
    final_eval: dict  # the last eval of these weights (eval/ce, eval/ppl, eval/bits_per_char, ...)
    parameters: int
    weights: str  # "trained" | "ema (decay ...)"
    teacher_reference: TeacherReference | None  # the teacher's score on the windows the evals read, when recorded


def hub_id(name: str | None) -> str | None:
    """`name` when it can be a model or dataset id on the hub (owner/name, not a local path or `asset:` name)."""
    if name and HUB_ID.match(name) and not os.path.exists(name):
        return name
    return None


def student_origin(cfg: TrainConfig, teacher: str) -> tuple[str, str | None]:
    """(how the student began, in words; the hub id it derives from, when it has one)."""
    s = cfg.student
    if s.pretrained:
        return f"the pretrained model {s.pretrained}", hub_id(s.pretrained)
    if s.from_teacher is not None:
        cut = s.from_teacher
        kept = f"layers {cut.layers}" if cut.layers else f"{cut.num_layers} layers (rule {cut.rule})"
        width = f", MLP width {cut.intermediate_size}" if cut.intermediate_size else ""
        return f"cut from the teacher: {kept}{width}", hub_id(cut.teacher or teacher)
    arch = (s.config or {}).get("model_type", "?")
    return f"random initialisation ({arch} config)", None


def model_card(f: CardFacts) -> str:
    teacher = f.cache.teacher
    origin, base = student_origin(f.cfg, teacher.name_or_path)
    dataset = f.cache.dataset
    datasets = [d for d in [hub_id(dataset.dataset)] if d]
    meta = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["knowledge-distillation", "kd"] + (["chat"] if f.cache.chat is not None else []),
    }
    if base:
        meta["base_model"] = base
    if datasets:
        meta["datasets"] = datasets
    meta["kd"] = {
        "teacher": teacher.name_or_path,
        "cache_config_hash": f.cache.config_hash,
        "cache_format_version": f.cache.format_version,
        "steps": f.step,
        "tokens": f.tokens,
    }
    ev = f.final_eval
    ref = f.teacher_reference
    terms = ", ".join(
        f"{t.weight:g} x {t.kind}" + (f" ({t.name})" if t.name != t.kind else "") for t in f.cfg.loss.loss_terms()
    )
    source = dataset.dataset or ", ".join(dataset.files or []) or "?"
    train_tokens = f.cache.splits["train"].num_tokens if "train" in f.cache.splits else 0
    rows = [
        (
            "teacher",
            f"{teacher.name_or_path} ({teacher.model_type or '?'}, vocabulary {teacher.vocab_size:,}, {teacher.dtype})",
        ),
        ("student", f"{f.parameters:,} parameters, {origin}; weights: {f.weights}"),
        ("data", f"{source}; {train_tokens:,} training tokens cached; eval split: {dataset.split_rule or '?'}"),
        (
            "cache",
            f"top-{f.cache.top_k}"
            + (f", {f.cache.sample_n} sampled targets" if f.cache.sample_n else "")
            + (f", hidden layers {f.cache.hidden_layers}" if f.cache.hidden_layers else "")
            + f"; identity {f.cache.config_hash} (format {f.cache.format_version})",
        ),
        (
            "loss",
            f"{terms}; target {f.cfg.loss.target}, temperature {f.cfg.loss.temperature:g}"
            + (f", across tokenizers ({f.cfg.loss.cross_tokenizer})" if f.cfg.loss.cross_tokenizer else ""),
        ),
        (
            "training",
            f"{f.step} optimizer steps, {f.tokens:,} tokens; lr {f.cfg.train.lr:g} {f.cfg.train.schedule} to "
            f"{f.cfg.train.min_lr:g}; ended: {f.stop_reason}",
        ),
        (
            "held-out",
            f"CE {ev['eval/ce']:.4f} nats/token (ppl {ev['eval/ppl']:.2f}), "
            f"{ev.get('eval/bits_per_char', float('nan')):.4f} bits/char, "
            f"top-1 agreement with the teacher {ev.get('eval/top1_agreement', float('nan')):.3f}",
        ),
    ]
    if ref:
        rows.append(
            (
                "teacher, held-out",
                f"CE {ref.score['ce_per_token']:.4f} nats/token, {ref.score['bits_per_char']:.4f} bits/char" + ref.note,
            )
        )
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# {f.run_name}

A student language model distilled with kd from **{teacher.name_or_path}**, trained against a cache of the
teacher's outputs (the teacher ran once; it was not in memory while the student trained).

| | |
|---|---|
{table}

Bits per character are over the held-out text's characters, so they compare across tokenizers; CE per token does
not. The full resolved config is in `kd_meta.json` beside this card.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH_OR_ID")
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_ID")
```

## Upload

```bash
hf upload USER/NAME {f.cfg.train.output_dir}/{f.run_name}/{f.folder} .
```
"""
