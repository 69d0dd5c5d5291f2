"""The model card in every saved student (kd/train/card.py): a Hugging Face model card (YAML metadata + Markdown)
that says how the student was made, its figures equal to the run's own records."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard
from test_train import make_cfg
from transformers import AutoModelForCausalLM

from kd import train_student
from kd.cache import TeacherCache
from kd.train import read_metrics
from kd.train.card import hub_id


def test_final_and_final_ema_carry_a_model_card_with_the_runs_figures(tiny_cache, tmp_path):
    run = train_student.main(make_cfg(tiny_cache, tmp_path, **{"train.max_steps": 3, "train.ema_decay": 0.9}))
    info = TeacherCache(tiny_cache).info
    for folder, weights in (("final", "trained"), ("final_ema", "ema (decay 0.9)")):
        card = ModelCard.load(run / folder / "README.md")  # the hub library's own loader parses it
        meta = json.loads((run / folder / "kd_meta.json").read_text())
        data = card.data.to_dict()
        assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
        assert "knowledge-distillation" in data["tags"]
        assert "base_model" not in data  # a random-init student derives from no hub model
        assert data["kd"] == {
            "teacher": info.teacher.name_or_path,
            "cache_config_hash": info.config_hash,
            "cache_format_version": info.format_version,
            "steps": 3,
            "tokens": data["kd"]["tokens"],
        }
        steps = [r for r in read_metrics(run) if "loss" in r]
        assert data["kd"]["tokens"] == steps[-1]["tokens_seen"] > 0
        scored = "eval/" if folder == "final" else "ema_eval/"  # each card scores its own weights
        final = {"eval/" + k[len(scored) :]: v for k, v in meta["final_eval"].items() if k.startswith(scored)}
        assert f"CE {final['eval/ce']:.4f} nats/token (ppl {final['eval/ppl']:.2f})" in card.text
        assert f"{final['eval/bits_per_char']:.4f} bits/char" in card.text
        teacher = info.splits["eval"].teacher_score
        assert f"{teacher['bits_per_char']:.4f} bits/char" in card.text
        assert f"weights: {weights}" in card.text
        assert "3 optimizer steps" in card.text and "1 x ce" not in card.text  # the demo weights: 0.5 x ce
        assert f"hf upload USER/NAME {tmp_path}/{run.name}/{folder} ." in card.text
    (student,) = [line for line in card.text.splitlines() if line.startswith("| student |")]
    lm = AutoModelForCausalLM.from_pretrained(run / "final")
    assert f"| student | {lm.num_parameters():,} parameters, random initialisation (llama config)" in student


def test_only_hub_ids_become_base_model_or_datasets(tmp_path, monkeypatch):
    assert hub_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    for not_hub in (None, "", "asset:smollm2-135m-instruct", "/models/llama", "gpt2-local/", str(tmp_path)):
        assert hub_id(not_hub) is None
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    monkeypatch.chdir(tmp_path)
    assert hub_id("owner/name") is None  # a local folder of that name is what the config meant
