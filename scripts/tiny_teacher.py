"""A random tiny teacher and a small corpus for the wheel check (scripts/wheel_check.sh), built here, nothing
downloaded: OUT/corpus/*.txt (and heldout/), OUT/teacher (a byte-level BPE tokenizer trained on the corpus and a
2-layer random Llama of its vocabulary)."""

import random
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = Path(sys.argv[1])
words = "the king queen lord lady sword crown night day love death blood fair foul heaven earth sea storm".split()
rng = random.Random(0)
(out / "corpus" / "heldout").mkdir(parents=True)
for i in range(4):
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(150)]
    (out / "corpus" / ("heldout" if i == 3 else "") / f"play{i}.txt").write_text("\n".join(lines) + "\n")

tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
alphabet = pre_tokenizers.ByteLevel.alphabet()
trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
tok.train([str(p) for p in sorted((out / "corpus").rglob("*.txt"))], trainer)
fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")

torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=len(fast),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
LlamaForCausalLM(config).save_pretrained(out / "teacher")
fast.save_pretrained(out / "teacher")
