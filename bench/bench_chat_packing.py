"""Padding waste of chat packing on the real conversation set (kd/assets/shakespeare_chat.py), per tokenizer.

    python bench/bench_chat_packing.py [--seq-len 256] [--tokenizer asset:smollm2-135m-instruct]

Each conversation rendered with the SmolLM2 chat template (kd/data/chat.py), tokenized by the given tokenizer, and
placed into windows of --seq-len tokens two ways:
    one per window   each conversation alone in a right-padded window (what needs no attention mask changes);
    packed in order  conversations laid end to end, in order, a window closed when the next one does not fit
                     (what block-diagonal attention and per-conversation positions allow);
    first-fit        each conversation into the first window that still has room for it, unbounded;
    kd's packer      kd.data.pack.ChatPacker, what the ingest runs: first-fit over at most OPEN_WINDOWS open
                     windows (the fullest emitted when another is needed), and its one-per-window mode.
A conversation longer than a window is cut at seq_len in both (the count and the tokens lost are printed). Prints
the share of window positions that are padding, and the share of tokens the assistant mask keeps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import json

    from kd.assets.shakespeare_chat import build
    from kd.data.chat import conversation, render
    from kd.data.pack import OPEN_WINDOWS, ChatPacker
    from kd.models import load_tokenizer
    from kd.paths import resolve_path

    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--tokenizer", default="asset:smollm2-135m-instruct")
    ap.add_argument("--template-from", default="asset:smollm2-135m-instruct", help="tokenizer whose template renders")
    args = ap.parse_args()
    tok = load_tokenizer(args.tokenizer)
    template = load_tokenizer(args.template_from).chat_template
    with tempfile.TemporaryDirectory() as tmp:
        counts = build(Path(resolve_path("asset:shakespeare")), Path(tmp))
        records = [json.loads(line) for line in open(Path(tmp) / "train.jsonl")]
    lengths, masked, rendered = [], 0, []
    for r in records:
        out = render(tok, conversation(r), template)
        lengths.append(len(out.input_ids))
        masked += sum(out.mask)
        rendered.append(out.input_ids)
    L = args.seq_len
    cut = [min(n, L) for n in lengths]
    over = sum(n > L for n in lengths)
    lost = sum(n - L for n in lengths if n > L)
    one = len(cut) * L
    windows, fill = 1, 0
    for n in cut:
        if fill + n > L:
            windows, fill = windows + 1, 0
        fill += n
    packed = windows * L
    free = []  # first fit: each conversation into the first open window with room (order kept within a window)
    for n in cut:
        for j, room in enumerate(free):
            if room >= n:
                free[j] -= n
                break
        else:
            free.append(L - n)
    total = sum(cut)
    packers = {p: ChatPacker(L, 0, p) for p in ("first_fit", "one_per_window")}
    for ids in rendered:
        for packer in packers.values():
            packer.add(ids, [True] * len(ids))
    kd_windows = {p: len(packer.take(final=True)) for p, packer in packers.items()}
    print(f"(kd's packer keeps {OPEN_WINDOWS} windows open)")
    print(f"{len(records)} train conversations ({counts['eval']} eval), {args.tokenizer}, windows of {L} tokens")
    print(
        f"tokens per conversation: mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}; assistant mask keeps "
        f"{masked / sum(lengths):.1%} of tokens; longer than a window: {over} ({lost} tokens cut)"
    )
    print(f"one conversation per window: {len(cut)} windows, padding {1 - total / one:.1%} of positions")
    print(f"packed in order:             {windows} windows, padding {1 - total / packed:.1%} of positions")
    print(f"packed first-fit:            {len(free)} windows, padding {1 - total / (len(free) * L):.1%} of positions")
    for p, n in kd_windows.items():
        print(f"kd's packer, {p + ':':<16} {n} windows, padding {1 - total / (n * L):.1%} of positions")


if __name__ == "__main__":
    main()
