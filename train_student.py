"""Train a student against a teacher cache: no teacher in memory, one cache reused by every run.

    accelerate launch train_student.py --config configs/train_shakespeare.yaml [dotted.key=value ...]
    python train_student.py --config configs/train_shakespeare.yaml            # one process

Writes runs/<run_name>/: config.json, metrics.jsonl (one line per optimizer step and per eval), checkpoints/
(resumable Accelerate state), final/ (save_pretrained model + tokenizer + projectors) and final_ema/ when EMA
is on. `python -m kd.report runs/<run_name>` draws the curves.

The loop, per optimizer step: set the LR from the pure schedule, forward/backward the micro-batches of the
window (losses normalised once, in kd.train.accumulate_window), skip the step if anything was non-finite,
clip, step, log; evaluate and checkpoint at optimizer-step boundaries.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from kd import __version__
from kd.cache import TeacherCache, write_json_atomic
from kd.config import diff_keys, parse_cli, to_dict
from kd.errors import KDError, run_cli
from kd.schedule import lr_at
from kd.teacher import load_tokenizer, tokenizer_fingerprint
from kd.train import (EMA, RUN_FORMAT_VERSION, DistillModel, MetricsLog, accumulate_window, epoch_order, evaluate,
                      make_loader, peak_memory_mb, steps_per_epoch)
from kd.train_config import RESUME_FREE_KEYS, TrainConfig


def build_student(cfg: TrainConfig, tokenizer, teacher_vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from kd.assets import resolve_path

    s = cfg.student
    if s.pretrained is not None:
        try:
            lm = AutoModelForCausalLM.from_pretrained(resolve_path(s.pretrained), revision=s.revision,
                                                      attn_implementation=s.attn_implementation, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise KDError(f"cannot load student '{s.pretrained}': {e}") from None
    else:
        fields = dict(s.config)
        fields.setdefault("vocab_size", len(tokenizer))
        try:
            model_cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
        except (ValueError, TypeError) as e:
            raise KDError(f"student.config is not a valid model config: {e}") from None
        lm = AutoModelForCausalLM.from_config(model_cfg, attn_implementation=s.attn_implementation)
    if lm.config.vocab_size < teacher_vocab:
        raise KDError(f"the student's vocab_size ({lm.config.vocab_size}) is smaller than the teacher's "
                      f"({teacher_vocab}): cached teacher token ids would fall outside the student's logits")
    if s.gradient_checkpointing:
        # renamed to activation_checkpointing_enable in recent transformers 5.x releases (the old name warns)
        (getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable)()
    return lm


def cross_tokenizer_splits(cfg: TrainConfig, cache: TeacherCache, tokenizer, train_split, eval_split, run_dir: Path,
                           accelerator):
    """Wrap both splits in the student's tokenization, aligned to the teacher's (built once per cache and student
    tokenizer), log alignment and mapping coverage, and apply the alignment floor."""
    from kd import align

    teacher_tokenizer = load_tokenizer(cache.manifest["teacher"]["name_or_path"], cache.manifest["teacher"]["revision"])
    sep = cfg.loss.cross_tokenizer_separator or tokenizer.eos_token
    arrays = align.load_or_build(cache, tokenizer, sep, run_dir, accelerator.is_main_process,
                                 accelerator.wait_for_everyone)
    mapping = align.vocab_map(teacher_tokenizer, tokenizer, cache.manifest["teacher"]["vocab_size"])
    train = align.AlignedSplit(train_split, arrays["train"], mapping)
    evals = align.AlignedSplit(eval_split, arrays["eval"], mapping)
    cov = align.coverage(train)
    msg = (f"[cross-tokenizer] {cfg.loss.cross_tokenizer}: {cov['aligned_share']:.1%} of student positions aligned to a "
           f"teacher position; {cov['mapped_mass_share']:.1%} of the teacher's top-{cache.top_k} mass maps to identical "
           f"student tokens ({int((mapping >= 0).sum())} of {len(mapping)} teacher ids map)")
    if accelerator.is_main_process:
        print(msg, flush=True)
    if cov["aligned_share"] < cfg.loss.min_aligned_share:
        low = (f"only {cov['aligned_share']:.1%} of student positions align to the teacher (floor "
               f"loss.min_aligned_share={cfg.loss.min_aligned_share}): check that the cache text and the student "
               "tokenizer belong together")
        if cfg.loss.on_low_alignment == "refuse":
            raise KDError(low + "; or set loss.on_low_alignment=warn")
        if accelerator.is_main_process:
            print("WARNING " + "!" * 20 + f"\nWARNING {low}\nWARNING " + "!" * 20, file=sys.stderr, flush=True)
    return train, evals


def check_feature_layers(cfg: TrainConfig, cache: TeacherCache, student_layers: int) -> list[int]:
    """Validate the layer map; return each pair's slot in the cached hidden_states."""
    slots = []
    for s_layer, t_layer in cfg.loss.feature_layers:
        if not 0 <= s_layer <= student_layers:
            raise KDError(f"loss.feature_layers: student layer {s_layer} out of range 0..{student_layers}")
        if t_layer not in cache.hidden_layers:
            raise KDError(f"loss.feature_layers: teacher layer {t_layer} is not in the cache (it stores "
                          f"{cache.hidden_layers}); re-cache with cache.hidden_layers including it")
        slots.append(cache.hidden_layers.index(t_layer))
    return slots


def prepare_run_dir(run_dir: Path, cfg_dict: dict, resume: bool) -> dict | None:
    """Refuse to overwrite a run; on resume, check the config and return the latest checkpoint's state."""
    if not resume:
        if run_dir.exists():
            raise KDError(f"run directory {run_dir} already exists; pick another train.run_name, or continue it "
                          "with train.resume=true")
        return None
    if not (run_dir / "config.json").exists():
        raise KDError(f"train.resume=true but {run_dir} holds no run to resume")
    saved = json.loads((run_dir / "config.json").read_text())["config"]
    differing = [k for k in diff_keys(saved, cfg_dict) if k not in RESUME_FREE_KEYS]
    if differing:
        raise KDError(f"cannot resume {run_dir}: config differs in {', '.join(differing)}; an exact continuation "
                      "needs the same config (start a new run instead)")
    latest = run_dir / "checkpoints" / "latest.json"
    return json.loads(latest.read_text()) if latest.exists() else None


def save_checkpoint(accelerator, run_dir: Path, state: dict) -> Path:
    """Accelerate state (model, projectors, optimizer, scaler, RNG, EMA) + trainer state; keeps the newest only,
    since each holds the optimizer's two moments (3x the model) and resume needs just the last."""
    ckpt_root = run_dir / "checkpoints"
    ckpt = ckpt_root / f"step_{state['step']:08d}"
    accelerator.save_state(str(ckpt))
    if accelerator.is_main_process:
        write_json_atomic(ckpt / "trainer_state.json", state)
        previous = json.loads((ckpt_root / "latest.json").read_text()) if (ckpt_root / "latest.json").exists() else None
        write_json_atomic(ckpt_root / "latest.json", dict(state, path=ckpt.name))
        if previous and previous["path"] != ckpt.name:
            shutil.rmtree(ckpt_root / previous["path"], ignore_errors=True)
    accelerator.wait_for_everyone()
    return ckpt


def save_final(accelerator, model, tokenizer, out: Path, meta: dict) -> None:
    """save_pretrained folder (+ tokenizer, projectors, kd_meta.json). The full state dict is gathered through
    Accelerate on every process (a collective under FSDP / DeepSpeed ZeRO-3), then written by the main one."""
    unwrapped = accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped.lm.save_pretrained(out, state_dict={k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")})
        tokenizer.save_pretrained(out)
        if len(unwrapped.projectors):
            torch.save({"feature_pairs": unwrapped.feature_pairs,
                        "state_dict": {k[len("projectors."):]: v for k, v in state.items() if k.startswith("projectors.")}},
                       out / "projectors.pt")
        write_json_atomic(out / "kd_meta.json", meta)
    accelerator.wait_for_everyone()


def main(cfg: TrainConfig) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t_start = time.time()
    # gradient_accumulation_steps=1: accumulation is done (and normalised) by hand in kd.train.accumulate_window.
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=1)
    tc = cfg.train
    cfg_dict = to_dict(cfg)
    run_dir = Path(tc.output_dir) / tc.run_name

    # 1. Inputs, checked before anything is written: cache, tokenizer match, run directory, layer map.
    cache = TeacherCache(tc.cache_dir)
    teacher_tok = cache.manifest["tokenizer"]
    tok_source = cfg.student.tokenizer or cfg.student.pretrained or cache.manifest["teacher"]["name_or_path"]
    tokenizer = load_tokenizer(tok_source)
    cross = cfg.loss.cross_tokenizer is not None
    if tokenizer_fingerprint(tokenizer) != teacher_tok["fingerprint"] and not cross:
        raise KDError(f"the student's tokenizer ({tok_source}) differs from the one the cache was made with "
                      f"(fingerprint {teacher_tok['fingerprint'][:12]}...): same-tokenizer KD compares token ids, "
                      "so they must match. Use the teacher's tokenizer for the student, or set "
                      "loss.cross_tokenizer=hybrid (or mapped, uld) for cross-tokenizer KD")
    if cross and not cache.manifest.get("store_text"):
        raise KDError(f"loss.cross_tokenizer needs the cached text and token spans, and cache {tc.cache_dir} was "
                      "written without them: re-cache with cache.store_text=true")
    resume_state = prepare_run_dir(run_dir, cfg_dict, tc.resume)
    need_hidden = cfg.loss.alpha_feature > 0 or cfg.loss.alpha_contrastive > 0
    if cfg.loss.target == "sampled" and not cache.manifest.get("sample_n"):
        raise KDError(f"loss.target=sampled but cache {tc.cache_dir} holds no sampled targets; re-cache with "
                      "cache.sample_n=50 (or another count), or use loss.target=topk")
    target_fields = {"topk": ("topk_ids", "topk_logprobs"), "sampled": ("sample_ids", "sample_counts"),
                     "online": ()}[cfg.loss.target]
    train_split = cache.split("train", ("input_ids",) + target_fields + (("hidden_states",) if need_hidden else ()))
    # eval/kd and top-1 agreement are always measured against the cached top-k, whatever the training target
    eval_split = cache.split("eval", ("input_ids", "topk_ids", "topk_logprobs"))
    if cross:  # the student's view: its own tokens, the teacher's targets at aligned positions (kd/align.py)
        train_split, eval_split = cross_tokenizer_splits(cfg, cache, tokenizer, train_split, eval_split, run_dir,
                                                         accelerator)
    if len(eval_split) == 0 or len(train_split) == 0:
        raise KDError(f"cache {tc.cache_dir} has an empty train or eval split")
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = tc.micro_batch_size * tc.gradient_accumulation_steps
    epoch_steps = steps_per_epoch(len(train_split), world, tc.micro_batch_size, tc.gradient_accumulation_steps)
    if epoch_steps == 0:
        raise KDError(f"the train split ({len(train_split)} sequences) is smaller than one optimizer step "
                      f"({tc.micro_batch_size} x {tc.gradient_accumulation_steps} x {world} processes)")
    total_steps = tc.max_steps or math.ceil(tc.epochs * epoch_steps)
    warmup = tc.warmup_steps or int(tc.warmup_fraction * total_steps)
    if warmup >= total_steps:
        raise KDError(f"warmup ({warmup} steps) is not shorter than the run ({total_steps} optimizer steps)")

    # 2. Student, projectors, optimizer. Weight decay skips biases and norm weights (1-D tensors).
    set_seed(tc.seed)
    # across tokenizers teacher ids never index the student logits (they are mapped), so no vocabulary floor
    lm = build_student(cfg, tokenizer, 0 if cross else cache.manifest["teacher"]["vocab_size"])
    slots = check_feature_layers(cfg, cache, lm.config.num_hidden_layers)
    model = DistillModel(lm, cfg.loss.feature_layers if need_hidden else [], cache.manifest["teacher"]["hidden_size"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": tc.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=tc.lr, betas=tuple(tc.betas))
    model, optimizer = accelerator.prepare(model, optimizer)
    teacher = None
    if cfg.loss.target == "online":  # the reference mode: the teacher in memory, as the cache exists to avoid
        from kd.teacher import load_causal_lm

        t = cache.manifest["teacher"]
        teacher = load_causal_lm(t["name_or_path"], t["revision"], t["dtype"], "sdpa").to(accelerator.device).eval()
    ema = EMA(accelerator.unwrap_model(model), tc.ema_decay) if tc.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    step, tokens_seen, skipped_steps, consecutive_skips = 0, 0, 0, 0
    best_eval, evals_without_improvement = math.inf, 0
    if resume_state is not None:
        accelerator.load_state(str(run_dir / "checkpoints" / resume_state["path"]))
        step, tokens_seen = resume_state["step"], resume_state["tokens_seen"]
        skipped_steps, consecutive_skips = resume_state["skipped_steps"], resume_state["consecutive_skips"]
        best_eval, evals_without_improvement = resume_state["best_eval"], resume_state["evals_without_improvement"]
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", {
            "format": "kd-run", "format_version": RUN_FORMAT_VERSION, "kd_version": __version__, "config": cfg_dict,
            "cache": {"dir": tc.cache_dir, "teacher": cache.manifest["teacher"], "top_k": cache.top_k,
                      "tokenizer_fingerprint": teacher_tok["fingerprint"]},
            "total_steps": total_steps, "warmup_steps": warmup, "steps_per_epoch": epoch_steps, "num_processes": world})
    # on resume, records the interrupted run wrote after its checkpoint are dropped (all of them if it had none)
    keep = None if not tc.resume else (step if resume_state is not None else -1)
    log = MetricsLog(run_dir / "metrics.jsonl", accelerator.is_main_process, keep_until_step=keep)
    pin = accelerator.device.type == "cuda"
    eval_indices = list(range(len(eval_split)))[: tc.eval_max_sequences][rank::world]
    eval_loader = make_loader(eval_split, eval_indices, tc.micro_batch_size, tc.num_workers, pin)

    def trainer_state() -> dict:
        return {"step": step, "tokens_seen": tokens_seen, "skipped_steps": skipped_steps,
                "consecutive_skips": consecutive_skips, "best_eval": best_eval,
                "evals_without_improvement": evals_without_improvement, "format_version": RUN_FORMAT_VERSION}

    def run_eval() -> dict:
        record = {"step": step, "tokens_seen": tokens_seen, **evaluate(model, eval_loader, cfg.loss, accelerator)}
        if ema is not None:  # the EMA weights, reported separately and labelled as such
            with ema.applied(accelerator.unwrap_model(model)):
                record.update({f"ema_{k}": v for k, v in evaluate(model, eval_loader, cfg.loss, accelerator).items()})
        log.write(record)
        return record

    last_eval = run_eval() if step == 0 else None  # the untrained student: the baseline every curve starts from
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process,
               file=sys.stdout, dynamic_ncols=True)
    model.train()
    stop_reason = "max_steps"
    t_last = time.time()

    # 3. The loop: one iteration = one optimizer step.
    while step < total_steps and stop_reason == "max_steps":
        epoch, done_in_epoch = divmod(step, epoch_steps)
        order = epoch_order(len(train_split), epoch, tc.seed, rank, world, per_step,
                            train_split.starts if tc.shuffle == "shards" else None,
                            tc.shuffle_buffer_shards)[done_in_epoch * per_step:]
        batches_iter = iter(make_loader(train_split, order, tc.micro_batch_size, tc.num_workers, pin))
        for _ in range(min(epoch_steps - done_in_epoch, total_steps - step)):
            lr = lr_at(step + 1, schedule=tc.schedule, lr=tc.lr, min_lr=tc.min_lr, warmup_steps=warmup,
                       total_steps=total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            window = [next(batches_iter) for _ in range(tc.gradient_accumulation_steps)]
            result = accumulate_window(model, window, cfg.loss, accelerator, slots, teacher)
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm or math.inf))
            nonfinite = result.nonfinite + ([] if math.isfinite(grad_norm) else ["grad_norm"])
            if nonfinite:
                # Never applied, never clamped: the weights stay as they were. Under fp16 the scaler still
                # records the overflow (halving its scale), as its own step would.
                optimizer.zero_grad(set_to_none=True)
                if accelerator.scaler is not None:
                    accelerator.scaler.update()
                skipped_steps += 1
                consecutive_skips += 1
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                consecutive_skips = 0
                if ema is not None:
                    ema.update(accelerator.unwrap_model(model))
            step += 1
            tokens_seen += result.tokens
            now = time.time()
            weighted = {f"w_{c}": getattr(cfg.loss, f"alpha_{c}") * v for c, v in result.raw.items()}
            record = {"step": step, "epoch": epoch, "lr": lr, "loss": sum(weighted.values()), **result.raw,
                      **weighted, "top1_agreement": result.agree, "grad_norm": grad_norm, "tokens_seen": tokens_seen,
                      "skipped_steps": skipped_steps, "skipped": bool(nonfinite), "nonfinite": nonfinite,
                      "tokens_per_s": result.tokens / max(now - t_last, 1e-9), "peak_mem_mb": peak_memory_mb(accelerator.device),
                      "elapsed_s": now - t_start}
            t_last = now
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)

            if consecutive_skips >= tc.max_consecutive_skips:
                ckpt = save_checkpoint(accelerator, run_dir, trainer_state())
                raise KDError(f"{consecutive_skips} optimizer steps in a row had non-finite {', '.join(nonfinite)} "
                              f"(last at step {step}); stopped. The last good weights are saved in {ckpt}. Check the "
                              f"cache (python -m kd.cache verify {tc.cache_dir}), lower train.lr, or use bf16/fp32")
            if step % tc.eval_every == 0 and step < total_steps:
                last_eval = ev = run_eval()
                if ev["eval/ce"] < best_eval:
                    best_eval, evals_without_improvement = ev["eval/ce"], 0
                else:
                    evals_without_improvement += 1
                if tc.early_stopping_patience and evals_without_improvement >= tc.early_stopping_patience:
                    stop_reason = "early_stopping"
                    log.write({"step": step, "event": "early_stopping", "best_eval/ce": best_eval,
                               "patience": tc.early_stopping_patience})
                    break
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < total_steps:
                save_checkpoint(accelerator, run_dir, trainer_state())
    bar.close()

    # 4. Final eval (unless this step was just evaluated, as when early stopping), checkpoint and models.
    final = last_eval if last_eval is not None and last_eval["step"] == step else run_eval()
    save_checkpoint(accelerator, run_dir, trainer_state())
    meta = {"format": "kd-student", "format_version": RUN_FORMAT_VERSION, "kd_version": __version__,
            "config": cfg_dict, "step": step, "stop_reason": stop_reason, "final_eval": final, "weights": "trained"}
    save_final(accelerator, model, tokenizer, run_dir / "final", meta)
    if ema is not None:
        with ema.applied(accelerator.unwrap_model(model)):
            save_final(accelerator, model, tokenizer, run_dir / "final_ema", dict(meta, weights=f"ema (decay {tc.ema_decay})"))
    if accelerator.is_main_process:
        print(f"[train] {stop_reason}: {step} steps, {tokens_seen} tokens, {skipped_steps} skipped, "
              f"eval/ce {final['eval/ce']:.4f}, eval/ppl {final['eval/ppl']:.2f}, "
              f"top-1 agreement {final['eval/top1_agreement']:.3f}, {time.time() - t_start:.0f} s -> {run_dir}",
              flush=True)
    return run_dir


if __name__ == "__main__":
    run_cli(lambda: main(parse_cli(TrainConfig, None, __doc__.split("\n\n")[0])))
