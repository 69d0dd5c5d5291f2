"""Loading tokenizers and causal LMs (folders, `asset:` names, hub ids), what identifies them (fingerprints), where
a teacher too large for one device is placed, and what a loaded model supports (a fused LM head, packed
conversations), probed numerically rather than assumed from its class."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from kd.errors import KDError
from kd.io import json_sha256, sha256_file
from kd.paths import resolve_path

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id, added tokens included) and the special tokens.

    Two tokenizers with the same fingerprint give every string piece the same id, which is what lets a
    student train against a cache made with another copy of the tokenizer.
    """
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items()),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def weights_fingerprint(name_or_path: str, revision: str | None, commit_hash: str | None = None) -> dict:
    """What identifies the teacher's weights, not just their path: for a local folder every weight file's name, size
    and sha256 (streamed; ~1 GB/s, so a 70B checkpoint costs a minute once per caching run), for a hub id the
    resolved commit. `digest` summarises it for the config hash."""
    path = Path(resolve_path(name_or_path))
    if path.is_dir():
        files = [
            {"name": f.name, "bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(path.iterdir())
            if f.is_file() and f.suffix in WEIGHT_SUFFIXES
        ]
        record = {"kind": "local files", "files": files}
    else:
        record = {"kind": "hub", "name": name_or_path, "revision": revision, "commit": commit_hash}
    record["digest"] = json_sha256(record)
    return record


def model_source(name_or_path: str, what: str) -> str:
    """The folder or hub id transformers is given. A string that can only be a local path (absolute, `./`, `../`,
    `~`, `asset:`, or more than one `/`, which no hub id has) and names nothing is refused here: transformers would
    read it as a malformed hub id and say so, which hides the real cause."""
    path = resolve_path(name_or_path)
    local = os.path.isabs(path) or name_or_path.startswith((".", "~", "asset:")) or name_or_path.count("/") > 1
    if local and not os.path.exists(path):
        raise KDError(f"no {what} at '{name_or_path}': that path does not exist (a hub id is written owner/name)")
    return path


def load_tokenizer(name_or_path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    path = model_source(name_or_path, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        raise KDError(f"cannot load a tokenizer from '{name_or_path}': {e}") from None


def load_model_config(name_or_path: str, revision: str | None = None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_source(name_or_path, "model"), revision=revision)
    except (OSError, ValueError) as e:
        raise KDError(f"cannot load a model config from '{name_or_path}': {e}") from None


def load_causal_lm(name_or_path: str, revision: str | None, dtype: str, attn_implementation: str, **placement):
    """A causal LM from a folder, asset or hub id; `placement`: transformers' device_map, max_memory and
    offload_folder, for a model placed over several devices (see `placement`)."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            model_source(name_or_path, "model"),
            revision=revision,
            dtype=DTYPES[dtype],
            attn_implementation=attn_implementation,
            output_loading_info=True,
            **placement,
        )
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        raise KDError(f"cannot load causal LM '{name_or_path}': {e}") from None
    check_loaded(name_or_path, info)
    check_causal(name_or_path, model)
    return model


def check_loaded(name: str, info: dict) -> None:
    """Every tensor of the model came from the checkpoint and every tensor of the checkpoint was used, beyond what
    the model's class ties or ignores by design (transformers leaves those out of `info`). transformers only prints
    its load report and initialises what is missing at random: a teacher with a layer missing would be cached from."""
    problems = [
        (what, sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or []))
        for what, key in (
            ("missing from the checkpoint (they would be random)", "missing_keys"),
            ("of another shape in the checkpoint", "mismatched_keys"),
            ("in the checkpoint but not in the model", "unexpected_keys"),
        )
    ]
    problems = [(what, keys) for what, keys in problems if keys]
    if problems or info.get("error_msgs"):
        detail = "; ".join(f"{len(keys)} tensors {what}, e.g. {', '.join(keys[:3])}" for what, keys in problems)
        raise KDError(
            f"model '{name}' did not load whole: {detail or info['error_msgs'][0]}. Give a complete checkpoint of "
            "this architecture (kd never trains on or caches from a half-loaded model)"
        )


def check_causal(name: str, model) -> None:
    """A causal LM's prediction at a position never depends on later tokens: two 8-token inputs that differ only
    in their last token must give the same logits before it. An encoder (BERT's LM head loads under
    AutoModelForCausalLM without complaint) fails this; two forwards of 8 tokens cost nothing beside a pass."""
    vocab = model.config.get_text_config().vocab_size
    ids = torch.arange(8, dtype=torch.long).remainder(vocab).unsqueeze(0) + 1
    ids = ids.remainder(vocab).to(execution_device(model.get_input_embeddings()))
    other = ids.clone()
    other[0, -1] = (ids[0, -1] + 1) % vocab
    with torch.no_grad():
        a, b = (model(input_ids=x, use_cache=False).logits[0, :-1].float() for x in (ids, other))
    # the same prefix computes the same numbers (masked keys weigh exactly 0): equal up to the kernels' rounding
    tolerance = 1e-5 if model.dtype == torch.float32 else 1e-3
    if float((a - b).abs().max()) > tolerance * float(a.abs().max().clamp(min=1e-3)):
        raise KDError(
            f"model '{name}' ({type(model).__name__}, model_type {model.config.model_type}) is not a causal language "
            "model: its prediction at a position changes with later tokens. kd distils causal (decoder) LMs"
        )


def check_context(what: str, model_cfg, window: int, fix: str, windows: str = "windows") -> None:
    """A model must see a whole window: a shorter context scores or trains silently wrong (Llama: positions past
    its table) or fails part-way (GPT-2)."""
    context = getattr(model_cfg, "max_position_embeddings", None) or getattr(model_cfg, "n_positions", None)
    if context is not None and context < window:
        raise KDError(f"{what}'s context ({context} positions) is shorter than the {windows} ({window} tokens): {fix}")


def count_parameters(model_cfg) -> int:
    """Parameters of the model a transformers config builds, built on the meta device (nothing allocated; a tied
    tensor counted once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(model_cfg)
    return sum(p.numel() for p in lm.parameters())


def device_memory(device: torch.device) -> int:
    """What one device can hold: a GPU's total memory, or the machine's physical memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def placement(device_map, devices_per_process: int, local_rank: int, offload_folder: str) -> dict:
    """from_pretrained's placement arguments for a teacher over several devices (TeacherConfig.device_map).
    A named map spreads the layers over this process's block of GPUs only (local rank r: GPUs r*D .. r*D+D-1),
    nothing on the CPU or disk: a teacher that does not fit the block is an error, not a silent 100x slowdown."""
    if isinstance(device_map, dict):
        return {"device_map": dict(device_map), "offload_folder": offload_folder}
    first, count = local_rank * devices_per_process, torch.cuda.device_count()
    if first + devices_per_process > count:
        raise KDError(
            f"teacher.devices_per_process={devices_per_process}: the process with local rank {local_rank} needs GPUs "
            f"{first}..{first + devices_per_process - 1}, and this machine has {count}; launch at most "
            f"{count // devices_per_process} processes per machine"
        )
    block = range(first, first + devices_per_process)
    # weights may fill 90% of each GPU: the rest is for one teacher batch's activations and the fp32 log-softmax chunks
    return {
        "device_map": device_map,
        "max_memory": {i: int(0.9 * torch.cuda.get_device_properties(i).total_memory) for i in block},
    }


def execution_device(module) -> torch.device:
    """Where a (possibly dispatched) module computes: its hook's execution device, else its parameters' device."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return next(module.parameters()).device


def check_placed(model, name: str) -> None:
    """A named device_map must not have spilled part of the teacher to the CPU or disk (placement's docstring)."""
    spilled = sorted({str(d) for d in getattr(model, "hf_device_map", {}).values() if str(d) in ("cpu", "disk")})
    if spilled:
        raise KDError(
            f"the teacher {name} does not fit this process's GPUs: transformers placed part of it on "
            f"{' and '.join(spilled)}. Raise teacher.devices_per_process (fewer replicas, more GPUs each), or use a "
            "smaller teacher.dtype"
        )


# Config fields of HF models whose logits are not head(body(x)): soft-capping (Gemma 2/3), a logit scale (Cohere),
# a divisor (Granite), a width multiplier (MiniCPM-style muP). Named in the fallback reason; the probe below is what
# decides, so a model that post-processes its logits some other way falls back too.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "dim_model_base", "scale_width")


def head_fallback_reason(lm: nn.Module) -> str | None:
    """None when the student's logits are exactly `lm.get_output_embeddings()(lm.base_model(...).last_hidden_state)`
    with a plain nn.Linear head, so the loss may compute the head itself chunk by chunk; otherwise why not (the
    trainer then falls back to the model's own forward and says so).

    Checked structurally (a plain Linear head, a body distinct from the model) and numerically: one eval-mode
    forward of 8 tokens both ways must agree, which catches any post-processing of the logits the config does not
    name."""
    get_head = getattr(lm, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if type(head) is not nn.Linear:
        return f"its output head is {type(head).__name__}, not a plain torch.nn.Linear"
    body = getattr(lm, "base_model", lm)
    if body is lm:
        return f"{type(lm).__name__} has no separate body module (base_model)"
    named = [
        f"{k}={getattr(lm.config, k)}"
        for k in _LOGIT_POSTPROCESSING
        if getattr(lm.config, k, None) not in (None, 1, 1.0, False)
    ]
    if named:
        return f"its config post-processes the logits ({', '.join(named)})"
    device = head.weight.device
    ids = (torch.arange(8, device=device) * 7919 % head.weight.shape[0])[None, :]
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            full = lm(input_ids=ids).logits.float()
            mine = head(body(input_ids=ids).last_hidden_state).float()
    except Exception as e:  # noqa: BLE001 - any failure of the body call means: use the model's own forward
        return f"its body cannot be called alone ({type(e).__name__}: {e})"
    finally:
        lm.train(was_training)
    if full.shape != mine.shape:
        return f"head(body(x)) has shape {tuple(mine.shape)}, the model's logits {tuple(full.shape)}"
    err = float((full - mine).abs().max())
    if not err <= 1e-4 * max(1.0, float(full.abs().max())):
        return f"its logits differ from head(body(x)) by up to {err:.3g} (the model post-processes them)"
    return None


def packing_fallback_reason(lm: nn.Module) -> str | None:
    """None when the model keeps packed conversations apart: given position ids that restart at a conversation's
    start (and no mask), each conversation's logits equal those of that conversation alone. Otherwise why not
    (an attention implementation or a model that ignores the restart, so one conversation would see another).
    Checked numerically on a 12-token window of two conversations."""
    device = next(lm.parameters()).device
    V = lm.config.vocab_size
    ids = (torch.arange(12, device=device) * 7919 % V)[None, :]
    pos = torch.cat([torch.arange(5), torch.arange(7)]).to(device)[None, :]
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            packed = lm(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
            alone = torch.cat([lm(input_ids=ids[:, :5]).logits, lm(input_ids=ids[:, 5:]).logits], 1).float()
    except Exception as e:  # noqa: BLE001 - a model that cannot take position ids cannot pack
        return f"it cannot be called with position ids ({type(e).__name__}: {e})"
    finally:
        lm.train(was_training)
    err = float((packed - alone).abs().max())
    if not err <= 1e-4 * max(1.0, float(alone.abs().max())):
        return (
            f"with packed conversations its logits differ from each conversation alone by up to {err:.3g} (its "
            f"attention ({getattr(lm.config, '_attn_implementation', '?')}) lets one conversation see another)"
        )
    return None
