"""The trained module: the student LM plus its feature projectors (DistillModel), and the student built from a config
(build_student)."""

from __future__ import annotations

import torch
from torch import nn

from kd.errors import KDError
from kd.losses.chunked import HeadInput
from kd.models import count_parameters, device_memory, head_fallback_reason, load_causal_lm
from kd.prune import from_teacher
from kd.train.plan import launch_layout
from kd.train_config import TrainConfig


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


def check_fits(model_cfg, device: torch.device) -> None:
    """Before a random-init student is built: its fp32 weights, gradients and AdamW's two moments (16 bytes per
    parameter, over the processes when the back-end shards them) must fit the device, or the process is killed
    for memory with no word from kd. A field left out of student.config takes transformers' default (llama's is a
    7B model)."""
    try:
        params = count_parameters(model_cfg)
    except (ValueError, TypeError, RuntimeError) as e:
        raise KDError(f"student.config cannot build a model ({str(e).splitlines()[0]}); fix that field") from None
    world, sharding = launch_layout()
    need = 16 * params / (world if sharding == "full" else 1)
    have = device_memory(device)
    if need > have:
        raise KDError(
            f"student.config builds a {params / 1e9:.2f}B-parameter {model_cfg.model_type} (hidden_size "
            f"{getattr(model_cfg, 'hidden_size', '?')}, {getattr(model_cfg, 'num_hidden_layers', '?')} layers): "
            f"training it needs about {need / 2**30:.1f} GiB per device for weights, gradients and optimizer "
            f"alone, and this {device.type} device has {have / 2**30:.1f} GiB. Give the sizes you mean in "
            "student.config (fields left out take transformers' defaults)"
        )


def build_student(cfg: TrainConfig, tokenizer, teacher_vocab: int, cache=None, log=print, device="cpu"):
    """The student LM (`cache`: the teacher's, needed to cut a student from it). A student cut from the teacher
    carries what kd.prune kept and measured in `lm.config.kd_pruned_from` (saved with it in config.json)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    s = cfg.student
    if s.from_teacher is not None:  # cut from the cache's teacher: every process cuts the same (a deterministic pass)
        if cache is None:
            raise KDError("student.from_teacher cuts the student from a cache's teacher: give the cache")
        lm, _ = from_teacher(cache, s.from_teacher, log, device)
    elif s.pretrained is not None:  # checked whole and causal, as every model kd loads (kd.models)
        lm = load_causal_lm(s.pretrained, s.revision, "fp32", s.attn_implementation)
    else:
        fields = dict(s.config)
        fields.setdefault("vocab_size", len(tokenizer))
        try:
            model_cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
        except (ValueError, TypeError) as e:
            raise KDError(f"student.config is not a valid model config: {e}") from None
        check_fits(model_cfg, torch.device(device))
        try:
            lm = AutoModelForCausalLM.from_config(model_cfg, attn_implementation=s.attn_implementation)
        except (ValueError, TypeError, RuntimeError) as e:  # e.g. a negative size: "negative dimension -64"
            raise KDError(f"student.config cannot build a model ({str(e).splitlines()[0]}); fix that field") from None
    if lm.config.vocab_size < teacher_vocab:
        raise KDError(
            f"the student's vocab_size ({lm.config.vocab_size}) is smaller than the teacher's "
            f"({teacher_vocab}): cached teacher token ids would fall outside the student's logits"
        )
    if s.gradient_checkpointing:
        # renamed to activation_checkpointing_enable in recent transformers 5.x releases (the old name warns)
        (getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable)()
    return lm
