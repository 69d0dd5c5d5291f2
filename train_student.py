"""Train a student against a teacher cache: no teacher in memory, one cache reused by every run.

    accelerate launch train_student.py --config configs/train_shakespeare.yaml [dotted.key=value ...]
    python train_student.py --config configs/train_shakespeare.yaml            # one process

Writes runs/<run_name>/: config.json, metrics.jsonl (one line per optimizer step and per eval), checkpoints/
(resumable Accelerate state), final/ (save_pretrained model + tokenizer + projectors) and final_ema/ when EMA
is on. `python -m kd.report runs/<run_name>` draws the curves.

Set-up (inputs checked before anything is written, then the student, optimizer and the loss plan), the loop (per
optimizer step: the LR from the pure schedule, then kd.train.optimizer_step: forward/backward the window's
micro-batches with the losses normalised once, skip the step if anything was non-finite, clip, step; log; evaluate
and checkpoint at optimizer-step boundaries), finish (final eval, checkpoint, save_pretrained).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kd import __version__
from kd.cache import TeacherCache, write_json_atomic
from kd.config import flatten, parse_cli, to_dict
from kd.dist import (
    backend_kind,
    build_whole,
    check_training_backend,
    configure_deepspeed,
    gather_rows,
    zero3_head_with_root,
)
from kd.errors import KDError, run_cli
from kd.evaluate import score_windows, text_windows
from kd.models import load_tokenizer, packing_fallback_reason, tokenizer_fingerprint
from kd.schedule import lr_at
from kd.textscore import batch_text_units, score_record
from kd.train import (
    EMA,
    RUN_FORMAT_VERSION,
    DistillModel,
    LossPlan,
    MetricsLog,
    TrainState,
    epoch_order,
    eval_record,
    make_loader,
    optimizer_step,
    peak_memory_mb,
    steps_per_epoch,
)
from kd.train.checkpoint import prepare_run_dir, save_checkpoint, save_final
from kd.train.engine import backend_for
from kd.train.generations import GenerationsLog, generate_replies, held_out_prompts
from kd.train_config import TrainConfig


def build_student(
    cfg: TrainConfig, tokenizer, teacher_vocab: int, cache: TeacherCache | None = None, log=print, device="cpu"
):
    """The student LM (`cache`: the teacher's, needed to cut a student from it). A student cut from the teacher
    carries what kd.prune kept and measured in `lm.config.kd_pruned_from` (saved with it in config.json)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kd.paths import resolve_path

    s = cfg.student
    if s.from_teacher is not None:  # cut from the cache's teacher: every process cuts the same (a deterministic pass)
        from kd import prune

        if cache is None:
            raise KDError("student.from_teacher cuts the student from a cache's teacher: give the cache")
        lm, _ = prune.from_teacher(cache, s.from_teacher, log, device)
    elif s.pretrained is not None:
        try:
            lm = AutoModelForCausalLM.from_pretrained(
                resolve_path(s.pretrained),
                revision=s.revision,
                attn_implementation=s.attn_implementation,
                dtype=torch.float32,
            )
        except (OSError, ValueError) as e:
            raise KDError(f"cannot load student '{s.pretrained}': {e}") from None
    else:
        fields = dict(s.config)
        fields.setdefault("vocab_size", len(tokenizer))
        try:
            model_cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
        except (ValueError, TypeError) as e:
            raise KDError(f"student.config is not a valid model config: {e}") from None
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


def cross_tokenizer_splits(
    cfg: TrainConfig, cache: TeacherCache, tokenizer, train_split, eval_split, run_dir: Path, accelerator
):
    """Wrap both splits in the student's tokenization, aligned to the teacher's (built once per cache and student
    tokenizer), log alignment and mapping coverage, and apply the alignment floor."""
    from kd import align

    teacher_tokenizer = load_tokenizer(cache.manifest["teacher"]["name_or_path"], cache.manifest["teacher"]["revision"])
    sep = cfg.loss.cross_tokenizer_separator or tokenizer.eos_token
    template = student_chat_template(cfg, cache, tokenizer) if "chat" in cache.manifest else None
    arrays = align.load_or_build(
        cache, tokenizer, sep, run_dir, accelerator.is_main_process, accelerator.wait_for_everyone, template
    )
    mapping = align.vocab_map(teacher_tokenizer, tokenizer, cache.manifest["teacher"]["vocab_size"])
    train = align.AlignedSplit(train_split, arrays["train"], mapping)
    evals = align.AlignedSplit(eval_split, arrays["eval"], mapping)
    cov = align.coverage(train)
    msg = (
        f"[cross-tokenizer] {cfg.loss.cross_tokenizer}: {cov['aligned_share']:.1%} of student positions aligned to a "
        f"teacher position; {cov['mapped_mass_share']:.1%} of the teacher's top-{cache.top_k} mass maps to identical "
        f"student tokens ({int((mapping >= 0).sum())} of {len(mapping)} teacher ids map)"
    )
    if accelerator.is_main_process:
        print(msg, flush=True)
    if cov["aligned_share"] < cfg.loss.min_aligned_share:
        low = (
            f"only {cov['aligned_share']:.1%} of student positions align to the teacher (floor "
            f"loss.min_aligned_share={cfg.loss.min_aligned_share}): check that the cache text and the student "
            "tokenizer belong together"
        )
        warn_or_refuse(accelerator, low, cfg.loss.on_low_alignment, "loss.on_low_alignment")
    return train, evals


def student_chat_template(cfg: TrainConfig, cache: TeacherCache, tokenizer) -> str | None:
    """The Jinja text a cross-tokenizer student renders a chat cache's conversations with (student.chat_template):
    None for its tokenizer's own."""
    from kd.data.chat import chat_template, check_chat_tokenizer

    choice = cfg.student.chat_template
    teacher = cache.manifest["chat"].get("template_text")
    if choice == "teacher" or (choice is None and not getattr(tokenizer, "chat_template", None)):
        if not teacher:
            raise KDError(
                f"cache {cfg.train.cache_dir} does not record the teacher's chat template (written by an older kd); "
                "give the student one with student.chat_template"
            )
        return teacher
    template = chat_template(choice)
    check_chat_tokenizer(tokenizer, template)
    return template


def warn_or_refuse(accelerator, message: str, policy: str, switch: str) -> None:
    """A doubtful input the user decides about: refused (one error naming the switch), or a loud warning."""
    if policy == "refuse":
        raise KDError(f"{message} ({switch}=refuse; {switch}=warn trains anyway)")
    if accelerator.is_main_process:
        bar = "WARNING " + "!" * 20
        print(f"{bar}\nWARNING: {message} ({switch}=refuse stops here)\n{bar}", file=sys.stderr, flush=True)


def check_feature_layers(pairs: list[list[int]], cache: TeacherCache, student_layers: int) -> list[int]:
    """Validate the layer map; return each pair's slot in the cached hidden_states."""
    slots = []
    for s_layer, t_layer in pairs:
        if not 0 <= s_layer <= student_layers:
            raise KDError(f"loss.feature_layers: student layer {s_layer} out of range 0..{student_layers}")
        if t_layer not in cache.hidden_layers:
            raise KDError(
                f"loss.feature_layers: teacher layer {t_layer} is not in the cache (it stores "
                f"{cache.hidden_layers}); re-cache with cache.hidden_layers including it"
            )
        slots.append(cache.hidden_layers.index(t_layer))
    return slots


def start_trackers(accelerator, tc, cfg_dict: dict) -> None:
    """Accelerate's trackers (train.log_with), with the resolved config as hyperparameters (flattened; values
    that are not numbers, strings or booleans as their JSON text, which every tracker accepts)."""
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flatten(cfg_dict).items()}
    try:
        accelerator.init_trackers(tc.run_name, config=hparams)
    except (ImportError, ModuleNotFoundError, ValueError) as e:
        raise KDError(
            f"cannot start the trackers train.log_with={tc.log_with}: {e}. Install the tracker's package (TensorBoard: "
            "pip install -e '.[tensorboard]'), or leave train.log_with empty (metrics.jsonl is always written)"
        ) from None


def compare_with_teacher(cfg: TrainConfig, cache: TeacherCache, student: dict, log, accelerator) -> None:
    """Step 0: the teacher's own bits per character on the eval split (kept in the manifest by the caching pass)
    against the student's before training. A teacher that is not better can only pull the student towards a
    weaker model: warned loudly, or refused with train.on_weaker_teacher=refuse."""
    teacher = cache.manifest["splits"].get("eval", {}).get("teacher_score")
    if not teacher or not math.isfinite(student.get("eval/bits_per_char", math.nan)):
        return  # a cache made before kd recorded the teacher's score
    log.write(
        {
            "step": 0,
            "event": "teacher_reference",
            "teacher/bits_per_char": teacher["bits_per_char"],
            "teacher/bits_per_byte": teacher["bits_per_byte"],
            "teacher/ce": teacher["ce_per_token"],
        }
    )
    t, s = teacher["bits_per_char"], student["eval/bits_per_char"]
    if accelerator.is_main_process:
        print(f"[train] held-out bits/char: teacher {t:.4f}, student before training {s:.4f}", flush=True)
    if t < s:
        return
    message = (
        f"the teacher is not better than the student on the eval text: {t:.4f} bits/char for the teacher "
        f"({cache.manifest['teacher']['name_or_path']}) against {s:.4f} for the untrained student. Distilling it "
        "pulls the student towards a weaker model; check the teacher (python -m kd.evaluate) or use a stronger one"
    )
    warn_or_refuse(accelerator, message, cfg.train.on_weaker_teacher, "train.on_weaker_teacher")


def main(cfg: TrainConfig) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t_start = time.time()
    # gradient_accumulation_steps=1: accumulation is done (and normalised) by hand in kd.train.accumulate_window.
    tc = cfg.train
    run_dir = Path(tc.output_dir) / tc.run_name
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=1,
        log_with=tc.log_with or None,  # trackers beside metrics.jsonl, which stays the record
        project_dir=str(run_dir / "trackers"),
    )
    check_training_backend(accelerator, tc)
    cfg_dict = to_dict(cfg)

    # 1. Inputs, checked before anything is written: cache, tokenizer match, run directory, layer map.
    cache = TeacherCache(tc.cache_dir, check=not tc.trust_cache)
    teacher_tok = cache.manifest["tokenizer"]
    from_teacher = cfg.student.from_teacher.teacher if cfg.student.from_teacher else None
    tok_source = (
        cfg.student.tokenizer or cfg.student.pretrained or from_teacher or cache.manifest["teacher"]["name_or_path"]
    )
    tokenizer = load_tokenizer(tok_source)
    cross = cfg.loss.cross_tokenizer is not None
    extra_windows, extra_sep = (
        text_windows(tokenizer, tc.extra_eval_files, cache.seq_len) if tc.extra_eval_files else (None, None)
    )
    if tokenizer_fingerprint(tokenizer) != teacher_tok["fingerprint"] and not cross:
        raise KDError(
            f"the student's tokenizer ({tok_source}) differs from the one the cache was made with "
            f"(fingerprint {teacher_tok['fingerprint'][:12]}...): same-tokenizer KD compares token ids, "
            "so they must match. Use the teacher's tokenizer for the student, or set "
            "loss.cross_tokenizer=hybrid (or mapped, uld) for cross-tokenizer KD"
        )
    if cross and not cache.manifest.get("store_text"):
        raise KDError(
            f"loss.cross_tokenizer needs the cached text and token spans, and cache {tc.cache_dir} was "
            "written without them: re-cache with cache.store_text=true"
        )
    resume_state = prepare_run_dir(run_dir, cfg_dict, tc.resume, cache.manifest.get("config_hash"))
    if resume_state is None and tc.resume and (run_dir / "final" / "kd_meta.json").exists():
        if accelerator.is_main_process:  # finished without its state (train.save_final_state): nothing to continue
            print(f"[train] {run_dir} already finished (final/ is saved, no training state kept); nothing to do")
        return run_dir
    terms = cfg.loss.loss_terms()
    need_hidden = any(t.kind in ("feature", "contrastive") for t in terms)
    if cfg.loss.target == "sampled" and not cache.manifest.get("sample_n"):
        raise KDError(
            f"loss.target=sampled but cache {tc.cache_dir} holds no sampled targets; re-cache with "
            "cache.sample_n=50 (or another count), or use loss.target=topk"
        )
    target_fields = {"topk": ("topk_ids", "topk_logprobs"), "sampled": ("sample_ids", "sample_counts"), "online": ()}[
        cfg.loss.target
    ]
    # a chat cache's loss_mask and segments come along (a text cache has neither: every token counts)
    chat_fields = ("loss_mask", "segments")
    train_split = cache.split(
        "train", ("input_ids",) + target_fields + (("hidden_states",) if need_hidden else ()) + chat_fields
    )
    # eval/kd and top-1 agreement are always measured against the cached top-k, whatever the training target
    eval_split = cache.split("eval", ("input_ids", "topk_ids", "topk_logprobs") + chat_fields)
    if cross:  # the student's view: its own tokens, the teacher's targets at aligned positions (kd/align.py)
        train_split, eval_split = cross_tokenizer_splits(
            cfg, cache, tokenizer, train_split, eval_split, run_dir, accelerator
        )
    if len(eval_split) == 0 or len(train_split) == 0:
        raise KDError(f"cache {tc.cache_dir} has an empty train or eval split")
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = tc.micro_batch_size * tc.gradient_accumulation_steps
    epoch_steps = steps_per_epoch(len(train_split), world, tc.micro_batch_size, tc.gradient_accumulation_steps)
    if epoch_steps == 0:
        raise KDError(
            f"the train split ({len(train_split)} sequences) is smaller than one optimizer step "
            f"({tc.micro_batch_size} x {tc.gradient_accumulation_steps} x {world} processes)"
        )
    total_steps = tc.max_steps or math.ceil(tc.epochs * epoch_steps)
    warmup = tc.warmup_steps or int(tc.warmup_fraction * total_steps)
    if warmup >= total_steps:
        raise KDError(f"warmup ({warmup} steps) is not shorter than the run ({total_steps} optimizer steps)")

    # 2. Student, projectors, optimizer. Weight decay skips biases and norm weights (1-D tensors).
    set_seed(tc.seed)
    # across tokenizers teacher ids never index the student logits (they are mapped), so no vocabulary floor
    say = print if accelerator.is_main_process else (lambda *a, **k: None)
    built_whole = build_whole(accelerator)  # ZeRO-3: transformers would build them partitioned (kd/dist.py)
    lm = build_student(
        cfg, tokenizer, 0 if cross else cache.manifest["teacher"]["vocab_size"], cache, say, accelerator.device
    )
    # the student must see a whole window: a shorter context trains silently wrong (Llama) or fails mid-run (GPT-2)
    window = train_split.arrays["input_ids"].shape[1] if cross else cache.seq_len
    context = getattr(lm.config, "max_position_embeddings", None) or getattr(lm.config, "n_positions", None)
    if context is not None and context < window:
        raise KDError(
            f"the student's context ({context} positions) is shorter than the training windows ({window} tokens): "
            f"give the student a context of at least {window} (student.config max_position_embeddings), or "
            "re-cache with a smaller data.seq_len"
        )
    pairs = cfg.loss.feature_layers
    if need_hidden and not pairs:  # only a student cut from the teacher may leave them empty (TrainConfig checks)
        from kd.prune import feature_pairs

        pruned = lm.config.kd_pruned_from
        pairs = feature_pairs(pruned, cache.hidden_layers)
        if not pairs:
            raise KDError(
                f"the feature loss has no default layer pairs: no kept layer's teacher layer is in the cache (it stores "
                f"{cache.hidden_layers}, the student kept {pruned['teacher_layers']}); set loss.feature_layers"
            )
        say(f"[student] feature pairs [student, teacher] from the kept layers: {pairs}")
    slots = check_feature_layers(pairs, cache, lm.config.num_hidden_layers)
    if "chat" in cache.manifest:
        # one conversation per window needs nothing of the attention: its positions are the model's own
        reason = packing_fallback_reason(lm) if cache.manifest["chat"]["packing"] != "one_per_window" else None
        if reason is not None:
            raise KDError(
                f"cache {tc.cache_dir} packs several conversations per window, and this student cannot keep them "
                f"apart: {reason}. Use an attention implementation that honours restarting position ids "
                "(student.attn_implementation=sdpa or eager), or re-cache with data.packing=one_per_window"
            )
        say(f"[student] chat cache: loss on {cache.manifest['chat']['loss_mask']} tokens, conversations kept apart")
    model = DistillModel(
        lm, pairs if need_hidden else [], cache.manifest["teacher"]["hidden_size"], cfg.loss.fused_head
    )
    if model.fused_head:
        say(f"[student] LM head fused into the loss: {cfg.loss.position_chunk} positions at a time, no full logits")
    elif cfg.loss.fused_head:
        say(
            f"[student] LM head not fused into the loss (the model's own forward computes full logits): "
            f"{model.fused_head_reason}"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": tc.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=tc.lr,
        betas=tuple(tc.betas),
    )
    if backend_kind(accelerator) == "DEEPSPEED":
        configure_deepspeed(accelerator, tc, say)
        zero3_head_with_root(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    # how a window accumulates and ends on this back-end (kd/train/engine.py); sharded: ZeRO-3 or FSDP2
    backend = backend_for(accelerator, model)
    teacher = None
    if cfg.loss.target == "online":  # the reference mode: the teacher in memory, as the cache exists to avoid
        from kd.models import load_causal_lm

        t = cache.manifest["teacher"]
        teacher = load_causal_lm(t["name_or_path"], t["revision"], t["dtype"], "sdpa").to(accelerator.device).eval()
    built_whole()  # Accelerate's registration with transformers, as it was
    # the one choice of teacher signal and terms, for training and for eval
    plan, eval_plan = LossPlan.build(cfg.loss, slots, teacher), LossPlan.for_eval(cfg.loss)
    ema = EMA(accelerator.unwrap_model(model), tc.ema_decay) if tc.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    state = TrainState()
    if resume_state is not None:
        accelerator.load_state(str(run_dir / "checkpoints" / resume_state["path"]))
        state = TrainState.from_dict(resume_state)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            run_dir / "config.json",
            {
                "format": "kd-run",
                "format_version": RUN_FORMAT_VERSION,
                "kd_version": __version__,
                "config": cfg_dict,
                "cache": {
                    "dir": tc.cache_dir,
                    "teacher": cache.manifest["teacher"],
                    "top_k": cache.top_k,
                    "tokenizer_fingerprint": teacher_tok["fingerprint"],
                    "config_hash": cache.manifest.get("config_hash"),
                },  # the cache's identity, checked on resume
                "total_steps": total_steps,
                "warmup_steps": warmup,
                "steps_per_epoch": epoch_steps,
                "num_processes": world,
            },
        )
    # on resume, records the interrupted run wrote after its checkpoint are dropped (all of them if it had none)
    keep = None if not tc.resume else (state.step if resume_state is not None else -1)
    log = MetricsLog(run_dir / "metrics.jsonl", accelerator.is_main_process, keep_until_step=keep)
    # chat: a few greedy replies to held-out prompts at every eval (kd/train/generations.py), main process only
    prompts = held_out_prompts(eval_split, tc.eval_generations) if "chat" in cache.manifest else []
    generations = GenerationsLog(run_dir, accelerator.is_main_process and bool(prompts), keep)
    if tc.log_with:
        start_trackers(accelerator, tc, cfg_dict)
        log.tracker = accelerator
    pin = accelerator.device.type == "cuda"
    eval_indices = list(range(len(eval_split)))[: tc.eval_max_sequences][rank::world]
    eval_loader = make_loader(eval_split, eval_indices, tc.micro_batch_size, tc.num_workers, pin)
    # partitioned parameters (ZeRO-3, FSDP2) are gathered collectively at every forward: every process runs as many
    # eval forwards as the process with the most batches (kd.train.evaluate's lockstep)
    lockstep = int(gather_rows(accelerator, [len(eval_loader)]).max()) if backend.sharded else None

    # bits per character of the evaluated text (kd/textscore.py): the student's own tokens and separator, so the
    # figure compares with the teacher's (the manifest's) and with any other student's, whatever the tokenizer
    units_sep = (
        tokenizer.convert_tokens_to_ids(cfg.loss.cross_tokenizer_separator or tokenizer.eos_token)
        if cross
        else (cache.manifest["tokenizer"].get("separator_id"))
    )

    def text_units(batch) -> np.ndarray:
        return batch_text_units(tokenizer, batch, units_sep)

    def run_eval() -> dict:
        record = eval_record(model, eval_loader, eval_plan, accelerator, ema, state, text_units, lockstep)
        if extra_windows is not None:  # the second eval text: this process's share of its windows, summed over all
            mine = type(extra_windows)(extra_windows.input_ids[rank::world], extra_windows.lengths[rank::world], None)
            distill = accelerator.unwrap_model(model)
            sums = score_windows(
                distill.lm, tokenizer, mine, extra_sep, tc.micro_batch_size, cfg.loss.position_chunk, distill.fused_head
            )
            nats, tokens, chars, nbytes = accelerator.reduce(
                torch.tensor(sums, device=accelerator.device), "sum"
            ).tolist()
            score = score_record(nats, int(tokens), int(chars), int(nbytes))
            record.update(
                {
                    "extra_eval/ce": score["ce_per_token"],
                    "extra_eval/ppl": math.exp(score["ce_per_token"]),
                    "extra_eval/bits_per_char": score["bits_per_char"],
                    "extra_eval/bits_per_byte": score["bits_per_byte"],
                }
            )
        log.write(record)
        if prompts and (accelerator.is_main_process or backend.sharded):  # sharded: every process generates
            lm = accelerator.unwrap_model(model).lm
            with backend.whole_root(model):  # FSDP2: the root group's weights, gathered for a call that bypasses it
                replies = generate_replies(
                    lm, tokenizer, prompts, tc.generation_tokens, accelerator.device, synced=backend.sharded
                )
            generations.write(state.step, replies)  # the main process's (GenerationsLog writes only there)
        return record

    last_eval = run_eval() if state.step == 0 else None  # the untrained student: the baseline every curve starts from
    if last_eval is not None:
        compare_with_teacher(cfg, cache, last_eval, log, accelerator)
    # resuming a run that had finished: its final eval is already logged (it precedes the final checkpoint)
    finished_before = resume_state is not None and state.step >= total_steps
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        desc="train",
        disable=not accelerator.is_local_main_process,
        file=sys.stdout,
        dynamic_ncols=True,
    )
    model.train()
    stop_reason = "max_steps"
    t_last = time.time()

    # 3. The loop: one iteration = one optimizer step.
    while state.step < total_steps and stop_reason == "max_steps":
        epoch, done_in_epoch = divmod(state.step, epoch_steps)
        order = epoch_order(
            len(train_split),
            epoch,
            tc.seed,
            rank,
            world,
            per_step,
            train_split.starts if tc.shuffle == "shards" else None,
            tc.shuffle_buffer_shards,
        )[done_in_epoch * per_step :]
        batches_iter = iter(make_loader(train_split, order, tc.micro_batch_size, tc.num_workers, pin))
        for _ in range(min(epoch_steps - done_in_epoch, total_steps - state.step)):
            lr = lr_at(
                state.step + 1,
                schedule=tc.schedule,
                lr=tc.lr,
                min_lr=tc.min_lr,
                warmup_steps=warmup,
                total_steps=total_steps,
            )
            window = [next(batches_iter) for _ in range(tc.gradient_accumulation_steps)]
            result, grad_norm, nonfinite = optimizer_step(
                model, optimizer, window, plan, backend, state, lr, tc.max_grad_norm, ema
            )
            now = time.time()
            weighted = {f"w_{t.name}": t.weight * result.raw[t.name] for t in plan.terms}
            record = {
                "step": state.step,
                "epoch": epoch,
                "lr": lr,
                "loss": sum(weighted.values()),
                **result.raw,
                **weighted,
                "top1_agreement": result.agree,
                "grad_norm": grad_norm,
                "tokens_seen": state.tokens_seen,
                "skipped_steps": state.skipped_steps,
                "skipped": bool(nonfinite),
                "nonfinite": nonfinite,
                "tokens_per_s": result.tokens / max(now - t_last, 1e-9),
                "peak_mem_mb": peak_memory_mb(accelerator.device),
                "elapsed_s": now - t_start,
            }
            t_last = now
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)

            if state.consecutive_skips >= tc.max_consecutive_skips:
                ckpt = save_checkpoint(accelerator, run_dir, state)
                raise KDError(
                    f"{state.consecutive_skips} optimizer steps in a row had non-finite "
                    f"{', '.join(nonfinite)} (last at step {state.step}); stopped. The last good weights are "
                    f"saved in {ckpt}. Check the cache (python -m kd.cache verify {tc.cache_dir}), lower "
                    "train.lr, or use bf16/fp32"
                )
            if state.step % tc.eval_every == 0 and state.step < total_steps:
                last_eval = run_eval()
                if state.record_eval(last_eval["eval/ce"]) >= (tc.early_stopping_patience or math.inf):
                    stop_reason = "early_stopping"
                    log.write(
                        {
                            "step": state.step,
                            "event": "early_stopping",
                            "best_eval/ce": state.best_eval,
                            "patience": tc.early_stopping_patience,
                        }
                    )
                    break
            if tc.checkpoint_every and state.step % tc.checkpoint_every == 0 and state.step < total_steps:
                save_checkpoint(accelerator, run_dir, state)
    bar.close()

    # 4. Final eval (unless this step was just evaluated, as when early stopping), checkpoint and models.
    if last_eval is not None and last_eval["step"] == state.step:
        final = last_eval
    elif finished_before:  # recomputed for the saved meta (every process takes part), not logged a second time
        final = eval_record(model, eval_loader, eval_plan, accelerator, ema, state, text_units, lockstep)
    else:
        final = run_eval()
    keep_state = tc.save_final_state if tc.save_final_state is not None else tc.checkpoint_every > 0
    if keep_state:
        save_checkpoint(accelerator, run_dir, state)
    meta = {
        "format": "kd-student",
        "format_version": RUN_FORMAT_VERSION,
        "kd_version": __version__,
        "config": cfg_dict,
        "step": state.step,
        "stop_reason": stop_reason,
        "final_eval": final,
        "weights": "trained",
    }
    save_final(accelerator, model, tokenizer, run_dir / "final", meta)
    if ema is not None:
        with ema.applied(accelerator.unwrap_model(model)):
            save_final(
                accelerator, model, tokenizer, run_dir / "final_ema", dict(meta, weights=f"ema (decay {tc.ema_decay})")
            )
    if not keep_state and accelerator.is_main_process:  # final/ is whole: an earlier checkpoint is only stale
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if accelerator.is_main_process:
        print(
            f"[train] {stop_reason}: {state.step} steps, {state.tokens_seen} tokens, {state.skipped_steps} skipped, "
            f"eval/ce {final['eval/ce']:.4f}, eval/ppl {final['eval/ppl']:.2f}, "
            f"top-1 agreement {final['eval/top1_agreement']:.3f}, {time.time() - t_start:.0f} s -> {run_dir}",
            flush=True,
        )
    if tc.log_with:
        accelerator.end_training()
    return run_dir


if __name__ == "__main__":
    run_cli(lambda: main(parse_cli(TrainConfig, None, __doc__.split("\n\n")[0])))
