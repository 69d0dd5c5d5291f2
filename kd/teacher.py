"""Loading a teacher and turning one forward pass into what the cache stores."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from kd.assets import resolve_path
from kd.errors import KDError

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
    from kd.io import sha256_file

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
    record["digest"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return record


def load_tokenizer(name_or_path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    path = resolve_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        raise KDError(f"cannot load a tokenizer from '{name_or_path}': {e}") from None


def load_model_config(name_or_path: str, revision: str | None = None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_path(name_or_path), revision=revision)
    except (OSError, ValueError) as e:
        raise KDError(f"cannot load a model config from '{name_or_path}': {e}") from None


def load_causal_lm(name_or_path: str, revision: str | None, dtype: str, attn_implementation: str, **placement):
    """A causal LM from a folder, asset or hub id; `placement`: transformers' device_map, max_memory and
    offload_folder, for a model placed over several devices (see `placement`)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_path(name_or_path),
            revision=revision,
            dtype=DTYPES[dtype],
            attn_implementation=attn_implementation,
            **placement,
        )
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        raise KDError(f"cannot load causal LM '{name_or_path}': {e}") from None
    return model


def placement(device_map, devices_per_process: int, local_rank: int, offload_folder: str) -> dict:
    """from_pretrained's placement arguments for a teacher over several devices (TeacherConfig.device_map).
    A named map spreads the layers over this process's block of GPUs only (local rank r: GPUs r*D .. r*D+D-1),
    nothing on the CPU or disk: a teacher that does not fit the block is an error, not a silent 100x slowdown."""
    if isinstance(device_map, dict):
        return {"device_map": dict(device_map), "offload_folder": offload_folder}
    import torch

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


# The sampled-target scheme, part of a cache's identity: shards drawn by another scheme are never mixed into a
# resumed cache (cache_teacher.py hashes it into the config hash).
SAMPLER = (
    "inverse-cdf/2: u ~ U[0,1) fp64, T x n per sequence from its own generator; id = first i with cdf_i > u * cdf_V;"
    " block of 256 by fp64 CDF of block masses, entry by fp64 CDF inside the block"
)


_BLOCK = 256  # vocabulary entries per block of the two-level CDF


def _draw(e: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws: e [R, V] unnormalised probabilities (fp32, >= 0), u [R, n] uniforms in [0, 1) (fp64)
    -> ids [R, n], id = the first i with cdf_i > u * cdf_V.

    The CDF has two levels so that it is both cheap and precise at a 152k vocabulary: an fp64 running sum of the
    masses of blocks of 256 entries picks each draw's block, then an fp64 running sum inside that block only picks
    the entry. A flat fp32 CDF would round every step below half an ulp of the running total (6e-8 once it passes
    1, so ~V * 3e-8 of probability could move); a flat fp64 one is exact but cost 10x an fp32 one on CPU (0.59 vs
    0.06 s per 2,048 x 49,152). Block masses are fp32 sums of 256 entries, so a draw's block is chosen with that
    sum's relative error (~1e-7) and its entry exactly in proportion to the entries' probabilities.
    An entry with e = 0 (a -inf logit) has an empty interval and is never drawn."""
    R, V = e.shape
    nb = -(-V // _BLOCK)
    if nb * _BLOCK != V:
        e = torch.nn.functional.pad(e, (0, nb * _BLOCK - V))
    blocks = e.view(R, nb, _BLOCK)
    mass = blocks.sum(-1).double()  # [R, nb]
    prefix = mass.cumsum(-1)  # [R, nb] fp64
    x = u * prefix[:, -1:]  # [R, n] targets in [0, total)
    b = torch.searchsorted(prefix, x, right=True).clamp_(max=nb - 1)
    frac = (x - (prefix.gather(1, b) - mass.gather(1, b))) / mass.gather(1, b)  # where in block b, in [0, 1)
    loc = blocks[torch.arange(R, device=e.device)[:, None], b].cumsum(-1, dtype=torch.float64)  # [R, n, B]
    j = torch.searchsorted(loc, (frac * loc[..., -1])[..., None], right=True).squeeze(-1)
    # j < B is always an entry with mass (loc[j] > target >= loc[j-1]); j == B only at a rounding edge, where the
    # block's last entry with mass is taken, never one of probability 0
    if bool((j == _BLOCK).any()):
        j = torch.where(j < _BLOCK, j, (loc < loc[..., -1:]).sum(-1))
    return b * _BLOCK + j


def _group(drawn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """draws [R, n] -> (distinct ids, counts), most frequent first (ties by id), padded with count 0 and id 0."""
    drawn = drawn.sort(dim=-1).values
    new = torch.ones_like(drawn, dtype=torch.bool)
    new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    group = new.long().cumsum(-1) - 1  # index of each draw's distinct id within its row
    counts = torch.zeros_like(drawn).scatter_add_(1, group, torch.ones_like(drawn))
    ids = torch.zeros_like(drawn).scatter_(1, group, drawn)
    # most frequent first (stable sort keeps ascending ids among ties), so ids[:, 0] is the teacher's likeliest draw
    order = counts.sort(dim=-1, descending=True, stable=True).indices
    return ids.gather(1, order), counts.gather(1, order)


def sample_uniforms(T: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """The [T, n] fp64 uniforms of one sequence, drawn at once so they never depend on how positions are chunked."""
    return torch.rand(T, n, dtype=torch.float64, generator=generator, device=generator.device)


def sample_targets(logits: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `n` tokens with replacement from softmax(logits) at T = 1, per position; logits [T, V] (fp32 inside).

    Returns (ids [T, n] int64, counts [T, n] int64): the distinct drawn ids, most frequent first (ties by id),
    padded with count 0 (and id 0). counts.sum(-1) == n; counts / n is the empirical distribution, an unbiased
    estimate of the teacher's (Anshumann et al. 2025, "Sparse Logit Sampling"). `teacher_targets` draws exactly
    these ids for a sequence given the same generator (the scheme is `SAMPLER`).
    """
    z = logits.float()
    e = (z - z.amax(-1, keepdim=True)).exp_()
    return _group(_draw(e, sample_uniforms(z.shape[0], n, generator)))


@torch.inference_mode()
def teacher_targets(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    top_k: int,
    hidden_layers: list[int],
    position_chunk: int = 64,
    sample_n: int = 0,
    sample_generators: list[torch.Generator] | None = None,
    scores: dict | None = None,
    position_ids: torch.Tensor | None = None,
):
    """One teacher forward -> (topk_logprobs [B,T,k] fp32, topk_ids [B,T,k] int64, hidden [B,L,T,H] model dtype,
    samples): samples is None, or (ids [B,T,n], counts [B,T,n]), what `sample_targets` draws with one generator per
    sequence, so what is drawn for a sequence never depends on the batch it was computed in. If `scores` (a dict)
    is given, scores["target_logprobs"] [B, T] fp32 = log p(input_ids[:, t+1]) at position t (the last position's
    is meaningless): the teacher's own held-out score (kd/textscore.py), from the same log-normaliser.

    topk_logprobs are log-probabilities under the FULL softmax at temperature 1, computed in fp32:
    log p_i = z_i - logsumexp(z). Taking top-k of the raw logits and subtracting one logsumexp gives the same
    values as top-k of log_softmax without materialising a second [positions, V] fp32 tensor. Positions are
    processed in chunks so the fp32 upcast of the logits stays small for large vocabularies; 64 positions (12 MB at
    V = 49,152) stay in cache between the top-k, the exp pass and the sampler's CDF (25% faster than 1,024 on CPU,
    same values: all are per-row operations). Sampling inside the chunk loop reuses the exp pass instead of a
    second full-size softmax and a multinomial per sequence.
    """
    # Packed windows are right-padded: under causal attention no valid position can see the padding after it, so
    # the mask changes nothing there and is dropped, which lets SDPA take its causal path (values at valid
    # positions checked identical). Any other mask (left padding, holes) is passed on.
    lengths = attention_mask.sum(-1, keepdim=True)
    right_padded = bool(
        (attention_mask == (torch.arange(attention_mask.shape[1], device=attention_mask.device) < lengths)).all()
    )
    # position_ids (packed chat windows, kd.data.pack.segment_positions) restart per conversation; with no mask,
    # transformers reads each restart as a new sequence and attends within it only (block-diagonal causal), when
    # no KV cache is built
    if position_ids is not None and not right_padded:
        raise ValueError("packed conversations (position_ids) need right-padded windows")
    out = model(
        input_ids=input_ids,
        attention_mask=None if right_padded else attention_mask,
        output_hidden_states=bool(hidden_layers),
        **({} if position_ids is None else {"position_ids": position_ids, "use_cache": False}),
    )
    logits = out.logits  # [B, T, V] in model dtype
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)
    values = torch.empty(B * T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(B * T, top_k, dtype=torch.int64, device=logits.device)
    # a teacher placed over several devices (TeacherConfig.device_map) returns its logits and hidden states on the
    # devices of the modules that made them: everything below works on the logits' device
    if sample_n:
        u = torch.cat([sample_uniforms(T, sample_n, g) for g in sample_generators]).to(logits.device)  # [B*T, n]
        drawn = torch.empty(B * T, sample_n, dtype=torch.int64, device=logits.device)
    if scores is not None:
        next_ids = torch.roll(input_ids, shifts=-1, dims=1).reshape(-1).to(logits.device)
        target_lp = torch.empty(B * T, dtype=torch.float32, device=logits.device)
    for s in range(0, B * T, position_chunk):
        z = flat[s : s + position_chunk].float()
        top_z, top_i = z.topk(top_k, dim=-1, sorted=True)
        # one exp pass serves both the log-normaliser and the sampler's CDF: log p_i = z_i - max - log sum exp(z - max)
        e = (z - top_z[:, :1]).exp_()
        log_sum = e.sum(-1, keepdim=True).log()
        values[s : s + position_chunk] = top_z - top_z[:, :1] - log_sum
        ids[s : s + position_chunk] = top_i
        if scores is not None:
            z_next = z.gather(1, next_ids[s : s + position_chunk, None])
            target_lp[s : s + position_chunk] = (z_next - top_z[:, :1] - log_sum)[:, 0]
        if sample_n:
            drawn[s : s + position_chunk] = _draw(e, u[s : s + position_chunk])
    hidden = None
    if hidden_layers:
        hidden = torch.stack([out.hidden_states[i].to(logits.device) for i in hidden_layers], dim=1)
    samples = None
    if sample_n:
        sample_ids, counts = _group(drawn)
        samples = (sample_ids.view(B, T, sample_n), counts.view(B, T, sample_n))
    if scores is not None:
        scores["target_logprobs"] = target_lp.view(B, T)
    return values.view(B, T, top_k), ids.view(B, T, top_k), hidden, samples
