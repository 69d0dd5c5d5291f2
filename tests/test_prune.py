"""kd/prune.py: students cut from the teacher (kept layers and MLP neurons by measured importance)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import _save_model
from transformers import AutoConfig, AutoModelForCausalLM

from kd import cache_teacher, prune, train_student
from kd.cache import TeacherCache
from kd.config import load_config
from kd.errors import KDError
from kd.prune.__main__ import main as prune_command
from kd.train import read_metrics
from kd.train_config import FromTeacherConfig, TrainConfig


def tiny(model_type: str, layers: int = 6, seed: int = 0, **extra):
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        **extra,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def batches(seed: int = 0, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 64, (4, 16), generator=g), torch.tensor([16, 16, 9, 3])) for _ in range(n)]


def reference(teacher, layers, neurons=None):
    """The pruned model built by hand: a copy of the teacher with the other layers deleted from its ModuleList and
    each kept MLP's projections replaced by Linear layers holding the kept rows / columns."""
    ref = copy.deepcopy(teacher)
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in layers])
    for j, layer in enumerate(ref.model.layers):
        layer.self_attn.layer_idx = j
        if neurons is not None:
            idx = torch.from_numpy(neurons[layers[j]])
            mlp = layer.mlp
            for name in ("gate_proj", "up_proj"):
                old = getattr(mlp, name)
                new = torch.nn.Linear(old.in_features, len(idx), bias=False)
                new.weight.data = old.weight.data[idx].clone()
                setattr(mlp, name, new)
            new = torch.nn.Linear(len(idx), mlp.down_proj.out_features, bias=False)
            new.weight.data = mlp.down_proj.weight.data[:, idx].clone()
            mlp.down_proj = new
    ref.config.num_hidden_layers = len(layers)
    if getattr(ref.config, "layer_types", None):
        ref.config.layer_types = [ref.config.layer_types[i] for i in layers]
    return ref


@pytest.mark.parametrize("model_type,tied", [("llama", True), ("qwen2", False), ("qwen3", False), ("mistral", False)])
def test_pruned_weights_are_the_teachers_exactly(model_type, tied):
    t = tiny(model_type, tie_word_embeddings=tied)
    imp = prune.measure(t, batches(), neurons=True)
    layers = [0, 2, 5]
    neurons = prune.keep_neurons(imp, layers, 20)
    s = prune.prune(t, layers, neurons)
    assert s.config.num_hidden_layers == 3 and s.config.intermediate_size == 20 and len(s.model.layers) == 3
    ts = t.state_dict()
    for j, i in enumerate(layers):
        idx = torch.from_numpy(neurons[i])
        for name, p in s.model.layers[j].named_parameters():
            src = ts[f"model.layers.{i}.{name}"]
            if name.endswith(("gate_proj.weight", "up_proj.weight")):
                src = src[idx]
            elif name.endswith("down_proj.weight"):
                src = src[:, idx]
            assert p.shape == src.shape and torch.equal(p, src), (j, name)
    assert torch.equal(s.model.embed_tokens.weight, t.model.embed_tokens.weight)
    assert torch.equal(s.model.norm.weight, t.model.norm.weight)
    assert torch.equal(s.lm_head.weight, t.lm_head.weight)
    assert (s.lm_head.weight.data_ptr() == s.model.embed_tokens.weight.data_ptr()) == tied
    assert s.config.kd_pruned_from["teacher_layers"] == layers


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_saved_pruned_model_loads_in_transformers_and_equals_the_hand_built_one(model_type, tmp_path):
    t = tiny(model_type)
    imp = prune.measure(t, batches(), neurons=True)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for layers, neurons in (([1, 2, 4], None), ([0, 3, 4, 5], prune.keep_neurons(imp, [0, 3, 4, 5], 24))):
        s = prune.prune(t, layers, neurons)
        out = tmp_path / f"{model_type}-{len(layers)}"
        s.save_pretrained(out)
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()
        assert loaded.config.kd_pruned_from["teacher_layers"] == layers
        with torch.no_grad():
            got = loaded(ids, use_cache=False).logits
            want = reference(t, layers, neurons)(ids, use_cache=False).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_explicit_layer_lists_are_checked_with_clear_errors():
    t = tiny("llama", layers=4)
    for bad, msg in (
        ([], "empty"),
        ([0, 4], r"\[4\] are outside the teacher's decoder layers 0..3"),
        ([-1, 2], r"\[-1\] are outside"),
        ([2, 1], "strictly increasing"),
        ([1, 1], "strictly increasing"),
    ):
        with pytest.raises(KDError, match=msg):
            prune.prune(t, bad)
    with pytest.raises(KDError, match="exactly one of layers"):
        FromTeacherConfig(layers=[0], num_layers=1)
    with pytest.raises(KDError, match="exactly one of layers"):
        FromTeacherConfig()
    with pytest.raises(KDError, match=r"intermediate_size must be in 1..48 \(the teacher's MLP width\), got 49"):
        prune.keep_neurons(prune.measure(t, batches(n=1), neurons=True), [0], 49)
    with pytest.raises(KDError, match="uses the teacher's tokenizer"):
        load_config(TrainConfig, None, ["student.tokenizer=x", "student.from_teacher={num_layers: 1}"])
    with pytest.raises(KDError, match=r"num_layers must be in 1..4"):
        prune.choose_layers(prune.measure(t, batches(n=1)), 5, "block")
    with pytest.raises(KDError, match="set exactly one of student.pretrained"):
        load_config(TrainConfig, None, ["student.config={model_type: llama}", "student.from_teacher={num_layers: 1}"])


def test_other_architectures_are_refused_by_name():
    from transformers import GPT2Config

    with pytest.raises(KDError, match="pruning supports llama-style decoders .*'gpt2'"):
        prune.check_architecture(GPT2Config())


def silence(layer) -> None:
    """Zero a layer's residual branches (attention output and MLP down projection): the layer becomes the identity."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def test_a_layer_made_the_identity_is_ranked_least_important_by_every_measured_rule():
    t = tiny("llama", layers=6, seed=3)
    silence(t.model.layers[3])
    imp = prune.measure(t, batches())
    assert np.argmin(imp.influence()) == 3 and imp.influence()[3] < 1e-6
    assert prune.choose_layers(imp, 5, "influence") == [0, 1, 2, 4, 5]
    assert prune.choose_layers(imp, 5, "block") == [0, 1, 2, 4, 5]
    assert prune.choose_layers(imp, 3, "every_other") == [0, 2, 4]  # no measurement: the baseline
    # two adjacent identities: the block rule drops them as one block
    t2 = tiny("llama", layers=6, seed=4)
    silence(t2.model.layers[1])
    silence(t2.model.layers[2])
    imp2 = prune.measure(t2, batches())
    assert prune.choose_layers(imp2, 4, "block") == [0, 3, 4, 5]
    assert imp2.block_distance(2)[1] < 1e-3 < imp2.block_distance(2).min(initial=1, where=np.arange(5) != 1)


def test_an_mlp_neuron_that_reaches_nothing_is_dropped_first():
    t = tiny("llama", layers=2, seed=5)
    with torch.no_grad():
        t.model.layers[0].mlp.down_proj.weight[:, 7] = 0  # neuron 7's output never reaches the residual stream
        t.model.layers[1].mlp.gate_proj.weight[11] = 0  # silu(0) * up = 0: neuron 11 never fires
    imp = prune.measure(t, batches(), neurons=True)
    assert np.argmin(imp.neurons[0]) == 7 and imp.neurons[0][7] == 0
    assert np.argmin(imp.neurons[1]) == 11 and imp.neurons[1][11] == 0
    kept = prune.keep_neurons(imp, [0, 1], 47)
    assert 7 not in kept[0] and 11 not in kept[1] and list(kept[0]) == sorted(kept[0])


def test_default_feature_pairs_match_kept_layers_to_their_teacher_layers():
    record = {"teacher_layers": [0, 1, 2, 6, 7], "teacher_num_layers": 8}
    # student hidden_states j+1 <- teacher hidden_states layers[j]+1; the final-normed outputs pair only together
    assert prune.feature_pairs(record, [2, 3, 7, 8]) == [[2, 2], [3, 3], [4, 7], [5, 8]]
    assert prune.feature_pairs(record, [4]) == []
    cut_last = {"teacher_layers": [0, 1, 2], "teacher_num_layers": 8}
    assert prune.feature_pairs(cut_last, [3, 8]) == []  # student's normed output vs the teacher's residual: no pair


# ---- from config and from the command, on a cache ----


@pytest.fixture(scope="module")
def deep_cache(tmp_path_factory, corpus_dir, tokenizer_dir):
    """A 4-layer tiny llama teacher (tied head) and its cache, hidden states of layers 2 and 4 (the last)."""
    from conftest import TINY, cache_overrides
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kd.cache_config import CacheConfig

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    cfg = LlamaConfig(vocab_size=vocab, **dict(TINY, num_hidden_layers=4), tie_word_embeddings=True)
    teacher = _save_model(LlamaForCausalLM, cfg, tokenizer_dir, tmp_path_factory.mktemp("deep_teacher"), 102)
    out = tmp_path_factory.mktemp("deep_cache") / "cache"
    extra = {"data.max_train_sequences": 32, "data.max_eval_sequences": 8, "cache.hidden_layers": "[2, 4]"}
    return cache_teacher.main(load_config(CacheConfig, None, cache_overrides(teacher, corpus_dir, out, **extra)))


def test_a_student_cut_from_the_teacher_trains_with_default_feature_pairs_and_saves(deep_cache, tmp_path, capsys):
    from test_train import overrides

    cfg = load_config(
        TrainConfig,
        None,
        overrides(
            deep_cache,
            tmp_path,
            **{
                "student.config": "null",
                "student.from_teacher": "{layers: [0, 1, 3]}",
                "loss.feature_layers": "[]",
                "train.max_steps": 4,
                "train.eval_every": 2,
            },
        ),
    )
    run = train_student.main(cfg)
    said = capsys.readouterr().out
    assert "3 of 4 layers kept (explicit: [0, 1, 3])" in said
    # kept layers 1 and 3 (the last) came from teacher layers 2 and 4, which the cache holds
    assert "feature pairs [student, teacher] from the kept layers: [[2, 2], [3, 4]]" in said
    steps = [r for r in read_metrics(run) if "loss" in r]
    assert len(steps) == 4 and all(np.isfinite(r["feature"]) for r in steps)
    evals = [r for r in read_metrics(run) if "eval/ce" in r]
    teacher = TeacherCache(deep_cache).manifest["splits"]["eval"]["teacher_score"]
    assert evals[0]["step"] == 0 and evals[0]["eval/ce"] > teacher["ce_per_token"] - 1e-6
    lm = AutoModelForCausalLM.from_pretrained(run / "final")
    assert lm.config.num_hidden_layers == 3 and lm.config.kd_pruned_from["teacher_layers"] == [0, 1, 3]


def test_the_prune_command_prints_importance_and_scores_and_writes_a_loadable_folder(deep_cache, tmp_path, capsys):
    out = tmp_path / "half"
    prune_command(
        ["--cache", str(deep_cache), "--layers", "2", "--intermediate-size", "32", "--out", str(out), "--json"]
    )
    said = capsys.readouterr().out
    assert "drop layers  0-1   angular distance" in said and "drop layers  2-3   angular distance" in said
    assert "teacher: 4 layers, held-out CE" in said and "block: keeps layers" in said and "MLP width 32" in said
    results = json.loads(said.strip().splitlines()[-1])
    assert [r["model"] for r in results] == ["teacher", "block"]
    lm = AutoModelForCausalLM.from_pretrained(out)
    assert lm.config.num_hidden_layers == 2 and lm.config.intermediate_size == 32
    assert lm.config.kd_pruned_from["teacher_layers"] == results[1]["layers"]
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    # the folder scores what the command said it scored
    from kd.evaluate import on_cache

    metrics, _ = on_cache(str(out), str(deep_cache), "eval", None, 8, "fp32")
    assert metrics["eval/ce"] == pytest.approx(results[1]["eval/ce"], rel=1e-6)
    with pytest.raises(KDError, match="already exists"):
        prune_command(["--cache", str(deep_cache), "--layers", "2", "--out", str(out)])
    with pytest.raises(KDError, match="comma-separated layer indices"):
        prune_command(["--cache", str(deep_cache), "--keep", "0,x", "--out", str(tmp_path / "x")])
    with pytest.raises(KDError, match="strictly increasing"):
        prune_command(["--cache", str(deep_cache), "--keep", "2,1", "--out", str(tmp_path / "y")])
    capsys.readouterr()
    prune_command(["--cache", str(deep_cache), "--layers", "3", "--compare"])
    said = capsys.readouterr().out
    assert all(f"{rule}: keeps layers" in said for rule in prune.RULES)
    # with an explicit list, --compare scores the rules beside it and --out still writes the list's student
    prune_command(["--cache", str(deep_cache), "--keep", "0,3", "--compare", "--out", str(tmp_path / "kept")])
    said = capsys.readouterr().out
    assert "explicit: keeps layers [0, 3]" in said and all(f"{rule}: keeps layers" in said for rule in prune.RULES)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "kept").config.kd_pruned_from["teacher_layers"] == [0, 3]


def test_a_teacher_whose_weights_changed_since_caching_is_not_cut(deep_cache):
    from dataclasses import replace

    cache = TeacherCache(deep_cache)
    recorded = dict(cache.info.teacher.weights, digest="0" * 64)  # as if the cache had been made from other weights
    cache.info = replace(cache.info, teacher=replace(cache.info.teacher, weights=recorded))
    with pytest.raises(KDError, match="are not the ones cache .* was made from"):
        prune.load_cache_teacher(cache)


def test_help_lists_the_from_teacher_keys():
    from kd.config import config_help

    lines = "\n".join(config_help(TrainConfig))
    for key in ("layers", "num_layers", "rule", "intermediate_size", "calibration_sequences", "teacher"):
        assert f"    student.from_teacher.{key} (" in lines, key


# every rule of the registry with where its choice is checked (a new rule fails until listed here and tested)
TESTED_RULES = {
    "block": "test_a_layer_made_the_identity_is_ranked_least_important_by_every_measured_rule",
    "influence": "test_a_layer_made_the_identity_is_ranked_least_important_by_every_measured_rule",
    "every_other": "test_a_layer_made_the_identity_is_ranked_least_important_by_every_measured_rule (the baseline)",
}


def test_every_prune_rule_is_listed_and_configurable():
    import typing

    assert set(prune.RULES) == set(TESTED_RULES)
    # student.from_teacher.rule accepts exactly the registered rules
    assert set(typing.get_args(typing.get_type_hints(FromTeacherConfig)["rule"])) == set(prune.RULES)
