"""Students built from the teacher: whole decoder layers and MLP neurons removed by importance measured on the
cache's own text, the rest of the weights copied exactly (Minitron's recipe: prune, then distil).

    python -m kd.prune --cache DIR --layers 15 --out students/half [--rule block|influence|every_other]
    python -m kd.prune --cache DIR --keep 0,1,2,3 --intermediate-size 768 --out students/narrow
    python -m kd.prune --cache DIR --layers 15 --compare                  # every rule side by side, nothing written

Prints each candidate's importance, then the pruned model's held-out CE, perplexity and bits per character on the
cache's eval split (the teacher's own score beside it), and writes a transformers model folder (config, weights,
tokenizer) that `student.pretrained` loads. `student.from_teacher` in a training config builds the same student in
the run (no folder needed).

Measured importance, from one teacher forward over the first `calibration_sequences` train windows of the cache
(the cache's own text, so the student is cut for the data it will train on); x_l is the residual stream entering
decoder layer l (x_L: leaving the last one, before the final norm), over every non-padding position:
- `block` (default; Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"): drop the
  contiguous block of n = L - k layers [l, l + n) whose input and output are closest, minimising the mean angular
  distance arccos(cos(x_l, x_{l+n})) / pi. A block measured as a whole sees that layers compensate for each other,
  which per-layer scores cannot.
- `influence` (ShortGPT, Men et al. 2024): drop the n layers of lowest block influence 1 - cos(x_i, x_{i+1}),
  each measured alone.
- `every_other`: the baseline to beat (DistilBERT's rule generalised): layers round(i * L / k), i < k, kept.
MLP width (`intermediate_size`): in every kept layer the neurons of largest mean contribution to the residual
stream, E|a_j| * ||W_down[:, j]|| (a = act(gate(x)) * up(x), the input of down_proj; Minitron's activation
importance, weighted by how much of a neuron's output reaches the residual), in their original order.

Modules: this one (importance, rules, `cut`, `from_teacher`: what training builds on), __main__.py (the command, which
scores the students with kd.evaluate).

Supported: llama-style decoders (model_type llama, qwen2, qwen3, mistral: `model.layers[i]` with `mlp.gate_proj`,
`up_proj`, `down_proj`); other architectures are refused before any weight is loaded.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from kd.errors import KDError
from kd.models import load_causal_lm, load_model_config, weights_fingerprint

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass
class Importance:
    """What one calibration pass measured. angular[a, b] and cosine[a, b]: the token mean of arccos(cos) / pi and of
    cos between the residual streams x_a and x_b (a, b in 0..L); neurons[l]: E|a_j| * ||W_down[:, j]|| per MLP
    neuron of layer l (only when asked for)."""

    angular: np.ndarray
    cosine: np.ndarray
    tokens: int
    neurons: list[np.ndarray] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return self.angular.shape[0] - 1

    def influence(self) -> np.ndarray:
        """ShortGPT's block influence of each layer: 1 - mean cos(x_i, x_{i+1})."""
        return 1.0 - np.diagonal(self.cosine, 1)

    def block_distance(self, n: int) -> np.ndarray:
        """Mean angular distance between x_l and x_{l+n} for every start l in 0..L-n (the cost of dropping
        layers l..l+n-1 as one block)."""
        return np.array([self.angular[s, s + n] for s in range(self.num_layers - n + 1)])


def check_architecture(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise KDError(
            f"pruning supports llama-style decoders ({', '.join(ARCHITECTURES)}); this teacher is {model_type!r}. "
            "Give the student as student.pretrained or student.config instead"
        )


def _layers(model):
    return model.model.layers


_POSITIONS = 512  # positions per step of the angular reduction: (L+1) x 512 x H fp32 states at a time


def measure(model, batches, neurons: bool = False) -> Importance:
    """One pass over `batches` of (input_ids [B, T] int64, lengths [B]) with the model in eval mode: the residual
    stream at every depth (forward hooks on each decoder layer, so x_L is the last layer's output before the final
    norm) reduced to the angular/cosine matrices over non-padding positions, fp64 sums, 512 positions at a time.
    The hooks hold one batch's L + 1 states (in the model's dtype): size the batches to the teacher."""
    check_architecture(model.config)
    layers = _layers(model)
    L = len(layers)
    states: dict[int, torch.Tensor] = {}
    acts: dict[int, torch.Tensor] = {}
    hooks = []

    def grab_input(i):
        def hook(module, args, kwargs):
            states[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def grab_output(module, args, output):
        states[L] = output[0] if isinstance(output, tuple) else output

    def grab_act(i):
        def hook(module, args):
            acts[i] = args[0]

        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(grab_input(i), with_kwargs=True))
        if neurons:
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(grab_act(i)))
    hooks.append(layers[-1].register_forward_hook(grab_output))
    ang = np.zeros((L + 1, L + 1))
    cos = np.zeros((L + 1, L + 1))
    act_sums = [np.zeros(layer.mlp.down_proj.in_features) for layer in layers] if neurons else []
    tokens = 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids, lengths in batches:
                ids = ids.to(device)
                valid = torch.arange(ids.shape[1], device=device)[None, :] < lengths.to(device)[:, None]
                states.clear()
                acts.clear()
                model.model(input_ids=ids, attention_mask=valid.long())
                flat = [states[i].reshape(-1, states[i].shape[-1]) for i in range(L + 1)]
                positions = valid.reshape(-1).nonzero()[:, 0]
                for a in range(0, len(positions), _POSITIONS):  # bounded temporaries whatever the batch or width
                    p = positions[a : a + _POSITIONS]
                    x = torch.stack([f[p].float() for f in flat])  # [L+1, P, H]
                    u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                    c = torch.einsum("aph,bph->abp", u, u).clamp(-1.0, 1.0)  # [L+1, L+1, P] cosines
                    cos += c.double().sum(-1).cpu().numpy()
                    ang += (torch.arccos(c) / math.pi).double().sum(-1).cpu().numpy()
                for i in range(len(act_sums)):
                    act_sums[i] += acts[i][valid].abs().double().sum(0).cpu().numpy()
                tokens += int(valid.sum())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise KDError("no calibration tokens: the cache's train split is empty")
    out = Importance(ang / tokens, cos / tokens, tokens)
    for i, s in enumerate(act_sums):
        w = layers[i].mlp.down_proj.weight.detach().double().norm(dim=0).cpu().numpy()  # ||W_down[:, j]||
        out.neurons.append(s / tokens * w)
    return out


@dataclass(frozen=True)
class Rule:
    """A rule choosing which decoder layers to keep: `keep(imp, L, n)` the kept layers (increasing) when n of the L
    layers are dropped, and `candidates(imp, L, n)` what it weighed, one line each (`python -m kd.prune` prints
    them). A new rule is one entry of RULES plus its test (tests/test_prune.py enumerates RULES)."""

    keep: Callable[[Importance, int, int], list[int]]
    candidates: Callable[[Importance, int, int], list[str]]


def _block_keep(imp: Importance, L: int, n: int) -> list[int]:
    start = int(np.argmin(imp.block_distance(n))) if n else 0
    return [i for i in range(L) if not start <= i < start + n]


def _influence_keep(imp: Importance, L: int, n: int) -> list[int]:
    drop = set(np.argsort(imp.influence(), kind="stable")[:n].tolist())
    return [i for i in range(L) if i not in drop]


RULES: dict[str, Rule] = {
    "block": Rule(
        _block_keep,
        lambda imp, L, n: [
            f"  drop layers {s:>2}-{s + n - 1:<2}  angular distance {v:.4f}"
            for s, v in enumerate(imp.block_distance(n))
        ],
    ),
    "influence": Rule(
        _influence_keep,
        lambda imp, L, n: [f"  layer {i:>2}  block influence {v:.4f}" for i, v in enumerate(imp.influence())],
    ),
    "every_other": Rule(
        lambda imp, L, n: sorted({round(i * L / (L - n)) for i in range(L - n)}),
        lambda imp, L, n: [f"  every other: {L} -> {L - n} layers (no measurement)"],
    ),
}


def choose_layers(imp: Importance, num_layers: int, rule: str) -> list[int]:
    """The decoder layers kept (increasing) when `num_layers` of imp.num_layers are kept under `rule`."""
    L = imp.num_layers
    if not 1 <= num_layers <= L:
        raise KDError(f"num_layers must be in 1..{L} (the teacher's layers), got {num_layers}")
    if rule not in RULES:
        raise KDError(f"unknown pruning rule {rule!r}; choose one of {list(RULES)}")
    return RULES[rule].keep(imp, L, L - num_layers)


def check_layers(layers: list[int], num_teacher_layers: int) -> list[int]:
    if not layers:
        raise KDError("the kept layer list is empty: keep at least one decoder layer")
    bad = [i for i in layers if not 0 <= i < num_teacher_layers]
    if bad:
        raise KDError(f"kept layers {bad} are outside the teacher's decoder layers 0..{num_teacher_layers - 1}")
    if list(layers) != sorted(set(layers)):
        raise KDError(f"kept layers must be strictly increasing (each teacher layer once, in order), got {layers}")
    return list(layers)


def keep_neurons(imp: Importance, layers: list[int], intermediate_size: int) -> dict[int, np.ndarray]:
    """Per kept teacher layer, the `intermediate_size` MLP neurons of largest importance, in their original order."""
    width = len(imp.neurons[layers[0]])
    if not 1 <= intermediate_size <= width:
        raise KDError(f"intermediate_size must be in 1..{width} (the teacher's MLP width), got {intermediate_size}")
    return {i: np.sort(np.argsort(-imp.neurons[i], kind="stable")[:intermediate_size]) for i in layers}


def prune(teacher, layers: list[int], neurons: dict[int, np.ndarray] | None = None):
    """A new model of the teacher's class with decoder layers `layers` (teacher indices) and, when given, only the
    MLP neurons `neurons[i]` of each; every weight copied exactly from the teacher (embeddings, final norm and head
    included, tied or not). The config records where the student came from (`kd_pruned_from`)."""
    from transformers import AutoModelForCausalLM

    check_architecture(teacher.config)
    L = teacher.config.num_hidden_layers
    layers = check_layers(layers, L)
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None) is not None:  # per-layer attention kinds (sliding windows): kept ones only
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    if getattr(cfg, "max_window_layers", None) is not None:  # qwen2: layers from this index on use sliding windows
        cfg.max_window_layers = sum(1 for i in layers if i < cfg.max_window_layers)
    width = None
    if neurons is not None:
        sizes = {len(v) for v in neurons.values()}
        if len(sizes) != 1 or set(neurons) != set(layers):
            raise KDError("MLP pruning keeps the same number of neurons in every kept layer")
        width = sizes.pop()
        if not 1 <= width <= teacher.config.intermediate_size:
            raise KDError(f"intermediate_size must be in 1..{teacher.config.intermediate_size}, got {width}")
        cfg.intermediate_size = width
    cfg.kd_pruned_from = {
        "teacher_layers": layers,
        "teacher_num_layers": L,
        "teacher_intermediate_size": teacher.config.intermediate_size,
        "intermediate_size": width or teacher.config.intermediate_size,
    }
    dtype = next(teacher.parameters()).dtype
    student = AutoModelForCausalLM.from_config(
        cfg, dtype=dtype, attn_implementation=teacher.config._attn_implementation
    )
    source = teacher.state_dict()
    state = {}
    for key, target in student.state_dict().items():
        parts = key.split(".")
        src_key, layer = key, None
        if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
            layer = layers[int(parts[2])]
            src_key = ".".join(parts[:2] + [str(layer)] + parts[3:])
        value = source[src_key]
        if neurons is not None and layer is not None and ".mlp." in key:
            idx = torch.from_numpy(neurons[layer]).to(value.device)
            if key.endswith(("gate_proj.weight", "up_proj.weight", "gate_proj.bias", "up_proj.bias")):
                value = value.index_select(0, idx)
            elif key.endswith("down_proj.weight"):
                value = value.index_select(1, idx)
        if value.shape != target.shape:
            raise KDError(f"cannot prune {key}: teacher {tuple(value.shape)} vs student {tuple(target.shape)}")
        state[key] = value.clone()
    student.load_state_dict(state, strict=True)
    if getattr(cfg, "tie_word_embeddings", False):
        student.tie_weights()
    return student


def calibration_batches(cache, num_sequences: int, batch_size: int = 8):
    """The first `num_sequences` train windows of the cache as (input_ids, lengths) batches."""
    split = cache.split("train", ("input_ids",))
    n = min(num_sequences, len(split))
    for a in range(0, n, batch_size):
        rows = [split[i] for i in range(a, min(a + batch_size, n))]
        yield torch.stack([r["input_ids"] for r in rows]).long(), torch.stack([r["length"] for r in rows]).long()


def load_cache_teacher(cache, teacher: str | None = None, dtype: str = "fp32"):
    """The cache's teacher (or `teacher`), refused when its weights are not the ones the cache was made from: a
    student cut from other weights would start from a model the cached targets do not describe."""
    t = cache.info.teacher
    path = teacher or t.name_or_path
    config = load_model_config(path, t.revision if teacher is None else None)
    check_architecture(config)
    recorded = t.weights
    if recorded is not None and teacher is None:
        now = weights_fingerprint(path, t.revision, t.commit_hash)
        if now["digest"] != recorded["digest"]:
            raise KDError(
                f"the teacher weights at {path} are not the ones cache {cache.root} was made from (fingerprint "
                f"{now['digest'][:12]}... vs {recorded['digest'][:12]}...): prune the cache's own teacher, or re-cache"
            )
    return load_causal_lm(path, t.revision if teacher is None else None, dtype, "sdpa")


def cut(
    teacher,
    imp: Importance | None,
    rule: str,
    num_layers: int | None = None,
    layers: list[int] | None = None,
    intermediate_size: int | None = None,
):
    """The one cut `student.from_teacher` and `python -m kd.prune` share: the kept layers (`layers`, explicit, or
    `num_layers` chosen by `rule` from the measured importance `imp`), the kept MLP neurons when `intermediate_size`
    is given, the pruned model, whose config records what was kept and measured (`kd_pruned_from`: the rule,
    "explicit" for a given list, and the calibration tokens). Returns (the model, its kept teacher layers)."""
    L = teacher.config.num_hidden_layers
    layers = check_layers(layers, L) if layers is not None else choose_layers(imp, num_layers, rule)
    neurons = keep_neurons(imp, layers, intermediate_size) if intermediate_size is not None else None
    student = prune(teacher, layers, neurons)
    record = dict(student.config.kd_pruned_from, rule=rule)
    if imp is not None:
        record["calibration_tokens"] = imp.tokens
    student.config.kd_pruned_from = record
    return student, layers


def from_teacher(cache, spec, log=print, device="cpu"):
    """The student `student.from_teacher` describes (kd.train_config.FromTeacherConfig), built from the cache's
    teacher, whose calibration pass runs on `device`: (model on the CPU, record of what was kept and measured)."""
    teacher = load_cache_teacher(cache, spec.teacher).to(device)
    imp = None
    if spec.layers is None or spec.intermediate_size is not None:
        imp = measure(
            teacher, calibration_batches(cache, spec.calibration_sequences), spec.intermediate_size is not None
        )
    rule = "explicit" if spec.layers is not None else spec.rule
    student, layers = cut(teacher, imp, rule, spec.num_layers, spec.layers, spec.intermediate_size)
    student = student.to("cpu")
    log(
        f"[student] built from the teacher: {len(layers)} of {teacher.config.num_hidden_layers} layers kept "
        f"({rule}: {layers})"
        + (
            f", MLP width {spec.intermediate_size} of {teacher.config.intermediate_size}"
            if spec.intermediate_size
            else ""
        )
    )
    del teacher
    return student, student.config.kd_pruned_from


def feature_pairs(record: dict, cached_layers: list[int]) -> list[list[int]]:
    """[student_layer, teacher_layer] pairs (hidden_states indices) for a pruned student: the output of each kept
    layer matched to the output of the teacher layer it was copied from, where the cache holds that teacher layer.
    The last student layer's output is final-normed (hidden_states[k]) and pairs only with the teacher's final-normed
    output, i.e. when the teacher's last layer was kept."""
    layers, L = record["teacher_layers"], record["teacher_num_layers"]
    k = len(layers)
    pairs = []
    for j, t in enumerate(layers):
        s_idx, t_idx = j + 1, t + 1
        if (s_idx == k) != (t_idx == L):  # one side final-normed, the other not: not the same kind of state
            continue
        if t_idx in cached_layers:
            pairs.append([s_idx, t_idx])
    return pairs
