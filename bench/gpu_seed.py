"""The GPU truth in one command, at the original project's shapes: what only a GPU can show, measured the moment one
is lent (one H100 or H200, 15 minutes of device time in all, no package registry, 64 MiB of files).

    python bench/gpu_seed.py [--out FILE.json]            # one CUDA GPU: ~3-5 minutes on an H100 (estimated)
    python bench/gpu_seed.py --device cpu --tiny          # the same plumbing at toy shapes in seconds (a test)

Needs only what the lent machine has (torch, transformers, accelerate, numpy, pyyaml, h5py): no install of kd (the
repository's kd/ is imported from here), no cache, no tokenizer, no hub. The models are built from configs with
random weights at the shapes ../shared/ASSETS.md records (time and memory do not depend on the weights' values):

    teacher   Qwen3-MoE, hidden 1024, 28 layers, 16/8 heads of 128, 3 experts with 1 active (FFN 3072),
              V = 151,936, untied head (1.28 B parameters: huihui-ai/Huihui-MoE-1B-A0.6B)
    student   SmolLM-135M: llama, hidden 576, 30 layers, 9/3 heads, FFN 1536, V = 49,152, tied (134.5 M)
    wide      the same student body at the teacher's V = 151,936 (the fused head's case)

and the text is token ids drawn uniformly. The cached teacher signal of the student's steps is what the caching pass
computes from a teacher's logits (kd.teacher: the top-k under the full softmax, the sampled targets), drawn from
random logits at the student's vocabulary: the cross-tokenizer alignment of the original pair is CPU work in the
loader, measured elsewhere (bench_head.py). What it measures, each part through kd's own code:

    cache    the caching pass's device work per batch (kd.teacher.teacher_targets: forward with the stored hidden
             layers, top-256 and log-normaliser in fp32, sampled targets; results copied to the host, where the
             writer encodes them) against a bare teacher forward at the same batch, bf16 and fp16: tokens/s, peak
    step     one optimizer step at the seed's shapes (micro-batch 2 x 384, GA 16, kd.train.optimizer_step under an
             Accelerator with fp16 + gradient scaler, or bf16): cached top-256 KD + CE, cached sampled targets,
             the teacher online (the MoE teacher at the student's vocabulary, in the training process), CE only,
             and cached top-256 with the fused head off: tokens/s, peak
    head     the wide student, one step over 8 x 1024 tokens in bf16, fused LM head on and off: peak
    checks   fp16: a window with a NaN teacher value is skipped through the scaler path (weights kept, scale lowered)
             and the run goes on; 20 steps in bf16 and fp16 end within a stated tolerance of fp32 on the same windows
    backends the cached step under FSDP2, and ZeRO-2/ZeRO-3 where DeepSpeed is installed, on one process through
             `accelerate launch` with the shipped launch configs (CUDA only: Accelerate starts them on GPUs). The
             lent machine has no DeepSpeed; its wheel and those of its pure-Python dependencies can travel in
             the 64 MiB (`pip install --no-index --find-links DIR deepspeed` there)

Peak memory: torch.cuda.max_memory_allocated, reset before each measurement. On CPU (the tiny run) the figures are
the process's peak RSS, which cannot be reset: meaningless beyond the plumbing. Prints one table (device named) and
writes it as JSON (--out); the goals of issue 31 are judged in it (on CPU they are printed, not judged).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED_TOKENS_PER_S = 1900.0  # the original project: 2.5 it/s of 2 x 384 tokens, teacher in the loop, P100


@dataclass(frozen=True)
class Shapes:
    """Every size of one run: the models (transformers config fields) and the batches of each measurement."""

    teacher: dict
    student: dict
    student_vocab: int
    cache_batch: tuple[int, int]  # sequences x tokens per caching-pass batch
    top_k: int
    sample_n: int
    hidden_layers: tuple[int, ...]  # teacher layers the caching pass keeps (the original pair's config)
    step: tuple[int, int, int]  # micro-batch sequences, tokens, gradient accumulation steps
    head_batch: tuple[int, int]  # sequences x tokens of the fused-head step
    timed: int  # timed repetitions after one warm-up
    check_steps: int  # steps of the precision check
    check_ga: int  # its accumulation (the losses compared are the windows' means)


FULL = Shapes(
    teacher=dict(
        model_type="qwen3_moe",
        hidden_size=1024,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        num_experts=3,
        num_experts_per_tok=1,
        moe_intermediate_size=3072,
        intermediate_size=3072,
        vocab_size=151936,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    student=dict(
        model_type="llama",
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
    student_vocab=49152,
    cache_batch=(8, 1024),
    top_k=256,
    sample_n=50,
    hidden_layers=(14, 28),
    step=(2, 384, 16),
    head_batch=(8, 1024),
    timed=3,
    check_steps=20,
    check_ga=4,
)

TINY = Shapes(
    teacher={
        **FULL.teacher,
        **dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            moe_intermediate_size=96,
            intermediate_size=96,
            vocab_size=1024,
        ),
    },
    student={
        **FULL.student,
        **dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    },
    student_vocab=512,
    cache_batch=(2, 32),
    top_k=16,
    sample_n=8,
    hidden_layers=(1, 2),
    step=(2, 16, 2),
    head_batch=(2, 32),
    timed=2,
    check_steps=4,
    check_ga=2,
)

# |loss - fp32 loss| / fp32 loss at every one of the check's steps. fp16 keeps 11 mantissa bits, bf16 8: a
# rounding of ~5e-4 and ~4e-3 per operand, averaged over thousands of positions per loss; the bound allows the
# 20 steps' updates to drift apart by ten times that.
TOLERANCE = {"fp16": 5e-3, "bf16": 2e-2}


@dataclass
class Row:
    """One measurement of the table."""

    part: str  # cache | step | head | backend
    name: str
    precision: str
    tokens_per_s: float | None = None
    peak_mb: float | None = None
    note: str = ""


@dataclass
class Check:
    """A pass/fail finding: what was checked, whether it held, the numbers behind it."""

    name: str
    passed: bool
    detail: str


@dataclass
class Report:
    device: str
    tiny: bool
    versions: dict
    rows: list[Row] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    goals: list[Check] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- building blocks


def build_lm(fields: dict, vocab: int | None, dtype, device, seed: int = 0):
    """A random-weight causal LM from config fields, created on `device` (a 1.28 B model's init on the CPU would take
    minutes), in `dtype`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(fields)
    if vocab is not None:
        fields["vocab_size"] = vocab
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return lm.to(dtype)


def dtype_of(precision: str):
    import torch

    return {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device) -> float:
    from kd.train import peak_memory_mb

    return peak_memory_mb(device)


def timed(fn, device, reps: int) -> float:
    """Seconds per call of `fn` over `reps` calls after one warm-up call."""
    fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / reps


def cached_targets(n: int, vocab: int, top_k: int, sample_n: int, generator, device) -> dict:
    """The cache fields of `n` positions as the caching pass computes them from a teacher's logits (random logits
    here, spread as a trained LM's are: most of the mass on a few tokens): the top-k log-probs under the full
    softmax and the sampled targets (kd.teacher.sample_targets)."""
    import torch

    from kd.teacher import sample_targets

    z = torch.randn(n, vocab, generator=generator, device=device) * 4.0
    top_z, top_i = z.topk(top_k, dim=-1)
    lp = top_z - torch.logsumexp(z, dim=-1, keepdim=True)
    s_ids, s_counts = sample_targets(z, sample_n, generator)
    return {"topk_ids": top_i, "topk_logprobs": lp, "sample_ids": s_ids, "sample_counts": s_counts}


def make_windows(shapes: Shapes, count: int, ga: int, seed: int, device) -> list[list[dict]]:
    """`count` optimizer windows of `ga` micro-batches, on the host as the loader hands them over (pinned on CUDA):
    uniform token ids, full-length windows, and the cached signal at the student's vocabulary."""
    import torch

    B, T, _ = shapes.step
    V = shapes.student_vocab
    g = torch.Generator(device=device).manual_seed(seed)
    windows = []
    for _ in range(count):
        window = []
        for _ in range(ga):
            fields = cached_targets(B * T, V, shapes.top_k, shapes.sample_n, g, device)
            batch = {k: v.reshape(B, T, -1) for k, v in fields.items()}
            batch["input_ids"] = torch.randint(0, V, (B, T), generator=g, device=device)
            batch["length"] = torch.full((B,), T, device=device)
            batch = {k: v.cpu() for k, v in batch.items()}
            if device.type == "cuda":
                batch = {k: v.pin_memory() for k, v in batch.items()}
            window.append(batch)
        windows.append(window)
    return windows


def fresh_accelerator(precision: str, device):
    """An Accelerator for one measurement: Accelerate keeps one process-wide state, and each row has its own
    precision, so the state is reset first (a user's run creates one Accelerator)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=1, cpu=device.type == "cpu")


def loss_config(variant: str):
    """The run's loss of each step variant, as train_student.py builds it from a config."""
    from kd.train_config import LossConfig

    if variant == "ce":
        return LossConfig(alpha_ce=1.0, alpha_kd=0.0)
    target = {"sampled": "sampled", "online": "online"}.get(variant, "topk")
    return LossConfig(alpha_ce=0.5, alpha_kd=0.5, target=target, tail="bucket")


# ---------------------------------------------------------------------------------------------------------- the parts


def cache_part(shapes: Shapes, device, report: Report) -> None:
    """The caching pass's device work per batch against a bare teacher forward, bf16 and fp16."""
    import torch

    B, T = shapes.cache_batch
    ids = torch.randint(0, shapes.teacher["vocab_size"], (B, T), device=device)
    for precision in ("bf16", "fp16"):
        teacher = build_lm(shapes.teacher, None, dtype_of(precision), device).eval()
        bare = measure_cache(teacher, ids, shapes, device, bare=True)
        cached = measure_cache(teacher, ids, shapes, device, bare=False)
        del teacher
        report.rows.append(Row("cache", "bare teacher forward", precision, *bare))
        note = (
            f"top-{shapes.top_k} + {shapes.sample_n} sampled + layers {list(shapes.hidden_layers)}; "
            f"{cached[0] / bare[0]:.2f}x the bare forward"
        )
        report.rows.append(Row("cache", "caching pass (device work)", precision, *cached, note))


def measure_cache(teacher, ids, shapes: Shapes, device, bare: bool) -> tuple[float, float]:
    """(tokens/s, peak MB) of the teacher's bare forward over the batch `ids`, or of the caching pass's device work
    on it (kd.teacher.teacher_targets, as kd.cache.build calls it, and the copy of its results to the host)."""
    import torch

    from kd.teacher import sequence_generator, teacher_targets

    B, T = ids.shape
    mask = torch.ones_like(ids)

    def forward():
        with torch.inference_mode():
            return teacher(input_ids=ids).logits

    def cache_batch():
        gens = [sequence_generator(0, "train", i, device) for i in range(B)]
        lp, top_ids, hidden, samples = teacher_targets(
            teacher,
            ids,
            mask,
            shapes.top_k,
            list(shapes.hidden_layers),
            sample_n=shapes.sample_n,
            sample_generators=gens,
        )
        return [t.cpu() for t in (lp, top_ids, hidden, *samples)]  # to the host, where the writer encodes them

    reset_peak(device)
    seconds = timed(forward if bare else cache_batch, device, shapes.timed)
    return B * T / seconds, peak_mb(device)


STEP_VARIANTS = {
    "topk": "cached top-256 KD + CE",
    "sampled": "cached sampled KD + CE",
    "online": "teacher online KD + CE",
    "ce": "CE only",
    "topk_unfused": "cached top-256 KD + CE, fused head off",
}


def prepared_student(
    shapes: Shapes, accelerator, vocab: int | None = None, seed: int = 0, fused: bool = True, lr: float = 5e-4
):
    """A fresh random-init student (seed `seed`, at `vocab` or the shapes' student vocabulary) in kd's DistillModel
    and its AdamW, prepared by `accelerator`: -> (model, optimizer)."""
    import torch

    from kd.train import DistillModel

    lm = build_lm(shapes.student, vocab or shapes.student_vocab, torch.float32, accelerator.device, seed)
    model = DistillModel(lm, [], shapes.teacher["hidden_size"], fused_head=fused)
    return accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=lr))


def train_steps(
    shapes: Shapes,
    device,
    precision: str,
    variant: str,
    windows,
    steps: int,
    teacher=None,
    seed: int = 0,
    lr: float = 5e-4,
    student_vocab: int | None = None,
):
    """`steps` optimizer steps of a fresh student (seed `seed`) over `windows` (cycled) through kd's own step:
    -> (StepResults, seconds per step after the first)."""
    from kd.train import LossPlan, optimizer_step

    accelerator = fresh_accelerator(precision, device)
    model, optimizer = prepared_student(shapes, accelerator, student_vocab, seed, variant != "topk_unfused", lr)
    plan = LossPlan.build(loss_config(variant), teacher=teacher)
    results, t0 = [], None
    for i in range(steps):
        if i == 1:  # the first step pays for allocator growth and kernel selection
            synchronize(device)
            t0 = time.perf_counter()
        results.append(optimizer_step(model, optimizer, windows[i % len(windows)], plan, accelerator, lr, 1.0))
    synchronize(device)
    per_step = (time.perf_counter() - t0) / max(steps - 1, 1) if t0 is not None else math.nan
    return results, per_step


def step_part(shapes: Shapes, device, report: Report) -> None:
    """One optimizer step at the seed's shapes per variant and precision."""
    B, T, ga = shapes.step
    windows = make_windows(shapes, 1, ga, 0, device)
    for precision in ("fp16", "bf16"):
        for variant, label in STEP_VARIANTS.items():
            teacher = None
            if variant == "online":  # the teacher in the training process, at the student's vocabulary
                teacher = build_lm(shapes.teacher, shapes.student_vocab, dtype_of(precision), device).eval()
            reset_peak(device)
            results, per_step = train_steps(shapes, device, precision, variant, windows, shapes.timed + 1, teacher)
            applied = sum(r.applied for r in results)
            note = f"{applied}/{len(results)} steps applied" if applied < len(results) else ""
            report.rows.append(Row("step", label, precision, B * T * ga / per_step, peak_mb(device), note))
            del teacher


def head_part(shapes: Shapes, device, report: Report) -> None:
    """The wide student (V = the teacher's), one step over head_batch tokens in bf16, fused head on and off."""
    B, T = shapes.head_batch
    wide = replace(shapes, step=(B, T, 1), student_vocab=shapes.teacher["vocab_size"])
    windows = make_windows(wide, 1, 1, 1, device)
    peaks = {}
    for variant in ("topk", "topk_unfused"):
        reset_peak(device)
        train_steps(wide, device, "bf16", variant, windows, 2)
        peaks[variant] = peak_mb(device)
        note = "" if variant == "topk" else f"fused/unfused peak {peaks['topk'] / peaks['topk_unfused']:.3f}"
        name = "fused LM head" if variant == "topk" else "fused LM head off"
        report.rows.append(
            Row("head", f"{name}, V={wide.student_vocab}, {B} x {T}", "bf16", None, peaks[variant], note)
        )


def check_part(shapes: Shapes, device, report: Report) -> None:
    """fp16's skipped window and the precisions' agreement with fp32."""
    import torch

    # 1. A NaN in the cached teacher values of window 2 (of 4): that window is skipped through the scaler path (the
    # scale is lowered, as torch's own skipped step would), the weights stay as they were, the run goes on.
    windows = make_windows(shapes, 4, shapes.check_ga, 2, device)
    windows[1] = [dict(b) for b in windows[1]]
    windows[1][0]["topk_logprobs"] = windows[1][0]["topk_logprobs"].clone()
    windows[1][0]["topk_logprobs"][0, 0, 0] = float("nan")
    from kd.train import LossPlan, optimizer_step

    accelerator = fresh_accelerator("fp16", device)
    model, optimizer = prepared_student(shapes, accelerator)
    plan = LossPlan.build(loss_config("topk"))
    scales, applied, kept, losses = [], [], [], []
    for w in windows:
        before = [p.detach().clone() for p in model.parameters()]
        scales.append(accelerator.scaler.get_scale() if accelerator.scaler is not None else None)
        r = optimizer_step(model, optimizer, w, plan, accelerator, 5e-4, 1.0)
        applied.append(r.applied)
        kept.append(all(torch.equal(a, b) for a, b in zip(before, model.parameters())))
        losses.append(r.result.raw.get("kd"))
    scaler = accelerator.scaler
    scale_after = scaler.get_scale() if scaler is not None else None
    # on the scaler's first step its scale may also fall for an fp16 overflow of the first window's own gradients;
    # what must hold is that the skipped window lowers it. Accelerate runs fp16 as fp32 on a CPU: no scaler there
    lowered = scaler is None or scales[2] < scales[1]
    ok = applied[1] is False and kept[1] and applied[2] and applied[3] and lowered and math.isfinite(losses[3])
    report.checks.append(
        Check(
            "fp16: a window with a NaN teacher value is skipped, the run goes on",
            bool(ok),
            f"applied per window {applied}, weights kept on window 2: {kept[1]}, scale before each window {scales} "
            f"then {scale_after}, KD loss per window {[None if x is None else round(x, 4) for x in losses]}"
            + ("" if scaler is not None else " (no gradient scaler: Accelerate runs fp16 as fp32 on this device)"),
        )
    )
    del model, optimizer

    # 2. The same windows and init in fp32, bf16 and fp16: the window losses of every step agree within TOLERANCE.
    windows = make_windows(shapes, shapes.check_steps, shapes.check_ga, 3, device)
    curves = {}
    for precision in ("no", "bf16", "fp16"):
        results, _ = train_steps(shapes, device, precision, "topk", windows, shapes.check_steps, seed=1)
        curves[precision] = [r.result.raw["ce"] * 0.5 + r.result.raw["kd"] * 0.5 for r in results]
    for precision in ("bf16", "fp16"):
        rel = [abs(a - b) / abs(b) for a, b in zip(curves[precision], curves["no"])]
        worst = max(rel)
        report.checks.append(
            Check(
                f"{precision}: loss of {shapes.check_steps} steps within {TOLERANCE[precision]:g} (relative) of fp32",
                bool(worst <= TOLERANCE[precision] and all(map(math.isfinite, curves[precision]))),
                f"worst relative difference {worst:.2e} at step {rel.index(worst) + 1}; first/last loss fp32 "
                f"{curves['no'][0]:.4f}/{curves['no'][-1]:.4f}, {precision} "
                f"{curves[precision][0]:.4f}/{curves[precision][-1]:.4f}"
                + (" (Accelerate runs fp16 as fp32 on a CPU)" if precision == "fp16" and device.type == "cpu" else ""),
            )
        )


LAUNCHED = {"fsdp2": "FSDP2", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}  # configs/accelerate/*.yaml


def backend_part(args, shapes: Shapes, device, report: Report) -> None:
    """The cached step under each sharding back-end on one process, through Accelerate's launcher with the shipped
    launch config (a child run of this script: `--only launched_step --launch NAME`); said so where it cannot run."""
    for name, label in LAUNCHED.items():
        row = f"{label} (1 process)"
        if name.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
            report.rows.append(Row("backend", row, "-", note="DeepSpeed is not installed here: not measured"))
            continue
        if device.type != "cuda":
            report.rows.append(
                Row(
                    "backend",
                    row,
                    "-",
                    note="CUDA only: Accelerate starts FSDP and DeepSpeed on GPUs (on CPU "
                    "processes: tests/test_sharded_training.py)",
                )
            )
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / f"{name}.json"
            cmd = [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(ROOT / f"configs/accelerate/{name}.yaml"),
                "--num_processes",
                "1",
                str(Path(__file__).resolve()),
                "--only",
                "launched_step",
                "--launch",
                name,
                "--out",
                str(out),
            ] + (["--tiny"] if args.tiny else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0 or not out.exists():
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
                report.rows.append(Row("backend", row, "bf16", note=f"failed: {' | '.join(tail)}"))
                continue
            report.rows.extend(Row(**r) for r in json.loads(out.read_text())["rows"])


def launched_step(args, shapes: Shapes, device, report: Report) -> None:
    """(the child of backend_part) the cached top-256 step in bf16 under the launcher's back-end."""
    from accelerate import Accelerator

    from kd.train import LossPlan, optimizer_step
    from kd.train.backend import backend_for

    B, T, ga = shapes.step
    windows = make_windows(shapes, 1, ga, 0, device)
    accelerator = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=1)
    model, optimizer = prepared_student(shapes, accelerator)
    backend = backend_for(accelerator, model)
    plan = LossPlan.build(loss_config("topk"))
    reset_peak(accelerator.device)
    optimizer_step(model, optimizer, windows[0], plan, backend, 5e-4, 1.0)
    synchronize(accelerator.device)
    t0 = time.perf_counter()
    for _ in range(shapes.timed):
        r = optimizer_step(model, optimizer, windows[0], plan, backend, 5e-4, 1.0)
    synchronize(accelerator.device)
    per_step = (time.perf_counter() - t0) / shapes.timed
    report.rows.append(
        Row(
            "backend",
            f"{LAUNCHED[args.launch]} (1 process, {type(backend).__name__}): {STEP_VARIANTS['topk']}",
            "bf16",
            B * T * ga / per_step,
            peak_mb(accelerator.device),
            "" if r.applied else "last step not applied",
        )
    )


# ------------------------------------------------------------------------------------------------------------ report


def judge_goals(report: Report) -> None:
    """Issue 31's goals, from the rows (judged only on CUDA: CPU figures say nothing of a GPU)."""

    def row(part, name, precision):
        return next((r for r in report.rows if r.part == part and r.name == name and r.precision == precision), None)

    for precision in ("fp16", "bf16"):
        cached, online = row("step", STEP_VARIANTS["topk"], precision), row("step", STEP_VARIANTS["online"], precision)
        if cached and online:
            report.goals.append(
                Check(
                    f"{precision} cached step: peak <= 4 GB and >= 3x the seed's {SEED_TOKENS_PER_S:.0f} tokens/s",
                    cached.peak_mb <= 4096 and cached.tokens_per_s >= 3 * SEED_TOKENS_PER_S,
                    f"peak {cached.peak_mb:.0f} MB, {cached.tokens_per_s:.0f} tokens/s "
                    f"({cached.tokens_per_s / SEED_TOKENS_PER_S:.1f}x the seed)",
                )
            )
            report.goals.append(
                Check(
                    f"{precision} cached step >= 3x the online-teacher step",
                    cached.tokens_per_s >= 3 * online.tokens_per_s,
                    f"{cached.tokens_per_s / online.tokens_per_s:.2f}x",
                )
            )
        bare, cache = (
            row("cache", "bare teacher forward", precision),
            row("cache", "caching pass (device work)", precision),
        )
        if bare and cache:
            report.goals.append(
                Check(
                    f"{precision} caching pass >= 0.85x a bare teacher forward",
                    cache.tokens_per_s >= 0.85 * bare.tokens_per_s,
                    f"{cache.tokens_per_s / bare.tokens_per_s:.2f}x",
                )
            )
    heads = [r for r in report.rows if r.part == "head"]
    if len(heads) == 2:
        report.goals.append(
            Check(
                "fused head: peak <= 1/4 of the unfused path",
                heads[0].peak_mb <= heads[1].peak_mb / 4,
                f"{heads[0].peak_mb:.0f} MB vs {heads[1].peak_mb:.0f} MB ({heads[0].peak_mb / heads[1].peak_mb:.3f})",
            )
        )


def render(report: Report) -> str:
    lines = [f"[gpu_seed] {report.device}; " + ", ".join(f"{k} {v}" for k, v in report.versions.items())]
    if report.tiny:
        lines.append("[gpu_seed] --tiny: toy shapes; the figures test the plumbing, not a device")
    lines.append(f"{'part':8} {'what':62} {'prec':5} {'tokens/s':>10} {'peak MB':>9}  note")
    for r in report.rows:
        tps = f"{r.tokens_per_s:10.0f}" if r.tokens_per_s is not None else f"{'-':>10}"
        peak = f"{r.peak_mb:9.0f}" if r.peak_mb is not None else f"{'-':>9}"
        lines.append(f"{r.part:8} {r.name:62} {r.precision:5} {tps} {peak}  {r.note}")
    for title, checks in (("check", report.checks), ("goal", report.goals)):
        for c in checks:
            lines.append(f"{title:8} {'PASS' if c.passed else 'FAIL'}  {c.name}: {c.detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where to measure (default cuda)")
    p.add_argument("--tiny", action="store_true", help="toy shapes: the plumbing in seconds")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    p.add_argument("--launch", choices=list(LAUNCHED), help="(launched_step) the launch config it runs under")
    p.add_argument(
        "--only",
        nargs="+",
        default=["cache", "step", "head", "checks", "backends"],
        choices=["cache", "step", "head", "checks", "backends", "launched_step"],
        help="the parts to run",
    )
    args = p.parse_args(argv)

    import accelerate
    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --device cpu --tiny to check the plumbing", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    shapes = TINY if args.tiny else FULL
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or 'cpu'}, {os.cpu_count()} cores)"
    )
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }
    report = Report(name, args.tiny, versions)
    parts = {
        "cache": cache_part,
        "step": step_part,
        "head": head_part,
        "checks": check_part,
        "launched_step": lambda s, d, r: launched_step(args, s, d, r),
        "backends": lambda s, d, r: backend_part(args, s, d, r),
    }
    t0 = time.perf_counter()
    for part in args.only:
        print(f"[gpu_seed] {part} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        parts[part](shapes, device, report)
    if device.type == "cuda":
        judge_goals(report)
    print(render(report), flush=True)
    print(f"[gpu_seed] {time.perf_counter() - t0:.0f} s in all", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(asdict(report), indent=1))
    return 0 if all(c.passed for c in report.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
