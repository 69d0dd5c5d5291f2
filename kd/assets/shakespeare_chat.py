"""A real-text conversation set, offline: the Shakespeare asset's plays turned into chat records.

No chat dataset can be downloaded on machines without the hub, so kd builds one from text it has. Within each
scene of a play, each speech and the reply that follows it (by another speaker) become one conversation:

    {"messages": [{"role": "system", "content": "You are Hor in Hamlet. Answer in character."},
                  {"role": "user", "content": <a speech>},
                  {"role": "assistant", "content": <the next speaker's reply>}],
     "play": "hamlet", "scene": 3, "speakers": ["Ber.", "Hor."]}

Speeches are found in the Project Gutenberg layout of the asset: a speaker line (`Hor.`, `HORATIO.`, `First
Witch.`, `Alb. and Corn.`) after a blank line, the speech's lines up to the next blank line or stage direction.
Stage directions (`[Exit Ghost.]`) are dropped, act and scene headings start a new scene, and nothing pairs across
them. Whole plays are held out for eval (King Lear by default, as in the demo), so no eval reply was trained on.

    python -m kd.assets.shakespeare_chat --out data/shakespeare_chat      # -> train.jsonl, eval.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from kd.paths import resolve_path

# "Hor." / "HORATIO." / "First Witch." / "LADY MACBETH." / "Alb. and Corn." : a short name line ending in a full stop
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'\-]*(?:[ .]+[A-Za-z'\-]+){0,4}\.$")
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)\s+[IVXLC]+\b")
_DIRECTION = re.compile(r"\[[^\]]*\]")

DEFAULT_TRAIN = ("hamlet", "macbeth", "othello", "tempest", "julius_caesar")
DEFAULT_EVAL = ("lear",)


def speeches(text: str) -> list[tuple[int, str, str]]:
    """(scene number, speaker, speech) for each speech of a play's text, in order."""
    out, scene = [], 0
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if _HEADING.match(line):
            scene += 1
            i += 1
            continue
        prev_blank = i == 0 or not lines[i - 1].strip()
        if prev_blank and _SPEAKER.match(line) and i + 1 < len(lines) and lines[i + 1].strip():
            body = []
            j = i + 1
            while j < len(lines) and lines[j].strip() and not lines[j].strip().startswith("["):
                body.append(_DIRECTION.sub("", lines[j]).strip())
                j += 1
            speech = "\n".join(b for b in body if b)
            if speech:
                out.append((scene, line, speech))
            i = j
            continue
        i += 1
    return out


def conversations(play: str, text: str) -> list[dict]:
    """Each speech and the next speaker's reply in the same scene, as a chat record."""
    title = play.replace("_", " ").title()
    items = speeches(text)
    records = []
    for (sc_a, who_a, a), (sc_b, who_b, b) in zip(items, items[1:]):
        if sc_a != sc_b or who_a == who_b:
            continue
        speaker = who_b.rstrip(".")  # as the text names them: "Hor", "HORATIO", "First Witch"
        records.append(
            {
                "messages": [
                    {"role": "system", "content": f"You are {speaker} in {title}. Answer in character."},
                    {"role": "user", "content": a},
                    {"role": "assistant", "content": b},
                ],
                "play": play,
                "scene": sc_a,
                "speakers": [who_a, who_b],
            }
        )
    return records


def build(root: Path, out: Path, train_plays=DEFAULT_TRAIN, eval_plays=DEFAULT_EVAL) -> dict[str, int]:
    """Write out/train.jsonl and out/eval.jsonl from the plays under `root` (the asset's folder); counts per split."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, plays in (("train", train_plays), ("eval", eval_plays)):
        tmp = out / f".{split}.jsonl.tmp"
        n = 0
        with open(tmp, "w", encoding="utf-8") as f:
            for play in plays:
                text = (root / f"{play}_gut.txt").read_text(encoding="utf-8")
                for r in conversations(play, text):
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
                    n += 1
        tmp.replace(out / f"{split}.jsonl")  # whole or not at all
        counts[split] = n
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kd.assets.shakespeare_chat", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for train.jsonl and eval.jsonl")
    ap.add_argument("--train-plays", default=",".join(DEFAULT_TRAIN))
    ap.add_argument("--eval-plays", default=",".join(DEFAULT_EVAL))
    args = ap.parse_args(argv)
    root = Path(resolve_path("asset:shakespeare"))
    counts = build(root, Path(args.out), args.train_plays.split(","), args.eval_plays.split(","))
    print(f"{counts['train']} train / {counts['eval']} eval conversations -> {args.out}")


if __name__ == "__main__":
    main()
