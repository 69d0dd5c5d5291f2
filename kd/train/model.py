"""The trained module: the student LM plus its feature projectors, and whether its LM head can run inside the loss."""

from __future__ import annotations

import torch
from torch import nn

from kd.losses.chunked import HeadInput

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


class DistillModel(nn.Module):
    """The student LM plus one linear projector (student hidden -> teacher hidden) per mapped layer pair.

    One module, so one `accelerator.prepare`, one optimizer and one checkpoint hold everything trained, and
    under DDP/FSDP every trained parameter is used inside `forward`: the loss over the logits runs inside it too
    (`logit_loss`), so the LM head's weight is used there even when the loss computes the head itself.

    fused_head: compute the LM head inside the loss, chunk by chunk of positions (kd/losses/chunked.py), where
    `head_fallback_reason` finds nothing against it; `fused_head_reason` then says why not (None when on or off).
    """

    def __init__(self, lm: nn.Module, feature_pairs: list[tuple[int, int]], teacher_hidden: int, fused_head=True):
        super().__init__()
        self.lm = lm
        self.feature_pairs = [tuple(p) for p in feature_pairs]
        student_hidden = lm.config.hidden_size
        self.projectors = nn.ModuleList(nn.Linear(student_hidden, teacher_hidden, bias=False) for _ in feature_pairs)
        self.fused_head_reason = head_fallback_reason(lm) if fused_head else None
        self.fused_head = bool(fused_head) and self.fused_head_reason is None

    @property
    def _no_split_modules(self):
        # the student's own decoder-layer classes: what FSDP2's transformer auto-wrap (Accelerate) shards one by one.
        # DistillModel itself names no input or output embeddings, so Accelerate carves none apart: the embeddings,
        # final norm, LM head (tied or not) and projectors stay in the root group, gathered whole by this module's
        # forward, which is where the fused loss reads the head's weight directly
        return getattr(self.lm, "_no_split_modules", None)

    def forward(self, input_ids, attention_mask, with_features: bool = False, logit_loss=None, position_ids=None):
        """-> (logits [B, T, V], or with `logit_loss` its value on the flat logits [B * T, V] or, on the fused path,
        on a HeadInput (the flat final hidden states and the head); the projected student states [B, T, H_teacher]
        per layer pair, or None). `position_ids`: packed conversations (kd.train.step.model_inputs)."""
        # no KV cache: with one, transformers does not read restarting positions as separate sequences
        kw = {} if position_ids is None else {"position_ids": position_ids, "use_cache": False}
        if self.fused_head and logit_loss is not None:
            out = self.lm.base_model(
                input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=with_features, **kw
            )
            h = out.last_hidden_state
            head = self.lm.get_output_embeddings()
            result = logit_loss(HeadInput(h.reshape(-1, h.shape[-1]), head.weight, head.bias))
        else:
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=with_features, **kw)
            logits = out.logits
            result = logits if logit_loss is None else logit_loss(logits.reshape(-1, logits.shape[-1]))
        if not with_features:
            return result, None
        projected = [proj(out.hidden_states[s]) for proj, (s, _) in zip(self.projectors, self.feature_pairs)]
        return result, projected
