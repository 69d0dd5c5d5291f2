"""Cross-tokenizer chat on the REAL tokenizers: a student with another tokenizer renders each cached conversation
with its own template (or the teacher's), masks its own assistant tokens, and is aligned to the teacher on the
messages. Models are tiny and random; the tokenizers and SmolLM2's template are the real ones."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import TINY, _save_model
from test_chat_cache import make_chat_cache, train
from test_cross_tokenizer import PARAGRAPH, qwen_teacher  # noqa: F401 - a fixture used below

from kd import align
from kd.cache import TeacherCache
from kd.textscore import chat_targets
from kd.train import read_metrics

WORDS = PARAGRAPH.replace(";", "").replace(",", "").replace(".", "").split()
# a ChatML variant with its own default system prompt and another header: a template that is not the teacher's
OTHER_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou answer plainly.<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' says\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant says\\n' }}{% endif %}"
)


# the chat tests' student with room for these windows (160 teacher tokens; a student's may be longer)
STUDENT = (
    "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
    "num_key_value_heads: 2, max_position_embeddings: 512}"
)


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + rng.choice(".!?")


@pytest.fixture(scope="session")
def english_chat(tmp_path_factory) -> Path:
    rng = random.Random(3)
    d = tmp_path_factory.mktemp("english_chat")
    for name, n in (("train.jsonl", 24), ("eval.jsonl", 8)):
        with open(d / name, "w") as f:
            for i in range(n):
                turns = [{"role": "system", "content": "Speak as a king."}] if i % 3 == 0 else []
                for _ in range(rng.randint(1, 2)):
                    turns += [
                        {"role": "user", "content": sentence(rng, rng.randint(3, 8))},
                        {"role": "assistant", "content": sentence(rng, rng.randint(3, 10)) + " Ay, é."},
                    ]
                f.write(json.dumps({"messages": turns}) + "\n")
    return d


@pytest.fixture(scope="session")
def smol_chat_teacher(tmp_path_factory, real_tokenizers) -> Path:
    """A tiny Llama with the real SmolLM2 tokenizer and its own (ChatML) template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49_152, **dict(TINY, max_position_embeddings=256))
    return _save_model(
        LlamaForCausalLM, cfg, real_tokenizers[2]["smollm2-135m-instruct"], tmp_path_factory.mktemp("smol_t"), 103
    )


@pytest.fixture(scope="session")
def smol_chat_cache(tmp_path_factory, smol_chat_teacher, english_chat) -> Path:
    out = tmp_path_factory.mktemp("smol_chat_cache") / "c"
    return make_chat_cache(
        smol_chat_teacher,
        english_chat,
        out,
        **{"cache.store_text": "true", "data.seq_len": 160, "cache.hidden_layers": "[]"},
    )


def alignment(cache: Path, tok, folder: Path, template=None) -> align.Alignment:
    folder.mkdir()
    record = align.build_alignment(TeacherCache(cache), "train", tok, tok.eos_token_id, folder, template)
    return align.read_alignment(folder, "train", record, tok.eos_token_id)


def test_the_teacher_itself_aligns_as_the_identity(smol_chat_cache, real_tokenizers, tmp_path):
    """A 'student' with the teacher's tokenizer and template: the same ids, loss mask and conversations as the
    cache, and every position the loss counts (one that predicts an assistant token) aligned to itself. Template
    text between messages aligns to nothing (alignment is on the messages), and no loss counts there."""
    smol = real_tokenizers[1]
    a = alignment(smol_chat_cache, smol, tmp_path / "a")
    split = TeacherCache(smol_chat_cache).split("train", ("input_ids", "loss_mask", "segments"))
    for i in range(len(split)):
        it, n = split[i], int(split[i]["length"])
        w = a.window(i)
        assert len(w["input_ids"]) == n
        np.testing.assert_array_equal(w["input_ids"], it["input_ids"][:n].numpy())
        counted = np.zeros(n, bool)
        counted[:-1] = chat_targets(it["loss_mask"][None, :n].numpy(), it["segments"][None, :n].numpy())[0, 1:]
        assert counted.any()
        np.testing.assert_array_equal(w["teacher_pos"][counted], np.arange(n)[counted])
        assert set(w["teacher_pos"][~counted].tolist()) <= set(range(n)) | {-1}
        np.testing.assert_array_equal(w["loss_mask"], it["loss_mask"][:n].numpy())
        np.testing.assert_array_equal(w["segments"], it["segments"][:n].numpy())


def test_cross_mode_with_the_teachers_tokenizer_equals_plain_kd_on_chat(smol_chat_cache, tmp_path):
    common = {
        "student.config": STUDENT,
        "train.max_steps": 3,
        "loss.alpha_feature": 0,
        "loss.target": "topk",
        "loss.feature_layers": "[]",
    }
    plain = read_metrics(train(smol_chat_cache, tmp_path / "a", **common))
    cross = read_metrics(train(smol_chat_cache, tmp_path / "b", **{"loss.cross_tokenizer": "mapped", **common}))
    steps = [(a, b) for a, b in zip(plain, cross) if "loss" in a]
    assert len(steps) == 3
    for a, b in steps:
        for key in ("ce", "kd", "loss", "grad_norm", "tokens_seen"):
            assert b[key] == pytest.approx(a[key], rel=2e-4), key


def _check_student_view(cache: Path, tok, template, assistant_marker: str, folder: Path) -> float:
    """The student's mask covers exactly its assistant contents and end-of-turn tokens; returns the share of its
    scored targets (assistant tokens) whose predicting position is aligned to a teacher position."""
    a = alignment(cache, tok, folder, template)
    scored = aligned = 0
    for i in range(len(a)):
        w = a.window(i)
        ids, mask, seg, pos = w["input_ids"], w["loss_mask"], w["segments"], w["teacher_pos"]
        text = tok.decode(ids.tolist())
        assert assistant_marker in text
        runs = [tok.decode(ids[j:k].tolist()) for j, k in _runs(mask)]
        assert runs and all(r.endswith("<|im_end|>") for r in runs), runs
        targets = chat_targets(mask[None], seg[None])[0]
        scored += int(targets.sum())
        aligned += int((pos[:-1][targets[1:]] >= 0).sum())  # position t predicts target t + 1
    return aligned / scored


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    out, start = [], None
    for j, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = j
        elif not m and start is not None:
            out.append((start, j))
            start = None
    return out


def test_a_qwen_tokenizer_student_masks_its_own_assistant_tokens_and_aligns_on_the_messages(
    smol_chat_cache, real_tokenizers, tmp_path
):
    qwen = real_tokenizers[0]
    assert not qwen.chat_template  # the offline Qwen tokenizer has none: the teacher's template is used
    teacher_template = TeacherCache(smol_chat_cache).manifest["chat"]["template_text"]
    share = _check_student_view(smol_chat_cache, qwen, teacher_template, "<|im_start|>assistant\n", tmp_path / "a")
    assert share > 0.9, share
    # another template (other headers, a default system prompt): still aligned on the messages themselves
    share = _check_student_view(smol_chat_cache, qwen, OTHER_TEMPLATE, "<|im_start|>assistant says\n", tmp_path / "b")
    assert share > 0.9, share


def test_a_student_with_another_tokenizer_and_template_trains_on_a_chat_cache(
    smol_chat_cache, real_tokenizers, tmp_path, capsys
):
    qwen_dir = real_tokenizers[2]["qwen-tokenizer"]
    (tmp_path / "t.jinja").write_text(OTHER_TEMPLATE)
    extra = {
        "student.config": STUDENT,
        "student.tokenizer": qwen_dir,
        "student.chat_template": str(tmp_path / "t.jinja"),
        "loss.cross_tokenizer": "mapped",
        "loss.alpha_feature": 0,
        "loss.feature_layers": "[]",
        "loss.target": "topk",
        "train.eval_generations": 1,
        "train.generation_tokens": 4,
    }
    run = train(smol_chat_cache, tmp_path / "r", **extra)
    assert "[cross-tokenizer] mapped:" in capsys.readouterr().out
    records = read_metrics(run)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4 and all(np.isfinite(r["kd"]) and r["kd"] > 0 for r in steps)
    first_eval = next(r for r in records if "eval/ce" in r)
    # eval counts the student's own assistant targets
    from kd.train.generations import read_generations

    gen = read_generations(run)
    assert gen and gen[0]["prompt"].endswith("<|im_start|>assistant says\n")
    assert first_eval["eval/tokens"] > 0


def test_the_original_pair_on_chat_a_qwen_teacher_and_a_smollm2_student(
    qwen_teacher,
    english_chat,
    real_tokenizers,
    tmp_path,  # noqa: F811
):
    """The Qwen-vocabulary teacher has no chat template (the offline tokenizer): it renders with one from the
    config; the SmolLM2-tokenizer student renders with its own, and trains."""
    smol = real_tokenizers[1]
    cache = make_chat_cache(
        qwen_teacher,
        english_chat,
        tmp_path / "c",
        **{
            "cache.store_text": "true",
            "data.chat_template": _template_file(tmp_path, smol.chat_template),
            "cache.hidden_layers": "[]",
        },
    )
    run = train(
        cache,
        tmp_path / "r",
        **{
            "student.config": STUDENT,
            "student.tokenizer": real_tokenizers[2]["smollm2-135m-instruct"],
            "loss.cross_tokenizer": "mapped",
            "loss.alpha_feature": 0,
            "loss.feature_layers": "[]",
            "loss.target": "topk",
        },
    )
    steps = [r for r in read_metrics(run) if "loss" in r]
    assert len(steps) == 4 and all(np.isfinite(r["loss"]) and r["kd"] > 0 for r in steps)


def _template_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "teacher.jinja"
    path.write_text(text)
    return str(path)


def test_a_conversation_cut_by_the_window_is_cut_at_the_same_message_point():
    contents_t = [[10, 20], [40, 60]]
    contents_s = [[5, 15], [30, 50]]
    assert align._student_cut(60, contents_t, contents_s) == float("inf")  # the last message kept whole
    assert align._student_cut(45, contents_t, contents_s) == 35  # 5 characters into the second message
    assert align._student_cut(30, contents_t, contents_s) == 15  # between messages: after the first
    assert align._student_cut(5, contents_t, contents_s) == 0


def test_student_inputs_have_the_students_positions(smol_chat_cache, real_tokenizers):
    """AlignedSplit items of a chat cache carry the student's loss mask and conversations."""
    qwen = real_tokenizers[0]
    c = TeacherCache(smol_chat_cache)
    template = c.manifest["chat"]["template_text"]
    arrays = align.load_or_build(c, qwen, qwen.eos_token, c.root, Accelerator(cpu=True), template)
    split = align.AlignedSplit(c.split("train"), arrays["train"], align.vocab_map(real_tokenizers[1], qwen, 49_152))
    it = split[0]
    n = int(it["length"])
    assert it["loss_mask"][:n].any() and int(it["segments"][:n].min()) >= 1
    assert torch.equal(it["input_ids"][:n], torch.from_numpy(np.array(arrays["train"].window(0)["input_ids"])).long())
