"""Conversations in: records with `messages` (role/content turns) or `prompt`/`completion` fields, rendered with a
chat template and tokenized, with a per-token loss mask that says which tokens the student is trained on.

Why kd finds the assistant's tokens itself: transformers' `return_assistant_tokens_mask` needs `{% generation %}`
markers in the template, and most shipped templates have none (SmolLM2-135M-Instruct's has none; the offline Qwen
tokenizer asset has no template at all). So each assistant turn is located in the rendered text by rendering the
conversation's prefixes: the text of turns [0, i) with the generation prompt ends where assistant turn i's content
begins, and the text of turns [0, i] ends after its end-of-turn marker. The turn's span runs from the first to the
end of the last non-whitespace character between them: its content and the end-of-turn token (`<|im_end|>` for
ChatML), not the newline the template puts after it. A token is in the mask when its characters overlap a span
(offsets of a fast tokenizer). A template whose rendering of a prefix is not a prefix of the whole (one that
rewrites earlier turns when later ones arrive) is refused with that reason rather than guessed at.

Loss masks (`mask`): assistant = every assistant turn; completion = the last assistant turn only (for
prompt/completion records, the completion); all = every token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kd.errors import KDError
from kd.paths import resolve_path

ROLES = ("system", "user", "assistant")
MASKS = ("assistant", "completion", "all")


class BadConversation(ValueError):
    """A record that is not a usable conversation; the message says what is wrong with it."""


@dataclass(frozen=True)
class ChatFields:
    """Where a record keeps its conversation: a list of {role, content} turns under `messages`, or a `prompt` (a
    string, or a list of turns) and a `completion` (a string: the assistant's reply)."""

    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"


def conversation(record, fields: ChatFields = ChatFields()) -> list[dict]:
    """The record's turns as [{role, content}], checked: roles known, contents non-empty strings, at least one
    assistant turn, the last turn the assistant's. Raises BadConversation naming the problem (the caller names
    the record: file and line)."""
    if not isinstance(record, dict):
        raise BadConversation(f"a conversation record must be an object, got {type(record).__name__}")
    if fields.messages in record:
        turns = record[fields.messages]
        if not isinstance(turns, list) or not turns:
            raise BadConversation(f"field {fields.messages!r} must be a non-empty list of {{role, content}} turns")
    elif fields.prompt in record and fields.completion in record:
        prompt, completion = record[fields.prompt], record[fields.completion]
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not isinstance(turns, list) or not turns:
            raise BadConversation(f"field {fields.prompt!r} must be a string or a non-empty list of turns")
        turns = list(turns) + [{"role": "assistant", "content": completion}]
    else:
        raise BadConversation(
            f"no conversation: the record needs a {fields.messages!r} field or both {fields.prompt!r} and "
            f"{fields.completion!r} (found {sorted(record)[:8]}; the field names are configurable)"
        )
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise BadConversation(f"turn {i} must be an object with `role` and `content`, got {turn!r:.80}")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise BadConversation(f"turn {i} has role {role!r}; expected one of {list(ROLES)}")
        if not isinstance(content, str):
            raise BadConversation(f"turn {i} ({role}) has content of type {type(content).__name__}, not a string")
        if role == "assistant" and not content.strip():
            raise BadConversation(f"turn {i} is an empty assistant turn: nothing to learn from it")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise BadConversation(f"the last turn is the {out[-1]['role']}'s: a conversation must end with the assistant")
    return out


@dataclass
class Rendered:
    """One conversation as the model sees it: the template's text, its token ids, the per-token loss mask, and
    the character spans [start, end) the mask was made from."""

    text: str
    input_ids: list[int]
    mask: list[bool]
    spans: list[tuple[int, int]]
    offsets: list[tuple[int, int]] | None = None  # each token's [start, end) in `text`
    contents: list[tuple[int, int]] | None = None  # with render(contents=True): each turn's content span in `text`


def _render(tok, turns: list[dict], template: str | None, generation_prompt: bool) -> str:
    try:
        return tok.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
        )
    except ValueError as e:  # transformers: no template on this tokenizer
        raise KDError(
            f"tokenizer {getattr(tok, 'name_or_path', '')!r} has no chat template ({e}); give one in the config "
            "(data.chat_template: a Jinja template string or an asset:/file path)"
        ) from None
    except Exception as e:  # noqa: BLE001 - a template's own error (raise_exception, a missing key) is the record's fault
        raise BadConversation(f"the chat template rejects this conversation: {type(e).__name__}: {e}") from None


def _turn_renderings(tok, turns: list[dict], template: str | None, which) -> tuple[str, dict[int, tuple[str, str]]]:
    """(the rendered conversation, {i: (before, through)} for each turn index in `which`): `before` renders turns
    [0, i) (with the generation prompt when turn i is the assistant's), `through` turns [0, i]. Each prefix is
    rendered once here, whatever is located from it. A template whose prefix renderings are not prefixes of the
    whole is refused."""
    text = _render(tok, turns, template, False)
    out = {}
    for i in which:
        before = _render(tok, turns[:i], template, turns[i]["role"] == "assistant") if i else ""
        through = _render(tok, turns[: i + 1], template, False)
        if not (through.startswith(before) and text.startswith(through)):
            raise BadConversation(
                "the chat template does not render conversations prefix by prefix (it rewrites earlier turns when "
                "later ones follow), so the assistant's tokens and the messages cannot be located; use "
                "data.loss_mask=all or give a template that renders each turn once (data.chat_template)"
            )
        out[i] = (before, through)
    return text, out


def _assistant_span(i: int, turn: dict, before: str, through: str) -> tuple[int, int]:
    """Assistant turn i's span: from the first to the end of the last non-whitespace character it adds."""
    seg = through[len(before) :]
    start = len(before) + (len(seg) - len(seg.lstrip()))
    end = len(before) + len(seg.rstrip())
    if turn["content"].strip() and turn["content"].strip() not in through[start:end]:
        raise BadConversation(f"the chat template did not render assistant turn {i}'s content where expected")
    return start, end


def _content_span(i: int, turn: dict, before: str, through: str) -> tuple[int, int]:
    """Turn i's content, found verbatim in what the turn adds."""
    k = through.find(turn["content"], len(before))
    if k < 0:
        raise BadConversation(
            f"the chat template does not render turn {i}'s content verbatim (it edits messages), so a student "
            "with another tokenizer cannot be aligned to it on the messages"
        )
    return k, k + len(turn["content"])


def assistant_spans(tok, turns: list[dict], template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character span of each assistant turn: content + end-of-turn marker)."""
    which = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
    text, pairs = _turn_renderings(tok, turns, template, which)
    return text, [_assistant_span(i, turns[i], *pairs[i]) for i in which]


def content_spans(tok, turns: list[dict], template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, each turn's content span [start, end) in it): where the text of every message
    sits, so that two renderings of one conversation (two tokenizers' templates) can be aligned on the messages
    themselves (kd/align.py). A template that does not render a message verbatim is refused with that reason."""
    text, pairs = _turn_renderings(tok, turns, template, range(len(turns)))
    return text, [_content_span(i, turns[i], *pairs[i]) for i in range(len(turns))]


def render(
    tok, turns: list[dict], template: str | None = None, mask: str = "assistant", contents: bool = False
) -> Rendered:
    """Render and tokenize one checked conversation (`conversation`) with the tokenizer's chat template (or
    `template`), and mark the tokens the loss counts (`mask`: assistant | completion | all). With `contents`, also
    each turn's content span (`content_spans`), located from the same prefix renderings."""
    if mask not in MASKS:
        raise KDError(f"unknown loss mask {mask!r}; choose one of {list(MASKS)}")
    if not getattr(tok, "is_fast", False):
        raise KDError("chat rendering needs a fast tokenizer (character offsets) to locate the assistant's tokens")
    assistant = [i for i, t in enumerate(turns) if t["role"] == "assistant"] if mask != "all" else []
    # mask=all needs no turn located: then only `contents` asks for prefix renderings
    text, pairs = _turn_renderings(tok, turns, template, range(len(turns)) if contents else assistant)
    spans = [_assistant_span(i, turns[i], *pairs[i]) for i in assistant]
    if mask == "completion":
        spans = spans[-1:]
    # the template writes every special token (BOS included) itself
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if mask == "all":
        keep = [True] * len(ids)
    else:
        keep = [any(a < e and b > s for s, e in spans) for a, b in offsets]
    found = [_content_span(i, turns[i], *pairs[i]) for i in range(len(turns))] if contents else None
    return Rendered(text, list(ids), keep, spans, [(int(a), int(b)) for a, b in offsets], found)


def chat_template(value: str | None) -> str | None:
    """data.chat_template as Jinja text: None (the tokenizer's own), a template string (it holds `{%` or `{{`), or
    an `asset:`/file path to one."""
    if value is None or "{%" in value or "{{" in value:
        return value
    path = resolve_path(value)
    if not os.path.isfile(path):
        raise KDError(
            f"data.chat_template={value!r} is neither a Jinja template (no {{% or {{{{ in it) nor a readable file"
        )
    with open(path, encoding="utf-8") as f:
        return f.read()


def check_chat_tokenizer(tok, template: str | None) -> None:
    """Before any data is read: the tokenizer can render and locate conversations (fast, with a template)."""
    if not getattr(tok, "is_fast", False):
        raise KDError(
            f"data.format=chat needs a fast tokenizer (character offsets locate the assistant's tokens); "
            f"{type(tok).__name__} is not one"
        )
    if template is None and not getattr(tok, "chat_template", None):
        raise KDError(
            f"tokenizer {getattr(tok, 'name_or_path', '')!r} has no chat template: give one with "
            "data.chat_template (a Jinja template string, or an asset:/file path to one)"
        )
