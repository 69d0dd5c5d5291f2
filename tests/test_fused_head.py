"""The LM head fused into the loss (kd/losses/chunked.py, DistillModel.fused_head): the same losses and gradients
as the model's own forward, for every signal and kind, tied and untied heads, under GA and autocast; no tensor of
positions x vocabulary is ever made; models it does not understand fall back with a reason."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY
from torch.utils._python_dispatch import TorchDispatchMode

from kd.losses.terms import Term
from kd.models import head_fallback_reason
from kd.signals import Mapped, Online, Sampled, TopK
from kd.train import DistillModel, accumulate_window
from kd.train.step import LossPlan, micro_batch_sums

V, B, T, K = 96, 2, 24, 8


def tiny_lm(arch: str, tied: bool, seed: int = 0, vocab: int = V):
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=vocab, tie_word_embeddings=tied)
    if arch == "gpt2":
        # no dropout: the two models of a comparison must see the same function
        cfg = AutoConfig.for_model(
            "gpt2",
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            **common,
        )
    else:
        cfg = AutoConfig.for_model(arch, **TINY, **common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def batches(kind: str, n: int = 2, seed: int = 0, T: int = T) -> list[dict]:
    """`n` ragged micro-batches with the fields `kind`'s signal reads (teacher values random but valid)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        b = {"input_ids": torch.randint(0, V, (B, T), generator=g), "length": torch.tensor([T, T - 5 - 3 * i])}
        t_logits = 3 * torch.randn(B, T, V, generator=g)
        lp, ids = torch.log_softmax(t_logits, -1).topk(K, dim=-1)
        b["topk_ids"], b["topk_logprobs"] = ids, lp
        b["teacher_logits"] = t_logits
        draws = torch.multinomial(torch.softmax(t_logits.reshape(-1, V), -1), 10, True, generator=g)
        b["sample_ids"] = draws.reshape(B, T, 10)
        b["sample_counts"] = torch.ones(B, T, 10, dtype=torch.uint8)
        if kind == "mapped":  # some teacher ids have no student token; some positions are not aligned
            b["topk_ids"] = torch.where(torch.rand(B, T, K, generator=g) < 0.3, -1, ids)
            b["kd_mask"] = torch.rand(B, T, generator=g) < 0.7
        out.append(b)
    return out


SIGNALS = {
    "topk_bucket": lambda b, a: TopK(b["topk_ids"].reshape(-1, K), b["topk_logprobs"].reshape(-1, K), "bucket"),
    "topk_renormalize": lambda b, a: TopK(
        b["topk_ids"].reshape(-1, K), b["topk_logprobs"].reshape(-1, K), "renormalize"
    ),
    "sampled": lambda b, a: Sampled(b["sample_ids"].reshape(-1, 10), b["sample_counts"].reshape(-1, 10)),
    "online": lambda b, a: Online(b["teacher_logits"].reshape(-1, V)),
    "mapped": lambda b, a: Mapped(b["topk_ids"].reshape(-1, K), b["topk_logprobs"].reshape(-1, K)),
}
CE_KD = [Term("ce", "ce", 0.4), Term("kd", "forward_kl", 0.6)]


def window(model, plan, data, autocast=None):
    from accelerate import Accelerator

    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        result = accumulate_window(model, data, plan, Accelerator())
    return result, {n: p.grad.clone() for n, p in model.named_parameters()}


def pair(arch="llama", tied=True):
    lm = tiny_lm(arch, tied)
    fused = DistillModel(lm, [], 32)
    plain = DistillModel(copy.deepcopy(lm), [], 32, fused_head=False)
    assert fused.fused_head and not plain.fused_head and fused.fused_head_reason is None
    return fused, plain


def assert_same(a, b, atol=1e-6, rtol=1e-4):
    (ra, ga), (rb, gb) = a, b
    assert ra.raw.keys() == rb.raw.keys()
    for k in ra.raw:
        assert ra.raw[k] == pytest.approx(rb.raw[k], rel=rtol, abs=atol), k
    assert ra.agree == pytest.approx(rb.agree, abs=1e-9)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=atol, rtol=rtol, msg=n)


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", False), ("gpt2", True)])
@pytest.mark.parametrize("signal", ["topk_bucket", "topk_renormalize", "sampled", "online", "mapped"])
def test_fused_head_equals_the_models_forward_under_accumulation(arch, tied, signal):
    fused, plain = pair(arch, tied)
    plan = LossPlan(CE_KD, SIGNALS[signal], temperature=2.0 if signal != "sampled" else 1.0, chunk=7)
    data = batches(signal)
    assert_same(window(fused, plan, data), window(plain, plan, data))


@pytest.mark.parametrize(
    "terms",
    [
        [Term("ce", "ce", 0.5), Term("rkl", "reverse_kl", 0.5)],
        [Term("ce", "ce", 0.5), Term("j", "jsd", 0.3, {"beta": 0.5}), Term("t", "tvd", 0.2)],
        [Term("fkl", "forward_kl", 1.0)],
    ],
    ids=["reverse_kl", "jsd+tvd", "kd_only"],
)
def test_fused_head_equals_the_models_forward_for_other_kinds(terms):
    fused, plain = pair("llama", False)
    plan = LossPlan(terms, SIGNALS["topk_bucket"], temperature=1.5, chunk=10)
    data = batches("topk")
    assert_same(window(fused, plan, data), window(plain, plan, data))


def test_cross_tokenizer_uld_and_hybrid_terms():
    fused, plain = pair("llama", True)
    plan = LossPlan(
        [Term("ce", "ce", 0.5), Term("kd", "forward_kl", 0.5), Term("uld", "uld", 0.3)], SIGNALS["mapped"], 1.0, 9
    )
    data = batches("mapped")
    assert_same(window(fused, plan, data), window(plain, plan, data))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_head_under_autocast(dtype):
    fused, plain = pair("llama", False)
    plan = LossPlan(CE_KD, SIGNALS["topk_bucket"], 1.0, 16)
    data = batches("topk")
    a, b = window(fused, plan, data, dtype), window(plain, plan, data, dtype)
    # both compute the head in the low dtype; they differ by its rounding (the gradient of W is summed in fp32
    # over chunks here, in one low-precision product there)
    assert_same(a, b, atol=2e-3, rtol=3e-2)
    # and the low dtype really was used: not the fp32 result
    c = window(copy.deepcopy(fused), plan, data)
    assert any(not torch.allclose(a[1][n], c[1][n], atol=1e-6, rtol=1e-5) for n in a[1])


def test_eval_sums_equal_without_gradient():
    fused, plain = pair("qwen2", False)
    plan = LossPlan([Term("ce", "ce", 1.0), Term("kd", "forward_kl", 1.0)], SIGNALS["topk_bucket"], 1.0, 5)
    for b in batches("topk"):
        _, sa = micro_batch_sums(fused, b, plan, {}, with_grad=False)
        _, sb = micro_batch_sums(plain, b, plan, {}, with_grad=False)
        for k in sa:
            assert float(sa[k]) == pytest.approx(float(sb[k]), rel=1e-5), k


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor with a vocabulary-sized dimension that any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and V in t.shape:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("signal", ["topk_bucket", "online", "mapped"])
def test_no_positions_by_vocabulary_tensor_exists_on_the_fused_path(signal):
    fused, plain = pair("llama", False)
    plan = LossPlan(CE_KD, SIGNALS[signal], 2.0, 8)
    b = batches(signal, 1, T=60)[0]  # N = 120 positions: N x V is well above the head's V x H
    weights = {"ce": 1.0, "kd": 1.0}
    sizes = {}
    for name, model in (("fused", fused), ("plain", plain)):
        b_ = {k: v for k, v in b.items() if k != "teacher_logits"}
        if signal == "online":  # the teacher's own logits are the reference mode's input, not the student's
            teacher = b["teacher_logits"].reshape(-1, V)
            plan = LossPlan(CE_KD, lambda bb, a, t=teacher: Online(t), 2.0, 8)
        with _LargestTensor() as mode:
            total, _ = micro_batch_sums(model, b_, plan, weights)
            total.backward()
        sizes[name] = mode.largest
    n_by_v = B * 60 * V
    assert sizes["plain"] >= n_by_v  # the check can fail: the model's own forward makes [N, V] logits
    assert sizes["fused"] == V * 32, sizes  # the head's weight and its gradient; chunks are [8, V]; never [N, V]


def test_models_the_fused_head_does_not_understand_fall_back_with_a_reason():
    from transformers import AutoConfig, AutoModelForCausalLM

    gemma = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            "gemma2",
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            final_logit_softcapping=30.0,
        )
    )
    assert "final_logit_softcapping=30.0" in head_fallback_reason(gemma)
    m = DistillModel(gemma, [], 32)
    assert not m.fused_head and "softcapping" in m.fused_head_reason

    # post-processing no config field names: caught by the probe
    lm = tiny_lm("llama", False)
    original = lm.forward

    def scaled(*a, **k):
        out = original(*a, **k)
        out.logits = out.logits * 0.5
        return out

    lm.forward = scaled
    assert "differ from head(body(x))" in head_fallback_reason(lm)

    # a head that is not a plain Linear
    lm = tiny_lm("llama", False)
    lm.lm_head = torch.nn.Sequential(lm.lm_head)
    assert "not a plain torch.nn.Linear" in head_fallback_reason(lm)

    # the fallback trains on the model's own forward (same result as fused_head=False)
    fused = DistillModel(lm, [], 32)
    plain = DistillModel(copy.deepcopy(lm), [], 32, fused_head=False)
    plan = LossPlan(CE_KD, SIGNALS["topk_bucket"], 1.0, 8)
    data = batches("topk")
    assert_same(window(fused, plan, data), window(plain, plan, data), atol=0, rtol=0)


def test_fused_head_under_gradient_checkpointing():
    fused, plain = pair("llama", True)
    for m in (fused, plain):
        (getattr(m.lm, "activation_checkpointing_enable", None) or m.lm.gradient_checkpointing_enable)()
        m.train()
    plan = LossPlan(CE_KD, SIGNALS["topk_bucket"], 1.0, 8)
    data = batches("topk")
    assert_same(window(fused, plan, data), window(plain, plan, data))


def test_the_trainer_says_whether_the_head_is_fused(tiny_cache, tmp_path, capsys):
    from test_train import make_cfg

    from kd import train_student

    train_student.main(
        make_cfg(tiny_cache, tmp_path / "a", **{"train.max_steps": 2, "train.eval_every": 2, "train.warmup_steps": 1})
    )
    assert "[student] LM head fused into the loss: 128 positions at a time" in capsys.readouterr().out
    granite = (  # Granite divides its logits by logits_scaling: not head(body(x))
        "{model_type: granite, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
        "num_key_value_heads: 2, max_position_embeddings: 128, logits_scaling: 4.0}"
    )
    extra = {
        "train.max_steps": 2,
        "train.eval_every": 2,
        "train.warmup_steps": 1,
        "student.config": granite,
        "loss.feature_layers": "[[1, 0]]",
    }
    run = train_student.main(make_cfg(tiny_cache, tmp_path / "b", **extra))
    out = capsys.readouterr().out
    assert "[student] LM head not fused into the loss" in out and "logits_scaling=4.0" in out
    assert (run / "final" / "config.json").exists()


def test_padding_beyond_the_longest_sequence_is_not_computed():
    from kd.train.step import trim_padding

    b = {
        "input_ids": torch.zeros(2, 10, dtype=torch.long),
        "length": torch.tensor([6, 4]),
        "hidden_states": torch.zeros(2, 3, 10, 5),
        "sequence_index": torch.tensor([0, 1]),
    }
    t = trim_padding(b)
    assert (
        t["input_ids"].shape == (2, 6) and t["hidden_states"].shape == (2, 3, 6, 5) and t["length"].tolist() == [6, 4]
    )
    # computing the padding or not: the same losses and gradients (micro_batch_sums itself does not trim)
    fused, _ = pair("llama", False)
    other = copy.deepcopy(fused)
    plan = LossPlan(CE_KD, SIGNALS["topk_bucket"], 1.0, 8)
    x = dict(batches("topk", 1)[0], length=torch.tensor([T - 6, T - 9]))
    assert trim_padding(x)["input_ids"].shape[1] == T - 6
    results = []
    for model, batch in ((fused, x), (other, trim_padding(x))):
        total, sums = micro_batch_sums(model, batch, plan, {"ce": 1.0, "kd": 1.0})
        total.backward()
        results.append((sums, {n: p.grad for n, p in model.named_parameters()}))
    for k in results[0][0]:
        assert float(results[0][0][k]) == pytest.approx(float(results[1][0][k]), rel=1e-5), k
    for n in results[0][1]:
        torch.testing.assert_close(results[0][1][n], results[1][1][n], atol=1e-6, rtol=1e-4, msg=n)


def test_eval_on_text_is_the_same_with_the_head_chunked_or_not(tokenizer_dir, corpus_dir):
    import numpy as np
    from transformers import AutoTokenizer

    from kd.textscore import score_windows, text_windows

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    windows, sep = text_windows(tok, [str(sorted(corpus_dir.glob("*.txt"))[0])], 32, max_sequences=6)
    lm = tiny_lm("llama", False, vocab=len(tok))
    chunked = score_windows(lm, tok, windows, sep, batch_size=4, chunk=7)
    whole = copy.deepcopy(lm)
    whole.lm_head = torch.nn.Sequential(whole.lm_head)  # not a plain Linear: the model's own forward, full logits
    assert head_fallback_reason(whole) is not None
    np.testing.assert_allclose(chunked, score_windows(whole, tok, windows, sep, batch_size=4), rtol=1e-5)
    assert chunked[1] > 0 and chunked[0] > 0
