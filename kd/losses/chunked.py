"""The two drivers of the logit-level loss: a per-chunk function run over the positions of given logits, or over the
LM head's INPUT, the head projection computed inside each chunk, so that the student's [N, V] logits never exist.

A chunk function `fn(z, rows) -> (g, sums)` takes one chunk's fp32 logits z [c, V] (no autograd graph) and returns
the gradient of the chunk's weighted loss w.r.t. z (fp32 [c, V]; it may reuse z's memory) and its sums [m] (the
loss terms, then counts without gradient). The total is sum(weights * sums[:len(weights)]). kd/losses/terms.py
builds the chunk functions (the analytic CE + forward KL one, kd/losses/forward.py, or autograd through the pure
divergences); the drivers only move chunks and gradients.

Memory. `logits_chunked`: the logits plus ONE logits-sized gradient buffer (backward is a multiply).
`head_chunked`: per chunk, z and the chunk function's own [c, V] temporaries (one or two fp32 blocks), and, for the
whole pass, the gradient of the hidden states [N, H] and of the head weight [V, H] (fp32), which autograd would
hold anyway: no term of size N x V. The head's three matmuls per chunk (z = h W^T + b; dh = g W; dW += g^T h) are
the FLOPs autograd spends on the unfused head; they run in the autocast dtype when autocast is on (as the HF head
would), the gradient of W accumulated in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class HeadInput:
    """What the fused path gets instead of logits: the final (normed) hidden states [N, H] and the head's weight
    [V, H] and bias [V] (or None). logits = hidden @ weight^T + bias."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.hidden.shape[0]


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _weighted(sums: torch.Tensor, weights: list[float]) -> torch.Tensor:
    return (sums[: len(weights)] * torch.tensor(weights, dtype=sums.dtype, device=sums.device)).sum()


class _LogitsChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, fn, weights, chunk):
        grad = torch.empty_like(logits)
        sums = None
        for s in range(0, logits.shape[0], chunk):
            rows = slice(s, min(s + chunk, logits.shape[0]))
            g, part = fn(logits[rows].float(), rows)
            grad[rows] = g
            sums = part if sums is None else sums + part
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(sums)
        return _weighted(sums, weights), sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def logits_chunked(logits: torch.Tensor, fn, weights: list[float], chunk: int):
    """(weighted total with gradient, sums) of `fn` over the rows of logits [N, V], chunk rows at a time."""
    return _LogitsChunked.apply(logits, fn, [float(w) for w in weights], int(chunk))


class _HeadChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, fn, weights, chunk):
        cd = _compute_dtype(hidden, weight)
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        # the dtypes are chosen here, explicitly: autocast would otherwise recast inside the loop
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cd)
            b = None if bias is None else bias.to(cd)
            h = hidden.to(cd)
            grad_h = torch.empty_like(hidden) if want_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
            sums = None
            for s in range(0, h.shape[0], chunk):
                rows = slice(s, min(s + chunk, h.shape[0]))
                hc = h[rows]
                g, part = fn(F.linear(hc, w, b).float(), rows)
                sums = part if sums is None else sums + part
                gc = g.to(cd)
                if want_h:
                    grad_h[rows] = gc @ w
                if want_w:
                    if cd == torch.float32:
                        grad_w.addmm_(gc.T, hc)
                    else:  # a [V, H] product in the low dtype, summed in fp32
                        grad_w.add_(gc.T @ hc)
                if want_b:
                    grad_b.add_(g.sum(0))
                del g, gc
        # kept on ctx, not saved tensors, so backward can hand the buffers on without a copy
        ctx.grads = (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        ctx.mark_non_differentiable(sums)
        return _weighted(sums, weights), sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        grads, ctx.grads = ctx.grads, None
        out = tuple(None if g is None else g.mul_(grad_total.to(g.dtype)) for g in grads)
        return out + (None, None, None)


def head_chunked(head: HeadInput, fn, weights: list[float], chunk: int):
    """(weighted total with gradient w.r.t. the hidden states, the head weight and bias; sums) of `fn` over the
    logits hidden @ weight^T + bias, computed chunk rows at a time and never stored whole."""
    return _HeadChunked.apply(head.hidden, head.weight, head.bias, fn, [float(w) for w in weights], int(chunk))


def chunk_logits(x: torch.Tensor | HeadInput, rows: slice) -> torch.Tensor:
    """fp32 logits of `rows`, from logits or from the head's input (no gradient)."""
    if isinstance(x, HeadInput):
        w = x.weight.to(_compute_dtype(x.hidden, x.weight))
        b = None if x.bias is None else x.bias.to(w.dtype)
        return F.linear(x.hidden[rows].to(w.dtype), w, b).float()
    return x[rows].float()
