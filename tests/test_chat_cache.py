"""Chat data through the whole path: conversation records -> rendered, masked, packed windows -> the teacher pass
(each conversation attending only to itself) -> the cache's loss_mask and segments -> the trainer's losses and
eval counted on the assistant's tokens only, with the one global normalisation."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, make_text, torchrun
from test_train import overrides

from kd import cache_teacher, train_student
from kd.cache import FORMAT_VERSION, TeacherCache
from kd.cache_config import CacheConfig
from kd.config import load_config
from kd.data.chat import conversation, render
from kd.errors import KDError
from kd.models import load_tokenizer
from kd.textscore import chat_targets
from kd.train import read_metrics
from kd.train.model import build_student

TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '<|endoftext|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)


def short(seed: int, words: int) -> str:
    return " ".join(make_text(seed, words).split()[:words])


def conversations(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        turns = [{"role": "system", "content": "Be brief."}] if i % 4 == 0 else []
        for k in range(rng.randint(1, 2)):  # short: ~20-90 tokens of the tiny tokenizer, all within a window
            turns += [
                {"role": "user", "content": short(seed * 1000 + 10 * i + k, rng.randint(1, 4))},
                {"role": "assistant", "content": short(seed * 1000 + 10 * i + k + 5, rng.randint(1, 5))},
            ]
        out.append({"messages": turns})
    return out


@pytest.fixture(scope="session")
def chat_teacher(tmp_path_factory, tokenizer_dir) -> Path:
    """The tiny Llama teacher, its tokenizer given a chat template (the conftest tokenizer has none)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = TEMPLATE
    torch.manual_seed(102)
    out = tmp_path_factory.mktemp("chat_teacher")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **TINY)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def chat_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("chat_data")
    with open(d / "train.jsonl", "w") as f:
        for r in conversations(48, 0):
            f.write(json.dumps(r) + "\n")
    with open(d / "eval.jsonl", "w") as f:
        for r in conversations(12, 1):
            f.write(json.dumps(r) + "\n")
    return d


def chat_overrides(teacher: Path, data: Path, out: Path, **extra) -> list[str]:
    base = {
        "teacher.model": str(teacher),
        "teacher.batch_size": 4,
        "data.files": f"[{data}/train.jsonl]",
        "data.eval_files": f"[{data}/eval.jsonl]",
        "data.format": "chat",
        "data.seq_len": 128,
        "cache.output_dir": str(out),
        "cache.top_k": 16,
        "cache.logprob_codec": "fp32",
        "cache.hidden_layers": "[0, 2]",
        "cache.store_text": "false",
        "cache.sample_n": 8,
        "cache.sequences_per_shard": 8,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def make_chat_cache(teacher, data, out, **extra) -> Path:
    return cache_teacher.main(load_config(CacheConfig, None, chat_overrides(teacher, data, out, **extra)))


@pytest.fixture(scope="session")
def chat_caches(tmp_path_factory, chat_teacher, chat_files) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat_caches")
    return {
        p: make_chat_cache(chat_teacher, chat_files, root / p, **{"data.packing": p})
        for p in ("first_fit", "one_per_window")
    }


def windows(cache: Path, split: str) -> list[dict]:
    s = TeacherCache(cache).split(split, ("input_ids", "topk_ids", "topk_logprobs", "loss_mask", "segments"))
    return [s[i] for i in range(len(s))]


def pieces(w: dict) -> list[tuple[list[int], list[bool], slice]]:
    """(ids, mask, positions) of each conversation of a window, in order."""
    seg, n = w["segments"].numpy(), int(w["length"])
    out = []
    for c in range(1, int(seg[:n].max()) + 1):
        where = np.flatnonzero(seg == c)
        assert (np.diff(where) == 1).all()  # a conversation is one contiguous run
        sl = slice(int(where[0]), int(where[-1]) + 1)
        out.append((w["input_ids"][sl].tolist(), w["loss_mask"][sl].tolist(), sl))
    assert (seg[n:] == 0).all() and (seg[:n] > 0).all()  # padding after the last conversation only
    return out


def test_every_conversation_is_cached_whole_once_with_its_assistant_mask(chat_caches, chat_teacher, chat_files):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_teacher)
    for split, name in (("train", "train.jsonl"), ("eval", "eval.jsonl")):
        expected = sorted(
            (r.input_ids, r.mask)
            for r in (render(tok, conversation(json.loads(line))) for line in open(chat_files / name))
        )
        for packing, cache in chat_caches.items():
            got = sorted((ids, mask) for w in windows(cache, split) for ids, mask, _ in pieces(w))
            assert got == [(i, [bool(x) for x in m]) for i, m in expected], (split, packing)
    m_ff, m_one = (TeacherCache(chat_caches[p]).manifest for p in ("first_fit", "one_per_window"))
    assert m_one["splits"]["train"]["num_sequences"] == 48  # one conversation per window
    assert m_ff["splits"]["train"]["num_sequences"] <= 0.7 * 48  # first fit: several per window
    assert m_ff["format_version"] == FORMAT_VERSION and m_ff["chat"]["loss_mask"] == "assistant"
    assert m_ff["ingest"]["truncated"] == m_ff["ingest"]["dropped"] == 0


def test_the_teacher_sees_each_packed_conversation_alone(chat_caches, chat_teacher):
    """Cached targets at a conversation's positions equal the teacher run on that conversation by itself: packing
    lets no conversation attend to another."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(chat_teacher).eval()
    checked = 0
    packed = [w for w in windows(chat_caches["first_fit"], "train") if len(pieces(w)) >= 2][:4]
    assert len(packed) == 4
    for w in packed:
        for ids, _, sl in pieces(w):
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            top = lp.topk(16, -1)
            torch.testing.assert_close(w["topk_logprobs"][sl].float(), top.values, atol=2e-5, rtol=1e-5)
            checked += 1
    assert checked >= 8


def test_positions_count_only_assistant_targets_within_a_conversation():
    from kd.train.step import positions

    batch = {
        "input_ids": torch.arange(8)[None],
        "length": torch.tensor([7]),
        # tokens 0-3 one conversation (2, 3 the assistant's), 4-6 another (5, 6), 7 padding
        "loss_mask": torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool),
        "segments": torch.tensor([[1, 1, 1, 1, 2, 2, 2, 0]]),
    }
    _, mask, targets = positions(batch)
    # position t predicts token t+1: 1->2, 2->3 in the first; 4->5, 5->6 in the second; 3->4 crosses conversations
    assert mask[0].tolist() == [False, True, True, False, True, True, False, False]
    assert targets[0, :7].tolist() == list(range(1, 8))
    assert chat_targets(batch["loss_mask"].numpy(), batch["segments"].numpy())[0].tolist() == [
        False, False, True, True, False, True, True, False,
    ]  # fmt: skip


def train_overrides(cache: Path, out: Path, **extra) -> list[str]:
    """test_train's run, shorter: 4 steps, an eval every 2, no checkpoints."""
    short = {"train.max_steps": 4, "train.warmup_steps": 1, "train.eval_every": 2, "train.checkpoint_every": 0}
    return overrides(cache, out, **{**short, **extra})


def train(cache: Path, out: Path, **extra) -> Path:
    from kd.train_config import TrainConfig

    return train_student.main(load_config(TrainConfig, None, train_overrides(cache, out, **extra)))


def test_student_eval_is_the_same_packed_or_one_per_window(chat_caches, tmp_path):
    """The same held-out conversations, packed first-fit or one per window: the untrained student's eval (CE and
    bits per character over the assistant's tokens, KD and top-1 agreement against the cached teacher) and the
    teacher's own score agree, so packing changes nothing the model sees; eval/tokens is the cached mask's count."""
    evals = {}
    for packing, cache in chat_caches.items():
        run = train(cache, tmp_path / packing, **{"train.max_steps": 2, "train.eval_every": 2})
        evals[packing] = next(r for r in read_metrics(run) if r.get("step") == 0 and "eval/ce" in r)
        scored = sum(int(chat_targets(w["loss_mask"][None], w["segments"][None]).sum()) for w in windows(cache, "eval"))
        assert evals[packing]["eval/tokens"] == scored
    a, b = evals["first_fit"], evals["one_per_window"]
    for key in ("eval/ce", "eval/kd", "eval/top1_agreement", "eval/bits_per_char", "eval/tokens"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
    sa, sb = (TeacherCache(chat_caches[p]).manifest["splits"]["eval"]["teacher_score"] for p in chat_caches)
    assert sa["tokens"] == sb["tokens"] == a["eval/tokens"] and sa["chars"] == sb["chars"]
    assert sa["nats"] == pytest.approx(sb["nats"], rel=1e-6)


def _window_grads(cache: Path, micro_batch: int, accumulation: int) -> dict[str, torch.Tensor]:
    from accelerate import Accelerator

    from kd.train import DistillModel, accumulate_window
    from kd.train_config import TrainConfig

    cfg = load_config(TrainConfig, None, train_overrides(cache, Path("/nonexistent")))
    c = TeacherCache(cache)
    split = c.split("train")  # every stored field: the chat mask and segments among them
    items = [split[i] for i in range(8)]
    batches = [torch.utils.data.default_collate(items[i : i + micro_batch]) for i in range(0, 8, micro_batch)]
    torch.manual_seed(0)
    lm = build_student(cfg, load_tokenizer(c.manifest["teacher"]["name_or_path"]), 0)
    model = DistillModel(lm, cfg.loss.feature_layers, c.manifest["teacher"]["hidden_size"])
    accumulate_window(model, batches, cfg.loss, Accelerator(), [0, 1])
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulation_with_masks_gives_the_gradient_of_one_big_batch(chat_caches):
    cache = chat_caches["first_fit"]
    assert "loss_mask" in TeacherCache(cache).split("train")[0]
    a, b = _window_grads(cache, 2, 4), _window_grads(cache, 8, 1)
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-4, msg=n)


def test_two_processes_match_one_process_on_chat(chat_caches, tmp_path):
    cache = chat_caches["first_fit"]
    result = torchrun(ROOT / "train_student.py", *train_overrides(cache, tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    one = train(cache, tmp_path / "one", **{"train.gradient_accumulation_steps": 4})
    a, b = read_metrics(one), read_metrics(tmp_path / "two" / "r")
    keys = ("loss", "ce", "kd", "feature", "grad_norm", "tokens_seen", "eval/ce", "eval/bits_per_char")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in set(keys) & ra.keys():
            assert rb[key] == pytest.approx(ra[key], rel=2e-4), (ra["step"], key)
    assert any("eval/ce" in r for r in a) and any("feature" in r for r in a)


def test_prompt_completion_records_and_the_completion_mask(tmp_path, chat_teacher):
    from transformers import AutoTokenizer

    data = tmp_path / "d"
    data.mkdir()
    recs = [{"prompt": short(i, 6), "completion": short(i + 50, 6)} for i in range(30)]
    for name, rs in (("train.jsonl", recs[:24]), ("eval.jsonl", recs[24:])):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rs))
    cache = make_chat_cache(chat_teacher, data, tmp_path / "c", **{"data.loss_mask": "completion"})
    tok = AutoTokenizer.from_pretrained(chat_teacher)
    got = sorted(tuple(ids) for w in windows(cache, "eval") for ids, _, _ in pieces(w))
    expected = sorted(tuple(render(tok, conversation(r), None, "completion").input_ids) for r in recs[24:])
    assert got == expected
    for w in windows(cache, "eval"):
        for ids, mask, _ in pieces(w):
            assert tok.decode([i for i, m in zip(ids, mask) if m]).endswith("<|endoftext|>")


def test_malformed_conversations_are_refused_by_line_or_skipped_and_counted(tmp_path, chat_teacher, chat_files):
    data = tmp_path / "d"
    data.mkdir()
    lines = open(chat_files / "train.jsonl").read().splitlines()
    lines[2] = json.dumps({"messages": [{"role": "user", "content": "only a question"}]})
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    (data / "eval.jsonl").write_text(open(chat_files / "eval.jsonl").read())
    with pytest.raises(KDError, match=r"train.jsonl, line 3: the last turn is the user's.*data.bad_records=skip"):
        make_chat_cache(chat_teacher, data, tmp_path / "a")
    cache = make_chat_cache(chat_teacher, data, tmp_path / "b", **{"data.bad_records": "skip"})
    m = TeacherCache(cache).manifest
    assert m["ingest"]["bad_records"] == 1 and m["ingest"]["documents"] == 47 + 12


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"data.files": "[{corpus}/play0.txt]", "data.eval_files": "[{corpus}/heldout/*.txt]"}, "not conversation"),
        ({"data.chat_template": "/no/such/template.jinja"}, "neither a Jinja template"),
    ],
)
def test_chat_input_errors(tmp_path, chat_teacher, chat_files, corpus_dir, extra, message):
    extra = {k: v.format(corpus=corpus_dir) for k, v in extra.items()}
    with pytest.raises(KDError, match=message):
        make_chat_cache(chat_teacher, chat_files, tmp_path / "c", **extra)


def test_a_tokenizer_without_a_template_needs_one_from_the_config(tmp_path, llama_teacher, chat_files):
    with pytest.raises(KDError, match="has no chat template: give one with data.chat_template"):
        make_chat_cache(llama_teacher, chat_files, tmp_path / "a")
    (tmp_path / "chat.jinja").write_text(TEMPLATE)  # a file path; a template string works the same in YAML
    cache = make_chat_cache(
        llama_teacher, chat_files, tmp_path / "b", **{"data.chat_template": tmp_path / "chat.jinja"}
    )
    assert TeacherCache(cache).manifest["chat"]["template"] == "data.chat_template"
    from kd.data.chat import chat_template

    assert chat_template(str(tmp_path / "chat.jinja")) == chat_template(TEMPLATE) == TEMPLATE


def test_a_model_that_lets_conversations_see_each_other_is_refused():
    from types import SimpleNamespace

    from kd.models import packing_fallback_reason

    class Leaky(torch.nn.Module):
        """Logits from a running mean of the embeddings: ignores position ids, so it mixes conversations."""

        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(vocab_size=50)
            self.emb = torch.nn.Embedding(50, 50)

        def forward(self, input_ids, position_ids=None, use_cache=None):
            e = self.emb(input_ids)
            n = torch.arange(1, e.shape[1] + 1)[None, :, None]
            return SimpleNamespace(logits=e.cumsum(1) / n)

    assert "lets one conversation see another" in packing_fallback_reason(Leaky())


def test_text_caches_carry_no_mask(tiny_cache):
    item = TeacherCache(tiny_cache).split("train")[0]
    assert "loss_mask" not in item and "segments" not in item
    assert "loss_mask" not in TeacherCache(tiny_cache).manifest["codecs"]
    assert TeacherCache(tiny_cache).info.chat is None  # the typed manifest: a text cache has no chat part


def test_a_chat_cache_describes_its_masks_in_the_typed_manifest(chat_caches):
    for packing, cache in chat_caches.items():
        chat = TeacherCache(cache).info.chat
        assert (chat.packing, chat.loss_mask, chat.template) == (packing, "assistant", "the tokenizer's own")
        assert chat.template_text and "conversation" in chat.attention


def test_each_eval_writes_greedy_replies_to_held_out_prompts(chat_caches, chat_files, tmp_path):
    from kd.report import plot
    from kd.train.generations import read_generations

    run = train(chat_caches["first_fit"], tmp_path, **{"train.eval_generations": 2, "train.generation_tokens": 6})
    got = read_generations(run)
    assert [(r["step"], r["index"]) for r in got] == [(s, i) for s in (0, 2, 4) for i in (0, 1)]
    first = conversation(json.loads(open(chat_files / "eval.jsonl").readline()))  # the eval split's first window
    reply = next(t["content"] for t in first if t["role"] == "assistant")
    refs = {r["reference"] for r in got if r["index"] == 0}
    assert refs == {reply + "<|endoftext|>"} and got[0]["prompt"].endswith("### assistant:\n")
    for r in got:  # greedy from the student: at most 6 new tokens
        assert isinstance(r["student"], str) and 1 <= r["student_tokens"] <= 6
    assert plot(run).stat().st_size > 0


def test_the_eval_command_scores_the_teacher_as_its_cache_does(chat_caches, chat_teacher):
    """`python -m kd.evaluate TEACHER --cache CHAT_CACHE`: the teacher's CE and bits per character on the
    assistant's tokens equal its own score recorded in the manifest, packed or not (its KD to itself is 0)."""
    from kd.evaluate import on_cache

    for cache in chat_caches.values():
        metrics, teacher = on_cache(str(chat_teacher), str(cache), "eval", None, 4, "fp32")
        assert metrics["eval/tokens"] == teacher["tokens"]
        assert metrics["eval/ce"] == pytest.approx(teacher["ce_per_token"], rel=1e-5)
        assert metrics["eval/bits_per_char"] == pytest.approx(teacher["bits_per_char"], rel=1e-5)
        assert metrics["eval/top1_agreement"] == pytest.approx(1.0)


def _student_and_batch(cache: Path, n: int = 4):
    from kd.train import DistillModel
    from kd.train_config import TrainConfig

    cfg = load_config(TrainConfig, None, train_overrides(cache, Path("/nonexistent")))
    c = TeacherCache(cache)
    split = c.split("train")
    packed = [split[i] for i in range(len(split)) if int(split[i]["segments"].max()) >= 2][:n]
    torch.manual_seed(0)
    lm = build_student(cfg, load_tokenizer(c.manifest["teacher"]["name_or_path"]), 0)
    model = DistillModel(lm, cfg.loss.feature_layers, c.manifest["teacher"]["hidden_size"])
    return cfg, model, torch.utils.data.default_collate(packed)


def test_changing_one_conversation_changes_no_other_in_the_student(chat_caches):
    from kd.train.step import model_inputs, positions

    _, model, batch = _student_and_batch(chat_caches["first_fit"])
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    first = batch["segments"] == 1
    changed["input_ids"][first] = (changed["input_ids"][first] * 7 + 3) % 300  # rewrite every first conversation
    outs = []
    for b in (batch, changed):
        attention, _, _ = positions(b)
        mask, pos = model_inputs(b, attention)
        with torch.no_grad():
            outs.append(model(b["input_ids"], mask, position_ids=pos)[0])
    others = (batch["segments"] >= 2)[..., None].expand_as(outs[0])
    torch.testing.assert_close(outs[0][others], outs[1][others], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs[0][first], outs[1][first])  # the rewritten one did change


@pytest.mark.parametrize("target", ["topk", "sampled"])
def test_teacher_targets_outside_the_mask_change_no_loss_and_no_gradient(chat_caches, target):
    """Scramble the cached teacher (top-k, samples, hidden states) at every position the loss mask leaves out: the
    losses, metrics and every gradient stay the same."""
    from accelerate import Accelerator

    from kd.train import accumulate_window
    from kd.train.step import LossPlan, positions

    cfg, model, batch = _student_and_batch(chat_caches["first_fit"])
    _, mask, _ = positions(batch)
    assert 0 < int(mask.sum()) < int(mask.numel() * 0.6)  # the mask really leaves positions out
    scrambled = dict(batch)
    g = torch.Generator().manual_seed(1)
    out = ~mask
    for k in ("topk_ids", "sample_ids"):
        scrambled[k] = batch[k].clone()
        scrambled[k][out] = torch.randint(0, 300, scrambled[k][out].shape, generator=g)
    scrambled["topk_logprobs"] = batch["topk_logprobs"].clone()
    scrambled["topk_logprobs"][out] = -torch.rand(scrambled["topk_logprobs"][out].shape, generator=g) * 9
    scrambled["hidden_states"] = batch["hidden_states"].clone()
    scrambled["hidden_states"].transpose(1, 2)[out] = torch.randn(
        scrambled["hidden_states"].transpose(1, 2)[out].shape, generator=g
    ).to(batch["hidden_states"].dtype)
    cfg.loss.target = target
    plan = LossPlan.build(cfg.loss, [0, 1])
    results, grads = [], []
    for b in (batch, scrambled):
        model.zero_grad(set_to_none=True)
        results.append(accumulate_window(model, [b], plan, Accelerator()))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert results[0].raw == pytest.approx(results[1].raw, rel=1e-6) and results[0].agree == results[1].agree
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


def test_conversations_read_the_same_from_every_source(tmp_path, chat_files):
    """jsonl, a JSON array, Parquet (turns as a list of structs), CSV (prompt/completion columns) and a Hugging Face
    dataset (save_to_disk, streamed or not) yield the same checked conversations."""
    import csv

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kd.data.chat import ChatFields
    from kd.data.sources import Piece, Records, plan_hf_units, read_piece

    recs = [json.loads(line) for line in open(chat_files / "eval.jsonl")]
    chat = Records(chat=ChatFields())
    expected = [conversation(r) for r in recs]

    def read(path: Path) -> list:
        return [d for d, _ in read_piece(Piece(str(path), 0, path.stat().st_size), chat, "strict")]

    assert read(chat_files / "eval.jsonl") == expected
    (tmp_path / "a.json").write_text(json.dumps(recs))
    assert read(tmp_path / "a.json") == expected
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "a.parquet")
    assert read(tmp_path / "a.parquet") == expected
    pairs = [{"prompt": short(i, 5), "completion": short(i + 9, 5)} for i in range(5)]
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "completion"])
        w.writeheader()
        w.writerows(pairs)
    assert read(tmp_path / "a.csv") == [conversation(p) for p in pairs]
    datasets.Dataset.from_list(recs).save_to_disk(tmp_path / "ds")
    for streaming in (False, True):
        ds = datasets.load_from_disk(str(tmp_path / "ds"))
        ds = ds.to_iterable_dataset() if streaming else ds
        got = [d for u in plan_hf_units(ds, "dataset", chat, 10**6, "main") for d, _ in u.documents_fn()]
        assert got == expected, streaming


def test_a_chat_cache_on_two_processes_equals_one(chat_caches, chat_teacher, chat_files, tmp_path):
    """Several units (data.unit_bytes below the train file's size), two processes: the same shards, byte for byte,
    as the one-process cache, and the same chat counts."""
    from kd.cache import MANIFEST, shard_records

    extra = {"data.unit_bytes": 3000}
    one = make_chat_cache(chat_teacher, chat_files, tmp_path / "one", **extra)
    result = torchrun(ROOT / "cache_teacher.py", *chat_overrides(chat_teacher, chat_files, tmp_path / "two", **extra))
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    ma, mb = (json.loads((d / MANIFEST).read_text()) for d in (one, two))
    assert ma["ingest"]["units"] > 2 and "on 2 process(es)" in result.stdout
    for split in ("train", "eval"):
        assert [s["sha256"] for s in shard_records(one, ma, split)] == [
            s["sha256"] for s in shard_records(two, mb, split)
        ]
    for k in ("truncated", "tokens_cut", "dropped", "window_tokens", "documents"):
        assert ma["ingest"][k] == mb["ingest"][k], k


def test_a_chat_cache_exports_its_mask_and_positions(chat_caches, tmp_path):
    import datasets

    from kd.cache.export import export

    cache = chat_caches["first_fit"]
    out = export(cache, tmp_path / "x", log=lambda *_: None)
    ds = datasets.load_dataset(str(out))
    for split in ("train", "eval"):
        items = windows(cache, split)
        assert len(ds[split]) == len(items)
        for row, w in zip(ds[split], items):
            n = int(w["length"])
            assert row["loss_mask"] == w["loss_mask"][:n].int().tolist()
            starts = [i for i in range(n) if i == 0 or w["segments"][i] != w["segments"][i - 1]]
            assert [i for i, p in enumerate(row["position_ids"]) if p == 0] == starts
