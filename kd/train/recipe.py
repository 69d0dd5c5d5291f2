"""The training recipe: `setup` builds a Run (everything a run needs, checked before anything is written),
`evaluate` logs one eval, `train` is the loop (one iteration = one optimizer step), `finish` the final eval and
saves. train_student.py calls them in that order; tests and tools may call them too.

Set-up order, fail-fast: the cache and the tokenizer match, the run directory (refused if it exists, checked on
resume), the splits and the schedule, then the student, its optimizer and the loss plan, then the logs. The loop,
per optimizer step: the LR from the pure schedule (kd.schedule.lr_at), kd.train.step.optimizer_step (the window's
micro-batches forward/backward with the losses normalised once, skipped if anything was non-finite, clipped,
stepped), the state advanced, the record logged, eval and checkpoint at optimizer-step boundaries.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from kd import __version__, align
from kd.cache import TeacherCache, TeacherReference
from kd.config import flatten, resolved_paths, to_dict
from kd.data.chat import chat_template, check_chat_tokenizer
from kd.dist import agree, gather_rows
from kd.errors import KDError
from kd.io import write_json_atomic
from kd.losses.terms import needs_hidden
from kd.models import check_context, load_causal_lm, load_tokenizer, packing_fallback_reason, tokenizer_fingerprint
from kd.paths import absolute_path
from kd.prune import feature_pairs
from kd.schedule import lr_at
from kd.signals import TARGETS
from kd.textscore import batch_text_units, score_record, score_windows, text_windows
from kd.train.backend import (
    backend_for,
    backend_kind,
    build_whole,
    check_training_backend,
    configure_deepspeed,
    zero3_head_with_root,
)
from kd.train.card import CardFacts, model_card
from kd.train.checkpoint import (
    claim_run_name,
    prepare_run_dir,
    read_latest,
    released_on_error,
    save_checkpoint,
    save_final,
)
from kd.train.data import epoch_order, make_loader
from kd.train.generations import GenerationsLog, generate_replies, held_out_prompts
from kd.train.model import DistillModel, build_student
from kd.train.plan import Schedule, continued_schedule, run_schedule
from kd.train.state import EMA, RUN_FORMAT_VERSION, MetricsLog, TrainState, peak_memory_mb
from kd.train.step import LossPlan, eval_record, optimizer_step, weights_finite
from kd.train_config import TrainConfig


@dataclass
class Run:
    """Everything `setup` builds for one run; `state` is what the loop advances."""

    cfg: TrainConfig
    cfg_dict: dict
    accelerator: Accelerator
    run_dir: Path
    lock: object  # kd.io.DirLock on the run's name, held by the main process until finish (None elsewhere)
    cache: TeacherCache
    tokenizer: object
    train_split: object  # a kd.cache.CacheSplit, or kd.align.AlignedSplit across tokenizers
    eval_split: object
    schedule: Schedule
    model: torch.nn.Module  # the prepared DistillModel
    optimizer: torch.optim.Optimizer
    backend: object  # kd.train.backend's back-end: how a window accumulates and ends
    plan: LossPlan  # the training loss
    eval_plan: LossPlan  # the held-out metrics (CE and KD against the cached top-k, whatever the training loss)
    ema: EMA | None
    state: TrainState
    resumed: bool  # continued from a checkpoint
    log: MetricsLog
    generations: GenerationsLog
    prompts: list  # held-out chat prompts replied to at every eval (chat caches)
    eval_loader: object
    lockstep: int | None  # sharded parameters: eval forwards every process runs (kd.train.step.evaluate)
    extra_windows: object  # train.extra_eval_files as windows (kd.textscore.text_windows), or None
    extra_sep: int | None
    units_sep: int | None  # the separator id bits per character are counted with (kd/textscore.py)
    # the teacher's own score on the eval windows the student is scored on (step 0's line, the model card), or None
    teacher_reference: TeacherReference | None
    t_start: float

    def say(self, *args, **kwargs) -> None:
        if self.accelerator.is_main_process:
            print(*args, **kwargs)

    def text_units(self, batch) -> np.ndarray:
        return batch_text_units(self.tokenizer, batch, self.units_sep)


def setup(cfg: TrainConfig) -> Run | None:
    """Build the run, checking every input before anything is written. None when there is nothing to do: a resumed
    run that had already finished without keeping its training state (train.save_final_state)."""
    t_start = time.time()
    tc = cfg.train
    run_dir = Path(tc.output_dir) / tc.run_name
    # gradient_accumulation_steps=1: accumulation is done (and normalised) by hand in kd.train.step.accumulate_window
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=1,
        log_with=tc.log_with or None,  # trackers beside metrics.jsonl, which stays the record
        project_dir=str(run_dir / "trackers"),
    )
    check_training_backend(accelerator, tc)
    cfg_dict = to_dict(cfg)

    # 1. Inputs, checked before anything is written: cache, tokenizer match, run directory, splits, schedule.
    cache = TeacherCache(tc.cache_dir, check=not tc.trust_cache)
    tokenizer, tok_source = _student_tokenizer(cfg, cache)
    cross = cfg.loss.cross_tokenizer is not None
    extra_windows, extra_sep = (
        text_windows(tokenizer, tc.extra_eval_files, cache.seq_len) if tc.extra_eval_files else (None, None)
    )
    _check_cache_fits(cfg, cache, tokenizer, tok_source)
    # one writer per run directory, for the whole run: a lock beside it (runs/.<name>.lock), taken before the run
    # directory is looked at, so that two trainings started on one name never both pass the checks below
    lock = agree(accelerator, lambda: claim_run_name(run_dir) if accelerator.is_main_process else None)
    with released_on_error(lock):  # an error below leaves the name free for the corrected re-run
        resume_state = prepare_run_dir(run_dir, cfg_dict, tc.resume, cache.info.config_hash)
        if resume_state is None and tc.resume and (run_dir / "final" / "kd_meta.json").exists():
            if accelerator.is_main_process:  # finished without its state (train.save_final_state): nothing to continue
                print(
                    f"[train] {run_dir} already finished (final/ is saved, no training state kept); nothing to do. "
                    f"To train it further: a new run with student.pretrained={run_dir / 'final'} (next time, "
                    "train.save_final_state=true keeps the state a longer train.max_steps resumes from)",
                    flush=True,
                )
            if lock is not None:
                lock.release()
            return None
        train_split, eval_split = _splits(cfg, cache, tokenizer, run_dir, accelerator)
        schedule = run_schedule(cfg, len(train_split), accelerator.num_processes)

        # 2. Student, projectors, optimizer, loss plans.
        set_seed(tc.seed)
        model, optimizer, backend, plan, ema = _student(cfg, cache, tokenizer, (train_split, eval_split), accelerator)
        eval_plan = LossPlan.for_eval(cfg.loss)  # the one choice of teacher signal and terms for eval

        # 3. The run's state (resumed from its checkpoint), its record and logs, the eval data.
        state = TrainState()
        if resume_state is not None:
            accelerator.load_state(str(run_dir / "checkpoints" / resume_state["path"]))
            state = TrainState.from_dict(resume_state)
        recorded = json.loads((run_dir / "config.json").read_text()) if resume_state is not None else {}
        extension = None
        if resume_state is not None:  # a longer train.max_steps or epochs continues the run (plan.continued_schedule)
            schedule, extension = continued_schedule(recorded, schedule, state.step)
        if extension is not None:
            state.stopped = ""  # a run that had finished trains on to the new end
            # the next step's LR as it is now, and as the run would have had it (a finished run: its last step's)
            before = min(state.step + 1, recorded["total_steps"])
            extension.update(lr_before=_lr(cfg, schedule, before, recorded["total_steps"]))
            extension.update(lr_after=_lr(cfg, schedule, state.step + 1, schedule.total_steps))
        extensions = recorded.get("extensions", []) + ([extension] if extension else [])
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            record = _run_record(cfg, cfg_dict, cache, schedule, accelerator, extensions)
            write_json_atomic(run_dir / "config.json", record)
        # on resume, records the interrupted run wrote after its checkpoint are dropped (all of them if it had none)
        keep = None if not tc.resume else (state.step if resume_state is not None else -1)
        log = MetricsLog(run_dir / "metrics.jsonl", accelerator.is_main_process, keep_until_step=keep)
        if extension is not None:
            log.write({"step": state.step, "event": "schedule_extended", **extension})
            if accelerator.is_main_process:
                print(
                    f"[train] the run goes on to {schedule.total_steps} optimizer steps (it was started for "
                    f"{extension['total_steps_before']}): from step {state.step} the LR follows the longer "
                    f"{tc.schedule} curve, {extension['lr_before']:.3g} -> {extension['lr_after']:.3g} here",
                    flush=True,
                )
        # chat: a few greedy replies to held-out prompts at every eval (kd/train/generations.py), main process only
        prompts = held_out_prompts(eval_split, tc.eval_generations) if cache.info.chat is not None else []
        generations = GenerationsLog(run_dir, accelerator.is_main_process and bool(prompts), keep)
        if tc.log_with:
            start_trackers(accelerator, tc, cfg_dict)
            log.tracker = accelerator
        rank, world = accelerator.process_index, accelerator.num_processes
        eval_indices = list(range(len(eval_split)))[: tc.eval_max_sequences][rank::world]
        pin = accelerator.device.type == "cuda"
        eval_loader = make_loader(eval_split, eval_indices, tc.micro_batch_size, tc.num_workers, pin)
        # partitioned parameters (ZeRO-3, FSDP2) are gathered collectively at every forward: every process runs as many
        # eval forwards as the process with the most batches (kd.train.step.evaluate's lockstep)
        lockstep = int(gather_rows(accelerator, [len(eval_loader)]).max()) if backend.sharded else None
        # bits per character of the evaluated text (kd/textscore.py): the student's own tokens and separator, so the
        # figure compares with the teacher's (the manifest's) and with any other student's, whatever the tokenizer
        units_sep = (
            tokenizer.convert_tokens_to_ids(cfg.loss.cross_tokenizer_separator or tokenizer.eos_token)
            if cross
            else cache.info.tokenizer.separator_id
        )
        return Run(
            cfg=cfg,
            cfg_dict=cfg_dict,
            accelerator=accelerator,
            run_dir=run_dir,
            lock=lock,
            cache=cache,
            tokenizer=tokenizer,
            train_split=train_split,
            eval_split=eval_split,
            schedule=schedule,
            model=model,
            optimizer=optimizer,
            backend=backend,
            plan=plan,
            eval_plan=eval_plan,
            ema=ema,
            state=state,
            resumed=resume_state is not None,
            log=log,
            generations=generations,
            prompts=prompts,
            eval_loader=eval_loader,
            lockstep=lockstep,
            extra_windows=extra_windows,
            extra_sep=extra_sep,
            units_sep=units_sep,
            teacher_reference=cache.teacher_reference("eval", tc.eval_max_sequences),
            t_start=t_start,
        )


def _student_tokenizer(cfg: TrainConfig, cache: TeacherCache):
    """The student's tokenizer and where it came from: student.tokenizer, else the pretrained student's, else the
    teacher's (the one the cache was made with)."""
    from_teacher = cfg.student.from_teacher.teacher if cfg.student.from_teacher else None
    tok_source = cfg.student.tokenizer or cfg.student.pretrained or from_teacher or cache.info.teacher.name_or_path
    return load_tokenizer(tok_source), tok_source


def _check_cache_fits(cfg: TrainConfig, cache: TeacherCache, tokenizer, tok_source: str) -> None:
    """Same-tokenizer KD compares token ids; cross-tokenizer KD needs the cached text; sampled targets need a cache
    that holds them."""
    tc, teacher_tok = cfg.train, cache.info.tokenizer
    cross = cfg.loss.cross_tokenizer is not None
    if tokenizer_fingerprint(tokenizer) != teacher_tok.fingerprint and not cross:
        raise KDError(
            f"the student's tokenizer ({tok_source}) differs from the one the cache was made with "
            f"(fingerprint {teacher_tok.fingerprint[:12]}...): same-tokenizer KD compares token ids, "
            "so they must match. Use the teacher's tokenizer for the student, or set "
            "loss.cross_tokenizer=hybrid (or mapped, uld) for cross-tokenizer KD"
        )
    if cross and not cache.info.store_text:
        raise KDError(
            f"loss.cross_tokenizer needs the cached text and token spans, and cache {tc.cache_dir} was "
            "written without them: re-cache with cache.store_text=true"
        )
    if TARGETS[cfg.loss.target].needs_samples and not cache.info.sample_n:
        raise KDError(
            f"loss.target=sampled but cache {tc.cache_dir} holds no sampled targets; re-cache with "
            "cache.sample_n=50 (or another count), or use loss.target=topk"
        )


def _splits(cfg: TrainConfig, cache: TeacherCache, tokenizer, run_dir: Path, accelerator):
    """The train and eval splits, reading only the fields the loss needs; across tokenizers, the student's view."""
    need_hidden = needs_hidden(cfg.loss.trained_terms())
    # a run that trains no term against the teacher's distribution (CE only, perhaps with features) reads none of it
    reads_signal = cfg.loss.trains_on_signal() or cfg.loss.cross_tokenizer is not None  # alignment reads top-k
    target_fields = TARGETS[cfg.loss.target].fields if reads_signal else ()
    # a chat cache's loss_mask and segments come along (a text cache has neither: every token counts)
    chat_fields = ("loss_mask", "segments")
    train_split = cache.split(
        "train", ("input_ids",) + target_fields + (("hidden_states",) if need_hidden else ()) + chat_fields
    )
    # eval/kd and top-1 agreement are always measured against the cached top-k, whatever the training target
    eval_split = cache.split("eval", ("input_ids", "topk_ids", "topk_logprobs") + chat_fields)
    if cfg.loss.cross_tokenizer is not None:  # the student's own tokens, the teacher's targets at aligned positions
        train_split, eval_split = cross_tokenizer_splits(
            cfg, cache, tokenizer, train_split, eval_split, run_dir, accelerator
        )
    if len(eval_split) == 0 or len(train_split) == 0:
        raise KDError(f"cache {cfg.train.cache_dir} has an empty train or eval split")
    return train_split, eval_split


def _student(cfg: TrainConfig, cache: TeacherCache, tokenizer, splits, accelerator):
    """The student wrapped with its projectors, prepared by Accelerate with its optimizer (weight decay skips biases
    and norm weights, the 1-D tensors); the back-end; the training loss plan; the EMA weights when on."""
    tc = cfg.train
    cross = cfg.loss.cross_tokenizer is not None
    say = print if accelerator.is_main_process else (lambda *a, **k: None)
    built_whole = build_whole(accelerator)  # ZeRO-3: transformers would build them partitioned (kd/train/backend.py)
    # across tokenizers teacher ids never index the student logits (they are mapped), so no vocabulary floor
    lm = build_student(cfg, tokenizer, 0 if cross else cache.info.teacher.vocab_size, cache, say, accelerator.device)
    # the student must see a whole window: a shorter context trains silently wrong (Llama) or fails mid-run (GPT-2)
    # across tokenizers the student's windows are its own: the longest of either split (eval's may be the longer)
    window = max(s.alignment.max_len for s in splits if s is not None) if cross else cache.seq_len
    fix = f"give it a context of at least {window} (student.config max_position_embeddings), or re-cache with a "
    check_context("the student", lm.config, window, fix + "smaller data.seq_len", "training windows")
    need_hidden = needs_hidden(cfg.loss.trained_terms())
    pairs = cfg.loss.feature_layers
    if need_hidden and not pairs:  # only a student cut from the teacher may leave them empty (TrainConfig checks)
        pruned = lm.config.kd_pruned_from
        pairs = feature_pairs(pruned, cache.hidden_layers)
        if not pairs:
            raise KDError(
                f"the feature loss has no default layer pairs: no kept layer's teacher layer is in the cache (it stores "
                f"{cache.hidden_layers}, the student kept {pruned['teacher_layers']}); set loss.feature_layers"
            )
        say(f"[student] feature pairs [student, teacher] from the kept layers: {pairs}")
    slots = check_feature_layers(pairs, cache, lm.config.num_hidden_layers)
    if cache.info.chat is not None:
        # one conversation per window needs nothing of the attention: its positions are the model's own
        reason = packing_fallback_reason(lm) if cache.info.chat.packing != "one_per_window" else None
        if reason is not None:
            raise KDError(
                f"cache {tc.cache_dir} packs several conversations per window, and this student cannot keep them "
                f"apart: {reason}. Use an attention implementation that honours restarting position ids "
                "(student.attn_implementation=sdpa or eager), or re-cache with data.packing=one_per_window"
            )
        say(f"[student] chat cache: loss on {cache.info.chat.loss_mask} tokens, conversations kept apart")
    model = DistillModel(lm, pairs if need_hidden else [], cache.info.teacher.hidden_size, cfg.loss.fused_head)
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
    # how a window accumulates and ends on this back-end (kd/train/backend.py); sharded: ZeRO-3 or FSDP2
    backend = backend_for(accelerator, model)
    teacher = None
    if cfg.loss.target == "online" and cfg.loss.trains_on_signal():  # the reference mode: the teacher in memory,
        # as the cache exists to avoid (not for a run that trains CE alone)
        t = cache.info.teacher
        teacher = load_causal_lm(t.name_or_path, t.revision, t.dtype, "sdpa").to(accelerator.device).eval()
    built_whole()  # Accelerate's registration with transformers, as it was
    plan = LossPlan.build(cfg.loss, slots, teacher)
    ema = EMA(accelerator.unwrap_model(model), tc.ema_decay) if tc.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    return model, optimizer, backend, plan, ema


def _lr(cfg: TrainConfig, schedule: Schedule, step: int, total_steps: int) -> float:
    """The LR at `step` of a run of `total_steps` (the loop's own formula)."""
    tc = cfg.train
    return lr_at(
        step,
        schedule=tc.schedule,
        lr=tc.lr,
        min_lr=tc.min_lr,
        warmup_steps=schedule.warmup_steps,
        total_steps=total_steps,
    )


def _run_record(
    cfg: TrainConfig, cfg_dict: dict, cache: TeacherCache, schedule: Schedule, accelerator, extensions: list
) -> dict:
    """runs/<name>/config.json: the resolved config, the cache's identity (checked on resume), the schedule and
    the run's extensions (a resume that made it longer: where, from and to how many steps, the LR jump)."""
    return {
        "format": "kd-run",
        "format_version": RUN_FORMAT_VERSION,
        "kd_version": __version__,
        "config": cfg_dict,
        "paths": resolved_paths(cfg_dict, TrainConfig),  # every path key as the file it names (resume compares these)
        "cache": {
            "dir": absolute_path(cfg.train.cache_dir),
            "teacher": asdict(cache.info.teacher),
            "top_k": cache.top_k,
            "tokenizer_fingerprint": cache.info.tokenizer.fingerprint,
            "config_hash": cache.info.config_hash,
        },
        "total_steps": schedule.total_steps,
        "warmup_steps": schedule.warmup_steps,
        "steps_per_epoch": schedule.steps_per_epoch,
        "num_processes": accelerator.num_processes,
        "extensions": extensions,
    }


def evaluate(run: Run, log: bool = True) -> dict:
    """The eval record at run.state's step (and the second eval text's scores, and chat replies), logged unless
    `log` is False (a resumed run's final eval, already logged before its final checkpoint)."""
    tc, accelerator, model = run.cfg.train, run.accelerator, run.model
    record = eval_record(
        model, run.eval_loader, run.eval_plan, accelerator, run.ema, run.state, run.text_units, run.lockstep
    )
    if not log:
        return record
    if run.extra_windows is not None:  # the second eval text: this process's share of its windows, summed over all
        rank, world = accelerator.process_index, accelerator.num_processes
        w = run.extra_windows
        mine = type(w)(w.input_ids[rank::world], w.lengths[rank::world], None)
        distill = accelerator.unwrap_model(model)
        sums = score_windows(
            distill.lm,
            run.tokenizer,
            mine,
            run.extra_sep,
            tc.micro_batch_size,
            run.cfg.loss.position_chunk,
            distill.fused_head,
        )
        nats, tokens, chars, nbytes = accelerator.reduce(torch.tensor(sums, device=accelerator.device), "sum").tolist()
        score = score_record(nats, int(tokens), int(chars), int(nbytes))
        record.update(
            {
                "extra_eval/ce": score["ce_per_token"],
                "extra_eval/ppl": math.exp(score["ce_per_token"]),
                "extra_eval/bits_per_char": score["bits_per_char"],
                "extra_eval/bits_per_byte": score["bits_per_byte"],
            }
        )
    run.log.write(record)
    if run.prompts and (accelerator.is_main_process or run.backend.sharded):  # sharded: every process generates
        lm = accelerator.unwrap_model(model).lm
        with run.backend.whole_root(model):  # FSDP2: the root group's weights, gathered for a call that bypasses it
            replies = generate_replies(
                lm, run.tokenizer, run.prompts, tc.generation_tokens, accelerator.device, synced=run.backend.sharded
            )
        run.generations.write(run.state.step, replies)  # the main process's (GenerationsLog writes only there)
    return record


@dataclass
class Ending:
    """How the loop ended: why, the last eval it logged (None if none since it started), and whether the run had
    already reached its last step when this process resumed it."""

    stop_reason: str  # max_steps | early_stopping
    last_eval: dict | None
    finished_before: bool


def train(run: Run) -> Ending:
    """The untrained student's eval (the baseline every curve starts from), then the loop: one iteration = one
    optimizer step, the state advanced here and only here."""
    tc, sched, state, accelerator = run.cfg.train, run.schedule, run.state, run.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    last_eval = evaluate(run) if state.step == 0 else None
    if last_eval is not None:
        compare_with_teacher(run, last_eval)
    # resuming a run that had finished training (its last state saved before final/): its final eval is logged
    finished_before = run.resumed and (state.step >= sched.total_steps or bool(state.stopped))
    bar = tqdm(
        total=sched.total_steps,
        initial=state.step,
        desc="train",
        disable=not accelerator.is_local_main_process,
        file=sys.stdout,
        dynamic_ncols=True,
    )
    run.model.train()
    stop_reason = state.stopped or "max_steps"
    # the clocks of one step: set after each step's eval and checkpoint, so a step's figures are its own work
    t_last, cpu_last = time.time(), time.process_time()
    pin = accelerator.device.type == "cuda"
    while state.step < sched.total_steps and stop_reason == "max_steps":
        epoch, done_in_epoch = divmod(state.step, sched.steps_per_epoch)
        shard_starts = run.train_split.starts if tc.shuffle == "shards" else None
        order = epoch_order(
            len(run.train_split), epoch, tc.seed, rank, world, sched.sequences_per_step, shard_starts,
            tc.shuffle_buffer_shards,
        )[done_in_epoch * sched.sequences_per_step :]  # fmt: skip
        batches = iter(make_loader(run.train_split, order, tc.micro_batch_size, tc.num_workers, pin))
        for _ in range(min(sched.steps_per_epoch - done_in_epoch, sched.total_steps - state.step)):
            lr = _lr(run.cfg, sched, state.step + 1, sched.total_steps)
            window = [next(batches) for _ in range(tc.gradient_accumulation_steps)]
            step = optimizer_step(run.model, run.optimizer, window, run.plan, run.backend, lr, tc.max_grad_norm)
            state.step += 1
            state.tokens_seen += step.result.tokens
            if step.applied and not weights_finite(run.model, accelerator):  # never trained on, never saved
                latest = read_latest(run.run_dir)
                raise KDError(
                    f"step {state.step} made the weights non-finite (lr {lr:.3g}, gradient norm {step.grad_norm:.3g}); "
                    "stopped before anything saved them. "
                    + (
                        f"The last good state is the checkpoint at step {latest['step']}: lower train.lr and resume "
                        "from it (train.resume=true)"
                        if latest
                        else "No checkpoint was saved before it: lower train.lr and start again"
                    )
                )
            if step.applied:
                state.consecutive_skips = 0
                if run.ema is not None:
                    run.ema.update(run.backend.unwrap(run.model))
            else:  # the weights, the optimizer state and the EMA stay as they were
                state.skipped_steps += 1
                state.consecutive_skips += 1
            now = time.time()
            result = step.result
            weighted = {f"w_{t.name}": t.weight * result.raw[t.name] for t in run.plan.terms}
            record = {
                "step": state.step,
                "epoch": epoch,
                "lr": lr,
                "loss": sum(weighted.values()),
                **result.raw,
                **weighted,
                **({"top1_agreement": result.agree} if run.plan.needs_signal else {}),  # none without a teacher
                "grad_norm": step.grad_norm,
                "tokens_seen": state.tokens_seen,
                "skipped_steps": state.skipped_steps,
                "skipped": bool(step.nonfinite),
                "nonfinite": step.nonfinite,
                "tokens_per_s": result.tokens / max(now - t_last, 1e-9),
                "peak_mem_mb": peak_memory_mb(accelerator.device),
                "elapsed_s": now - run.t_start,
                "step_cpu_s": time.process_time() - cpu_last,  # every thread of this process (in-process loading too)
            }
            run.log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)

            if state.consecutive_skips >= tc.max_consecutive_skips:
                ckpt = save_checkpoint(accelerator, run.run_dir, state)
                raise KDError(
                    f"{state.consecutive_skips} optimizer steps in a row had non-finite "
                    f"{', '.join(step.nonfinite)} (last at step {state.step}); stopped. The last good weights are "
                    f"saved in {ckpt}. Check the cache (python -m kd.cache verify {tc.cache_dir}), lower "
                    "train.lr, or use bf16/fp32"
                )
            if (state.step % tc.eval_every == 0 or state.step in tc.eval_steps) and state.step < sched.total_steps:
                last_eval = evaluate(run)
                if state.record_eval(last_eval["eval/ce"]) >= (tc.early_stopping_patience or math.inf):
                    stop_reason = "early_stopping"
                    run.log.write(
                        {
                            "step": state.step,
                            "event": "early_stopping",
                            "best_eval/ce": state.best_eval,
                            "patience": tc.early_stopping_patience,
                        }
                    )
                    break
            if tc.checkpoint_every and state.step % tc.checkpoint_every == 0 and state.step < sched.total_steps:
                save_checkpoint(accelerator, run.run_dir, state)
            t_last, cpu_last = time.time(), time.process_time()
    bar.close()
    return Ending(stop_reason, last_eval, finished_before)


def finish(run: Run, ending: Ending) -> Path:
    """The final eval (unless this step was just evaluated, as when early stopping), the final checkpoint when kept,
    final/ (and final_ema/) as save_pretrained folders carrying how they were made."""
    tc, state, accelerator = run.cfg.train, run.state, run.accelerator
    if ending.last_eval is not None and ending.last_eval["step"] == state.step:
        final = ending.last_eval
    elif ending.finished_before:  # recomputed for the saved meta (every process takes part), not logged a second time
        final = evaluate(run, log=False)
    else:
        final = evaluate(run)
    keep_state = tc.save_final_state if tc.save_final_state is not None else tc.checkpoint_every > 0
    # the state to finish from, on disk before final/ whatever checkpoint_every says: a save of final/ that fails
    # (a full disk) then loses no training, and train.resume=true writes final/ from it without a step more
    state.stopped = ending.stop_reason
    ckpt = save_checkpoint(accelerator, run.run_dir, state)
    meta = {
        "format": "kd-student",
        "format_version": RUN_FORMAT_VERSION,
        "kd_version": __version__,
        "config": run.cfg_dict,
        "step": state.step,
        "stop_reason": ending.stop_reason,
        "final_eval": final,
        "weights": "trained",
    }

    def card(folder: str, weights: str, scores: dict) -> Callable[[int], str]:  # README.md: how it was made
        facts = dict(cfg=run.cfg, cache=run.cache.info, run_name=tc.run_name, folder=folder, weights=weights)
        facts.update(teacher_reference=run.teacher_reference)
        facts.update(step=state.step, tokens=state.tokens_seen, stop_reason=ending.stop_reason, final_eval=scores)
        return lambda parameters: model_card(CardFacts(**facts, parameters=parameters))

    try:
        save_final(accelerator, run.model, run.tokenizer, run.run_dir / "final", meta, card("final", "trained", final))
        if run.ema is not None:
            with run.ema.applied(accelerator.unwrap_model(run.model)):
                ema_meta = dict(meta, weights=f"ema (decay {tc.ema_decay})")
                scores = {"eval/" + k[len("ema_eval/") :]: v for k, v in final.items() if k.startswith("ema_eval/")}
                ema_card = card("final_ema", ema_meta["weights"], scores)
                save_final(accelerator, run.model, run.tokenizer, run.run_dir / "final_ema", ema_meta, ema_card)
    except KDError as e:
        raise KDError(
            f"{str(e).rstrip('.')}. The trained state is saved in {ckpt}, so the re-run to use is "
            f"`{finishing_command()}`: it writes final/ from that state without training again"
        ) from None
    if not keep_state and accelerator.is_main_process:  # final/ is whole: an earlier checkpoint is only stale
        shutil.rmtree(run.run_dir / "checkpoints", ignore_errors=True)
    run.say(
        f"[train] {ending.stop_reason}: {state.step} steps, {state.tokens_seen} tokens, {state.skipped_steps} skipped, "
        f"eval/ce {final['eval/ce']:.4f}, eval/ppl {final['eval/ppl']:.2f}, "
        f"top-1 agreement {final['eval/top1_agreement']:.3f}, {time.time() - run.t_start:.0f} s -> {run.run_dir}",
        flush=True,
    )
    if tc.log_with:
        accelerator.end_training()
    return run.run_dir


def close(run: Run) -> None:
    """Release the run directory's lock, however the run ended (the kernel would at the process's exit; a caller
    that goes on, a test or a notebook, needs it now)."""
    if run.lock is not None:
        run.lock.release()


# ---- set-up checks and messages ------------------------------------------------------------------------------


def finishing_command() -> str:
    """This process's own command line with train.resume=true: what finishes a run whose final save failed."""
    argv = [a for a in sys.argv if not a.startswith("train.resume=")]
    return shlex.join([sys.executable, *argv, "train.resume=true"])


def cross_tokenizer_splits(
    cfg: TrainConfig, cache: TeacherCache, tokenizer, train_split, eval_split, run_dir: Path, accelerator
):
    """Wrap both splits in the student's tokenization, aligned to the teacher's (built once per cache and student
    tokenizer), log alignment and mapping coverage, and apply the alignment floor."""
    teacher_tokenizer = load_tokenizer(cache.info.teacher.name_or_path, cache.info.teacher.revision)
    sep = cfg.loss.cross_tokenizer_separator or tokenizer.eos_token
    template = student_chat_template(cfg, cache, tokenizer) if cache.info.chat is not None else None
    arrays = align.load_or_build(cache, tokenizer, sep, run_dir, accelerator, template)
    mapping = align.vocab_map(teacher_tokenizer, tokenizer, cache.info.teacher.vocab_size)
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
    choice = cfg.student.chat_template
    teacher = cache.info.chat.template_text
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


def compare_with_teacher(run: Run, student: dict) -> None:
    """Step 0: the teacher's own bits per character on the eval windows the student is scored on (kept in the
    cache by the caching pass) against the student's before training. A teacher that is not better can only pull
    the student towards a weaker model: warned loudly, or refused with train.on_weaker_teacher=refuse."""
    cfg, cache, log, accelerator, ref = run.cfg, run.cache, run.log, run.accelerator, run.teacher_reference
    if ref is None or not math.isfinite(student.get("eval/bits_per_char", math.nan)):
        return  # a cache made before kd recorded the teacher's score
    if not math.isfinite(ref.score["bits_per_char"]):
        return  # windows without a character to score (no text a rate can be given for)
    teacher, other_text = ref.score, ref.note  # the note: a capped eval on a cache older than format 8
    log.write(
        {
            "step": 0,
            "event": "teacher_reference",
            "teacher/bits_per_char": teacher["bits_per_char"],
            "teacher/bits_per_byte": teacher["bits_per_byte"],
            "teacher/ce": teacher["ce_per_token"],
            "teacher/windows": ref.windows,
        }
    )
    t, s = teacher["bits_per_char"], student["eval/bits_per_char"]
    if accelerator.is_main_process:
        print(f"[train] held-out bits/char: teacher {t:.4f}, student before training {s:.4f}{other_text}", flush=True)
    if t < s:
        return
    message = (
        f"the teacher is not better than the student on the eval text: {t:.4f} bits/char for the teacher "
        f"({cache.info.teacher.name_or_path}) against {s:.4f} for the untrained student{other_text}. Distilling it "
        "pulls the student towards a weaker model; check the teacher (python -m kd.evaluate) or use a stronger one"
    )
    warn_or_refuse(accelerator, message, cfg.train.on_weaker_teacher, "train.on_weaker_teacher")
