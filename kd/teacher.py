"""Loading a teacher and turning one forward pass into what the cache stores."""

from __future__ import annotations

import hashlib
import json

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


def load_causal_lm(name_or_path: str, revision: str | None, dtype: str, attn_implementation: str):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_path(name_or_path), revision=revision, dtype=DTYPES[dtype], attn_implementation=attn_implementation
        )
    except (OSError, ValueError, ImportError) as e:
        raise KDError(f"cannot load causal LM '{name_or_path}': {e}") from None
    return model


def sample_targets(logits: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `n` tokens with replacement from softmax(logits) at T = 1, per position; logits [T, V] (fp32 inside).

    Returns (ids [T, n] int64, counts [T, n] int64): the distinct drawn ids, most frequent first (ties by id),
    padded with count 0 (and id 0). counts.sum(-1) == n; counts / n is the empirical distribution, an unbiased
    estimate of the teacher's (Anshumann et al. 2025, "Sparse Logit Sampling").
    """
    probs = torch.softmax(logits.float(), dim=-1)
    drawn = torch.multinomial(probs, n, replacement=True, generator=generator).sort(dim=-1).values
    new = torch.ones_like(drawn, dtype=torch.bool)
    new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    group = new.long().cumsum(-1) - 1  # index of each draw's distinct id within its row
    counts = torch.zeros_like(drawn).scatter_add_(1, group, torch.ones_like(drawn))
    ids = torch.zeros_like(drawn).scatter_(1, group, drawn)
    # most frequent first (stable sort keeps ascending ids among ties), so ids[:, 0] is the teacher's likeliest draw
    order = counts.sort(dim=-1, descending=True, stable=True).indices
    return ids.gather(1, order), counts.gather(1, order)


@torch.inference_mode()
def teacher_targets(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, top_k: int,
                    hidden_layers: list[int], position_chunk: int = 64, sample_n: int = 0,
                    sample_generators: list[torch.Generator] | None = None):
    """One teacher forward -> (topk_logprobs [B,T,k] fp32, topk_ids [B,T,k] int64, hidden [B,L,T,H] model dtype,
    samples): samples is None, or (ids [B,T,n], counts [B,T,n]) from `sample_targets` with one generator per
    sequence, so what is drawn for a sequence never depends on the batch it was computed in.

    topk_logprobs are log-probabilities under the FULL softmax at temperature 1, computed in fp32:
    log p_i = z_i - logsumexp(z). Taking top-k of the raw logits and subtracting one logsumexp gives the same
    values as top-k of log_softmax without materialising a second [positions, V] fp32 tensor. Positions are
    processed in chunks so the fp32 upcast of the logits stays small for large vocabularies; 64 positions (12 MB at
    V = 49,152) stay in cache between the top-k and the logsumexp pass (25% faster than 1,024 on CPU, same values:
    both are per-row operations).
    """
    # Packed windows are right-padded: under causal attention no valid position can see the padding after it, so
    # the mask changes nothing there and is dropped, which lets SDPA take its causal path (values at valid
    # positions checked identical). Any other mask (left padding, holes) is passed on.
    lengths = attention_mask.sum(-1, keepdim=True)
    right_padded = bool((attention_mask == (torch.arange(attention_mask.shape[1], device=attention_mask.device)
                                            < lengths)).all())
    out = model(input_ids=input_ids, attention_mask=None if right_padded else attention_mask,
                output_hidden_states=bool(hidden_layers))
    logits = out.logits  # [B, T, V] in model dtype
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)
    values = torch.empty(B * T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(B * T, top_k, dtype=torch.int64, device=logits.device)
    for s in range(0, B * T, position_chunk):
        z = flat[s:s + position_chunk].float()
        top_z, top_i = z.topk(top_k, dim=-1, sorted=True)
        values[s:s + position_chunk] = top_z - torch.logsumexp(z, dim=-1, keepdim=True)
        ids[s:s + position_chunk] = top_i
    hidden = None
    if hidden_layers:
        hidden = torch.stack([out.hidden_states[i] for i in hidden_layers], dim=1)
    samples = None
    if sample_n:
        drawn = [sample_targets(logits[b], sample_n, sample_generators[b]) for b in range(B)]
        samples = (torch.stack([d[0] for d in drawn]), torch.stack([d[1] for d in drawn]))
    return values.view(B, T, top_k), ids.view(B, T, top_k), hidden, samples
