"""The caching pass's teacher: loaded once (TeacherModel), one forward turned into what the cache stores
(teacher_targets -> TeacherOutputs), and the sampled-target scheme (SAMPLER)."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from kd.models import check_placed, execution_device, load_causal_lm, placement

# The sampled-target scheme, part of a cache's identity: shards drawn by another scheme are never mixed into a
# resumed cache (kd.cache.manifest.config_hash hashes it into the cache's identity).
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


def sequence_generator(seed: int, split: str, index: int, device) -> torch.Generator:
    """The random stream of one sequence's sampled targets: a function of (seed, split, index) only, so a cache's
    draws never depend on batch size, shard size or the number of processes."""
    digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass
class TeacherTargets:
    """What a teacher (in process, or served: kd/served.py) gives for a batch of n windows, before the cache's fields
    are assembled around it (kd.cache.build.CacheOutputs): torch tensors or numpy arrays, T = seq_len."""

    topk_logprobs: np.ndarray | torch.Tensor  # [n, T, k] log p under the full softmax at T = 1
    topk_ids: np.ndarray | torch.Tensor  # [n, T, k] by descending probability
    target_logprobs: np.ndarray | torch.Tensor  # [n, T] log p(input_ids[:, t + 1]) at t (meaningless where unscored)
    hidden_states: torch.Tensor | None = None  # [n, L, T, H] (in process only)
    samples: tuple | None = None  # (ids [n, T, s], counts [n, T, s]) (in process only)


@dataclass
class TeacherOutputs:
    """One batch of n sequences as the cache stores them: one attribute per field of the cache's field table
    (kd/cache/format.py FIELDS, same names), in the decoded layout. T = seq_len, k = top_k, L = stored layers,
    H = teacher hidden size, s = sample_n. Arrays are numpy in any dtype castable to the stored one, except that
    topk_logprobs and hidden_states may stay torch tensors on the teacher's device (a `lowrank` codec projects hidden
    states there: only r coefficients per token leave the device)."""

    input_ids: np.ndarray  # [n, T] token ids, padding past each length
    lengths: np.ndarray  # [n] valid tokens per sequence
    sequence_index: np.ndarray  # [n] each sequence's index in its split
    topk_ids: np.ndarray  # [n, T, k] by descending probability
    topk_logprobs: np.ndarray | torch.Tensor  # [n, T, k] log p under the full softmax at T = 1
    hidden_states: np.ndarray | torch.Tensor | None = None  # [n, L, T, H], when layers are stored
    sample_ids: np.ndarray | None = None  # [n, T, s] distinct drawn ids, most frequent first (sample_n > 0)
    sample_counts: np.ndarray | None = None  # [n, T, s] their counts, 0 = padding
    text: list[str] | None = None  # the windows' text (store_text)
    token_spans: np.ndarray | None = None  # [n, T, 2] each token's [start, end) characters in text (store_text)
    loss_mask: np.ndarray | None = None  # [n, T] a chat cache's tokens the loss counts
    segments: np.ndarray | None = None  # [n, T] a chat cache's conversation of each token in its window
    # [n, 4] the teacher's own score on each window: nats on its scored targets, their count, characters and bytes
    # (kd/textscore.py; kd.cache.format.TEACHER_SCORE_COLUMNS); NaN rows where a writer has no teacher to score
    teacher_score: np.ndarray | None = None


class TeacherModel:
    """The caching pass's teacher (a CacheConfig's TeacherConfig), loaded on first use and then kept: the basis fit
    and the teacher pass share one load, and a process with nothing to compute never loads it. `device` is where it
    takes its inputs: its embeddings' device when placed over several (teacher.device_map)."""

    def __init__(self, cfg, device, local_rank: int = 0):
        self.cfg, self.device, self.local_rank, self.model = cfg, device, local_rank, None
        self._offload = None

    def __call__(self):
        if self.model is None:
            t = self.cfg.teacher
            if t.device_map is None:
                self.model = load_causal_lm(t.model, t.revision, t.dtype, t.attn_implementation).to(self.device)
            else:  # one replica over several devices (TeacherConfig.device_map); inputs go where its embeddings are
                self._offload = tempfile.TemporaryDirectory(prefix="kd-teacher-offload-")
                where = placement(t.device_map, t.devices_per_process, self.local_rank, self._offload.name)
                self.model = load_causal_lm(t.model, t.revision, t.dtype, t.attn_implementation, **where)
                if isinstance(t.device_map, str):
                    check_placed(self.model, t.model)
                self.device = execution_device(self.model.get_input_embeddings())
            self.model.eval()
        return self.model
