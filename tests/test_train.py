"""train_student.py: each failure of the original project, made impossible and proven here."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import warm
from conftest import ROOT, reseal_row, torchrun

from kd import cache_teacher, train_student
from kd.cache import MANIFEST, TeacherCache, shard_records
from kd.config import load_config
from kd.errors import KDError
from kd.models import load_tokenizer
from kd.schedule import lr_at
from kd.train import MetricsLog, read_metrics
from kd.train.model import build_student
from kd.train_config import TrainConfig

STUDENT = (
    "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
    "num_key_value_heads: 2, max_position_embeddings: 128}"
)


def overrides(cache: Path, out: Path, **extra) -> list[str]:
    base = {
        "student.config": STUDENT,
        "train.cache_dir": cache,
        "train.output_dir": out,
        "train.run_name": "r",
        "train.max_steps": 10,
        "train.micro_batch_size": 2,
        "train.gradient_accumulation_steps": 2,
        "train.lr": 3e-3,
        "train.min_lr": 3e-4,
        "train.warmup_steps": 2,
        "train.eval_every": 5,
        "train.num_workers": 0,
        "loss.alpha_feature": 0.1,
        "loss.feature_layers": "[[1, 0], [2, 2]]",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def make_cfg(cache: Path, out: Path, **extra) -> TrainConfig:
    return load_config(TrainConfig, None, overrides(cache, out, **extra))


def steps_of(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def evals_of(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "eval/ce" in r]


# ---- 1, 2: the LR schedule, in optimizer steps, whatever GA and the number of processes ----


def check_lr_log(run_dir: Path, total: int, warmup: int, schedule="cosine", lr=3e-3, min_lr=3e-4):
    steps = steps_of(run_dir)
    assert [r["step"] for r in steps] == list(range(1, total + 1))
    for r in steps:
        assert r["lr"] == pytest.approx(
            lr_at(r["step"], schedule=schedule, lr=lr, min_lr=min_lr, warmup_steps=warmup, total_steps=total), rel=1e-12
        )
        assert r["lr"] > 0
    if schedule != "constant":
        assert steps[-1]["lr"] == pytest.approx(min_lr) and min(r["lr"] for r in steps[:-1]) > min_lr


def test_lr_follows_closed_form_with_accumulation(tiny_cache, tmp_path):
    run = train_student.main(
        make_cfg(tiny_cache, tmp_path, **{"train.gradient_accumulation_steps": 4, "train.max_steps": 6})
    )
    check_lr_log(run, 6, 2)
    assert steps_of(run)[0]["tokens_seen"] == 2 * 4 * 31  # 8 full windows of 32 tokens, 31 targets each


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_other_schedules_are_honoured(tiny_cache, tmp_path, schedule):
    run = train_student.main(
        make_cfg(tiny_cache, tmp_path, **{"train.schedule": schedule, "train.max_steps": 5, "loss.alpha_feature": 0})
    )
    check_lr_log(run, 5, 2, schedule=schedule)


def test_two_processes_match_one_process(tiny_cache, tmp_path):
    """GA=4 on 2 processes vs GA=8 on 1: every optimizer window holds the same sequences (the seeded permutation
    is dealt round-robin to ranks), so LR, losses, gradient norms and evals must agree."""
    common = {"train.max_steps": 4, "train.eval_every": 2}
    two_ga4 = overrides(tiny_cache, tmp_path / "two", **common, **{"train.gradient_accumulation_steps": 4})
    result = torchrun(ROOT / "train_student.py", *two_ga4)
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two" / "r"
    check_lr_log(two, 4, 2)
    assert json.loads((two / "config.json").read_text())["num_processes"] == 2
    assert steps_of(two)[0]["tokens_seen"] == 2 * 2 * 4 * 31  # both processes' windows are counted
    one = train_student.main(
        make_cfg(tiny_cache, tmp_path / "one", **common, **{"train.gradient_accumulation_steps": 8})
    )
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    keys = ("lr", "loss", "ce", "kd", "feature", "grad_norm", "tokens_seen", "eval/ce", "eval/top1_agreement")
    assert all(any(key in r for r in a) for key in keys)  # every compared key is really there
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in set(keys) & ra.keys():
            assert rb[key] == pytest.approx(ra[key], rel=2e-4), (ra["step"], key)


def test_scripts_run_through_accelerate_launch(tmp_path, corpus_dir, llama_teacher):
    """The user's commands, end to end, through the real launcher: cache, then train against it (the launcher
    started warm, the process it starts for the script a fresh interpreter, as a user's)."""
    from conftest import cache_overrides

    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    cache = tmp_path / "cache"
    r = warm.run(
        [*launch, str(ROOT / "cache_teacher.py"), *cache_overrides(llama_teacher, corpus_dir, cache)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[cache] done: " in r.stdout and "bytes/token" in r.stdout and (cache / MANIFEST).exists()
    r = warm.run(
        [*launch, str(ROOT / "train_student.py"), *overrides(cache, tmp_path, **{"train.max_steps": 4})],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[train] max_steps: 4 steps" in r.stdout
    assert [x["step"] for x in steps_of(tmp_path / "r")] == [1, 2, 3, 4]
    assert (tmp_path / "r" / "final" / "model.safetensors").exists()


# ---- 4: losses balanced and visible; GA-invariant normalisation ----


def test_logged_total_is_the_sum_of_weighted_terms(tiny_cache, tmp_path):
    run = train_student.main(make_cfg(tiny_cache, tmp_path, **{"loss.alpha_contrastive": 0.05, "train.max_steps": 3}))
    for r in steps_of(run):
        for c in ("ce", "kd", "feature", "contrastive"):
            assert r[f"w_{c}"] == pytest.approx(
                load_config(
                    TrainConfig, None, overrides(tiny_cache, tmp_path, **{"loss.alpha_contrastive": 0.05})
                ).loss.__dict__[f"alpha_{c}"]
                * r[c]
            )
        assert r["loss"] == pytest.approx(r["w_ce"] + r["w_kd"] + r["w_feature"] + r["w_contrastive"], rel=1e-12)
        assert r["grad_norm"] > 0 and r["peak_mem_mb"] > 0


def _grads_after_window(cache: Path, micro_batch: int, accumulation: int, extra: dict) -> dict[str, torch.Tensor]:
    from accelerate import Accelerator

    from kd.train import DistillModel, accumulate_window

    cfg = load_config(TrainConfig, None, overrides(cache, Path("/unused"), **extra))
    c = TeacherCache(cache)
    split = c.split("train")
    items = [split[i] for i in range(8)]
    for j, it in enumerate(items):  # ragged: every sequence gets its own valid length
        it["length"] = torch.tensor(32 - 3 * j)
    batches = [torch.utils.data.default_collate(items[i : i + micro_batch]) for i in range(0, 8, micro_batch)]
    assert len(batches) == accumulation
    torch.manual_seed(0)
    lm = build_student(cfg, load_tokenizer(c.manifest["teacher"]["name_or_path"]), 0)
    model = DistillModel(lm, cfg.loss.feature_layers, c.manifest["teacher"]["hidden_size"])
    accelerator = Accelerator()
    accumulate_window(model, batches, cfg.loss, accelerator, [0, 1])
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulation_gives_the_same_gradient_as_one_big_batch(tiny_cache):
    extra = {"loss.alpha_contrastive": 0.0}
    a = _grads_after_window(tiny_cache, 2, 4, extra)
    b = _grads_after_window(tiny_cache, 8, 1, extra)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-4, msg=n)


# ---- 3, 6: evaluation of the current student; honest perplexity ----


def test_eval_steps_add_evals_at_chosen_steps_and_a_steps_figures_are_its_own(tiny_cache, tmp_path, monkeypatch):
    """train.eval_steps evaluates after chosen steps besides every eval_every (log-spaced budgets of one run,
    bench/bench_budget.py). A step's tokens_per_s and step_cpu_s (CPU seconds of the process) are its own: the
    eval after a step is not counted in the next one (it was, in tokens_per_s). Here the eval after step 2 also
    burns 1 s of CPU and sleeps 2 s."""
    from kd.train import recipe

    real = recipe.evaluate

    def slow_evaluate(run, *args, **kwargs):
        if run.state.step == 2:
            t0 = time.process_time()
            while time.process_time() - t0 < 1.0:
                pass
            time.sleep(2)
        return real(run, *args, **kwargs)

    monkeypatch.setattr(recipe, "evaluate", slow_evaluate)
    cfg = {"train.max_steps": 6, "train.eval_every": 5, "train.eval_steps": "[2, 3, 9]"}
    run = train_student.main(make_cfg(tiny_cache, tmp_path, **cfg))
    assert [e["step"] for e in evals_of(run)] == [0, 2, 3, 5, 6]
    steps = steps_of(run)
    assert all(r["step_cpu_s"] > 0 for r in steps) and steps[2]["step_cpu_s"] < 0.7, steps[2]
    step3 = steps[2]
    assert (step3["tokens_seen"] - steps[1]["tokens_seen"]) / step3["tokens_per_s"] < 1.5, step3


def test_eval_reflects_the_current_student_and_ppl_is_exp_ce(tiny_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    run = train_student.main(make_cfg(tiny_cache, tmp_path, **{"train.max_steps": 10, "train.eval_every": 5}))
    evals = evals_of(run)
    assert [e["step"] for e in evals] == [0, 5, 10]
    assert len({e["eval/ce"] for e in evals}) == 3  # training in between changes the eval
    for e in evals:
        assert e["eval/ppl"] == pytest.approx(math.exp(e["eval/ce"]), rel=1e-12)
    # the final eval, recomputed from scratch from the saved model: plain HF forward + F.cross_entropy
    model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    split = TeacherCache(tiny_cache).split("eval")
    total, count, agree = 0.0, 0, 0
    for i in range(len(split)):
        it = split[i]
        n = int(it["length"])
        with torch.no_grad():
            logits = model(it["input_ids"][None, :n]).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, it["input_ids"][1:n], reduction="sum").item()
        agree += (logits.argmax(-1) == it["topk_ids"][: n - 1, 0]).sum().item()
        count += n - 1
    assert evals[-1]["eval/tokens"] == count
    assert evals[-1]["eval/ce"] == pytest.approx(total / count, rel=1e-5)
    assert evals[-1]["eval/top1_agreement"] == pytest.approx(agree / count)
    assert (run / "final" / "projectors.pt").exists()
    meta = json.loads((run / "final" / "kd_meta.json").read_text())
    assert meta["format_version"] == 1 and meta["config"]["train"]["max_steps"] == 10


def test_training_loss_and_eval_ce_fall(tiny_cache, tmp_path):
    run = train_student.main(
        make_cfg(
            tiny_cache,
            tmp_path,
            **{"train.max_steps": 30, "train.eval_every": 10, "train.lr": 1e-2, "train.min_lr": 1e-3},
        )
    )
    steps, evals = steps_of(run), evals_of(run)
    first = sum(r["loss"] for r in steps[:3]) / 3
    last = sum(r["loss"] for r in steps[-3:]) / 3
    assert last < 0.8 * first
    assert evals[-1]["eval/ce"] < evals[0]["eval/ce"] - 1.0


# ---- 5: no silent NaN ----


def poisoned_cache(src: Path, dst: Path, sequences: list[int] | None) -> Path:
    """A copy of the cache whose teacher log-probs are NaN for the given train sequences (None = all)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / MANIFEST).read_text())
    for shard in shard_records(dst, m, "train"):
        with h5py.File(dst / shard["file"], "r+") as f:
            for r, seq in enumerate(f["sequence_index"][:]):
                if sequences is None or int(seq) in sequences:
                    # q8 (the default codec): a NaN anchor and step decode to NaN log-probs
                    ds = "topk_logprobs_q8" if "topk_logprobs_q8" in f else "topk_logprobs"
                    f[ds][r] = float("nan")
                    reseal_row(f, ds, r)  # as a teacher's NaNs would be stored: checksummed
    return dst


@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
def test_nonfinite_step_is_skipped_and_logged(tiny_cache, tmp_path, precision):
    """Also under fp16, which Accelerate runs as fp32 on a CPU (no scaler: its skipped-window path is
    tests/test_backends.py::test_the_fp16_gradient_scaler_path_of_a_skipped_window)."""
    from kd.train import epoch_order

    # poison exactly the sequences that make up optimizer step 3 (window of 2 x 2 sequences, seed 0)
    order = epoch_order(64, 0, 0, 0, 1, 4)
    cache = poisoned_cache(tiny_cache, tmp_path / "cache", [int(i) for i in order[8:12]])
    run = train_student.main(make_cfg(cache, tmp_path, **{"train.max_steps": 5, "train.mixed_precision": precision}))
    steps = steps_of(run)
    assert [r["skipped"] for r in steps] == [False, False, True, False, False]
    assert steps[2]["nonfinite"] == ["kd", "grad_norm"] and steps[2]["kd"] is None  # NaN logged as null, not 0
    assert [r["skipped_steps"] for r in steps] == [0, 0, 1, 1, 1]
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(steps) if i != 2)


def test_a_ce_only_run_computes_and_reads_nothing_of_the_teacher(tiny_cache, tmp_path, monkeypatch):
    """loss.alpha_kd=0 (and no feature term): training computes CE alone and reads no teacher field of the train
    split, so NaN teacher log-probs in its windows skip no step (a weight-0 KD term used to be computed every step,
    costing what KD costs and skipping steps on its NaN); no per-step kd or top-1 agreement is logged, and every
    eval still measures CE and KD against the cached top-k."""
    from kd.cache import TeacherCache

    asked = {}
    real_split = TeacherCache.split

    def split(self, name, fields=()):
        asked[name] = tuple(fields)
        return real_split(self, name, fields)

    monkeypatch.setattr(TeacherCache, "split", split)
    cache = poisoned_cache(tiny_cache, tmp_path / "cache", None)  # every train sequence's teacher is NaN
    ce_only = {"train.max_steps": 4, "loss.alpha_kd": 0, "loss.alpha_feature": 0, "train.eval_every": 2}
    run = train_student.main(make_cfg(cache, tmp_path, **ce_only))
    steps, evals = steps_of(run), evals_of(run)
    assert asked["train"] == ("input_ids", "loss_mask", "segments")
    assert not any(r["skipped"] for r in steps) and all(math.isfinite(r["loss"]) for r in steps)
    assert all("kd" not in r and "top1_agreement" not in r and r["loss"] == r["w_ce"] for r in steps)
    assert all(math.isfinite(r["eval/kd"]) and "eval/top1_agreement" in r for r in evals)


def test_weights_unchanged_by_a_skipped_step(tiny_cache, tmp_path):
    from safetensors.torch import load_file

    cache = poisoned_cache(tiny_cache, tmp_path / "cache", None)  # every step non-finite
    with pytest.raises(KDError, match="3 optimizer steps in a row had non-finite kd"):
        train_student.main(make_cfg(cache, tmp_path, **{"train.max_consecutive_skips": 3}))
    ckpt = tmp_path / "r" / "checkpoints" / json.loads((tmp_path / "r/checkpoints/latest.json").read_text())["path"]
    saved = load_file(ckpt / "model.safetensors")
    torch.manual_seed(0)
    cfg = make_cfg(cache, tmp_path)
    from accelerate.utils import set_seed

    set_seed(0)
    fresh = build_student(cfg, load_tokenizer(TeacherCache(cache).manifest["teacher"]["name_or_path"]), 0)
    # every weight was saved (a tied LM head is stored once, as the embedding)
    assert {n for n in fresh.state_dict() if f"lm.{n}" not in saved} <= {"lm_head.weight"}
    for name, p in fresh.state_dict().items():
        if f"lm.{name}" in saved:
            assert torch.equal(saved[f"lm.{name}"], p), name  # the last good state = the initial weights
    assert all(r["skipped"] for r in steps_of(tmp_path / "r"))


# ---- 10: checkpoints and exact resume ----


def test_shard_aware_order_is_a_permutation_that_reads_few_shards_at_a_time():
    from kd.train import epoch_order

    starts = np.arange(0, 1000, 10)  # 100 shards of 10 sequences
    shard_of = np.repeat(np.arange(100), 10)
    for B in (1, 4):
        epochs = []
        for epoch in range(3):
            ranks = [epoch_order(1000, epoch, 7, r, 2, 5, starts, B) for r in range(2)]
            both = np.concatenate(ranks)
            assert len(both) == 1000 and len(np.unique(both)) == 1000  # a permutation, disjoint across ranks
            for order in ranks:  # each process reads from at most B shards in any run of B * 10 / 2 reads
                run = B * 10 // 2
                assert max(len(set(shard_of[order[i : i + run]])) for i in range(0, len(order) - run, run)) <= 2 * B
            epochs.append(ranks[0])
            assert np.array_equal(epoch_order(1000, epoch, 7, 0, 2, 5, starts, B), ranks[0])  # pure: resumable
        assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    exact = epoch_order(1000, 0, 7, 0, 1, 5)
    assert len(set(shard_of[exact[:20]])) > 10  # the exact shuffle jumps between shards


@pytest.mark.parametrize("shuffle", ["exact", "shards"])
def test_resume_continues_exactly(tiny_cache, tmp_path, monkeypatch, shuffle):
    full = train_student.main(
        make_cfg(
            tiny_cache,
            tmp_path / "a",
            **{
                "train.max_steps": 20,
                "train.checkpoint_every": 10,
                "train.eval_every": 10,
                "train.num_workers": 1,
                "train.shuffle": shuffle,
            },
        )
    )
    # the same run, interrupted after step 12 (its step-10 checkpoint saved), then resumed
    real_write = MetricsLog.write

    def interrupt_after_12(self, record):
        real_write(self, record)
        if record.get("step") == 12 and "loss" in record:
            raise KeyboardInterrupt

    monkeypatch.setattr(MetricsLog, "write", interrupt_after_12)
    cfg = make_cfg(
        tiny_cache,
        tmp_path / "b",
        **{
            "train.max_steps": 20,
            "train.checkpoint_every": 10,
            "train.eval_every": 10,
            "train.num_workers": 1,
            "train.shuffle": shuffle,
        },
    )
    with pytest.raises(KeyboardInterrupt):
        train_student.main(cfg)
    monkeypatch.setattr(MetricsLog, "write", real_write)
    with pytest.raises(KDError, match="already exists"):  # never overwritten without resume
        train_student.main(cfg)
    cfg.train.resume = True
    resumed = train_student.main(cfg)
    assert_same_metrics(full, resumed)


def assert_same_metrics(run_a: Path, run_b: Path) -> None:
    """Two runs logged the same steps and evals with the same values (timings aside)."""
    a, b = read_metrics(run_a), read_metrics(run_b)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    keys = ("loss", "ce", "kd", "feature", "lr", "grad_norm", "eval/ce", "tokens_seen")
    assert all(any(key in r for r in a) for key in keys)  # every compared key is really there
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in set(keys) & ra.keys():
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (ra["step"], key)


def test_final_model_loads_with_from_pretrained(tiny_cache, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = train_student.main(make_cfg(tiny_cache, tmp_path, **{"train.max_steps": 3, "train.ema_decay": 0.9}))
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert model.config.num_hidden_layers == 2 and len(tok) > 0
    ema = AutoModelForCausalLM.from_pretrained(run / "final_ema")
    assert json.loads((run / "final_ema" / "kd_meta.json").read_text())["weights"].startswith("ema")
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), ema.parameters()))
    assert "ema_eval/ce" in evals_of(run)[-1]


# ---- early stopping ----


def test_early_stopping(tiny_cache, tmp_path):
    # an absurd LR makes eval CE worse at every eval: stop after `patience` evals without improvement
    run = train_student.main(
        make_cfg(
            tiny_cache,
            tmp_path,
            **{
                "train.max_steps": 40,
                "train.eval_every": 2,
                "train.lr": 5.0,
                "train.min_lr": 1.0,
                "train.early_stopping_patience": 2,
                "train.max_grad_norm": "null",
            },
        )
    )
    records = read_metrics(run)
    stop = [r for r in records if r.get("event") == "early_stopping"]
    assert stop and stop[0]["step"] < 40
    eval_steps = [r["step"] for r in records if "eval/ce" in r]
    assert eval_steps[-1] == stop[0]["step"] and len(eval_steps) == len(set(eval_steps))  # no duplicate final eval
    assert json.loads((run / "final" / "kd_meta.json").read_text())["stop_reason"] == "early_stopping"


# ---- bad input ----


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"train.warmup_steps": 10}, "is not shorter than the run"),
        ({"loss.alpha_ce": 0, "loss.alpha_kd": 0, "loss.alpha_feature": 0}, "all loss weights"),
        ({"train.schedule": "cosine_restarts"}, "unknown LR schedule"),
        ({"loss.tail": "ignore"}, "unknown KD tail policy"),
        ({"train.min_lr": 0.0}, "0 < train.min_lr"),
        ({"train.bogus": 1}, "unknown config key(s) train.bogus"),
    ],
)
def test_config_errors(tiny_cache, tmp_path, extra, message):
    with pytest.raises(KDError) as e:
        make_cfg(tiny_cache, tmp_path, **extra)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"loss.feature_layers": "[[5, 0]]"}, "student layer 5 out of range 0..2"),
        ({"loss.feature_layers": "[[1, 1]]"}, "teacher layer 1 is not in the cache"),
        ({"train.cache_dir": "/nonexistent"}, "no teacher cache at /nonexistent"),
        ({"train.micro_batch_size": 64, "train.gradient_accumulation_steps": 2}, "smaller than one optimizer step"),
    ],
)
def test_input_errors(tiny_cache, tmp_path, extra, message):
    with pytest.raises(KDError) as e:
        train_student.main(make_cfg(tiny_cache, tmp_path, **extra))
    assert message in str(e.value)
    assert not (tmp_path / "r").exists()


def test_tokenizer_mismatch_is_refused(tiny_cache, tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tokenizer_dir)
    other.add_tokens(["<extra>"])
    other.save_pretrained(tmp_path / "tok")
    with pytest.raises(KDError, match="differs from the one the cache was made with"):
        train_student.main(make_cfg(tiny_cache, tmp_path, **{"student.tokenizer": tmp_path / "tok"}))


def test_empty_split_is_refused(tiny_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    m = json.loads((cache / MANIFEST).read_text())
    m["splits"]["eval"].update(num_sequences=0, shards=[])
    (cache / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(KDError, match="empty train or eval split"):
        train_student.main(make_cfg(cache, tmp_path))


def test_cli_error_exit_code(tiny_cache, tmp_path):
    result = warm.run(
        [
            sys.executable,
            str(ROOT / "train_student.py"),
            *overrides(tiny_cache, tmp_path, **{"train.schedule": "step"}),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown LR schedule train.schedule='step'; choose one of ['cosine', 'linear', 'constant']"
    ]


# ---- report and sweep ----


def test_report_draws_a_png(tiny_cache, tmp_path):
    from kd.report import plot

    run = train_student.main(make_cfg(tiny_cache, tmp_path, **{"train.max_steps": 4, "train.eval_every": 2}))
    png = plot(run)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_sweep_runs_the_grid_and_prints_a_table(tiny_cache, tmp_path, monkeypatch, capsys):
    """kd.sweep in this process; each of its runs a process of its own, as it starts them (`python -m
    kd.train_student ...`), started warm (tests/warm.py)."""
    from types import SimpleNamespace

    from kd import sweep

    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(f"student:\n  config: {STUDENT}\n")
    args = [
        "--config",
        str(cfg_file),
        *[
            o
            for o in overrides(tiny_cache, tmp_path, **{"train.max_steps": 3, "loss.alpha_feature": 0})
            if not o.startswith("student.")
        ],
        "train.lr=1e-3,3e-3",
    ]
    started = []

    def run(cmd):
        started.append(cmd)
        return warm.run(cmd)

    monkeypatch.setattr(sweep, "subprocess", SimpleNamespace(run=run))
    rows = sweep.main(args)
    out = capsys.readouterr().out
    assert [c[:3] for c in started] == [[sys.executable, "-m", "kd.train_student"]] * 2
    assert [r["status"] for r in rows] == ["ok", "ok"]
    table = out[out.index("eval/ce") :]
    assert "r-0" in table and "r-1" in table and "train.lr=1e-3" in table and "train.lr=3e-3" in table
    assert (tmp_path / "r-0" / "final").exists() and (tmp_path / "r-1" / "final").exists()


def test_gradient_checkpointing_changes_memory_not_results(tiny_cache, tmp_path):
    a = train_student.main(make_cfg(tiny_cache, tmp_path / "a", **{"train.max_steps": 3}))
    b = train_student.main(
        make_cfg(tiny_cache, tmp_path / "b", **{"train.max_steps": 3, "student.gradient_checkpointing": "true"})
    )
    for ra, rb in zip(steps_of(a), steps_of(b)):
        for key in ("loss", "ce", "kd", "feature", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key


# ---- KD targets: cached top-k, cached samples, the online teacher ----


@pytest.mark.parametrize("target", ["sampled", "online"])
def test_other_kd_targets_train(tiny_cache, tmp_path, target):
    run = train_student.main(
        make_cfg(tiny_cache, tmp_path, **{"loss.target": target, "train.max_steps": 6, "loss.alpha_feature": 0})
    )
    steps, evals = steps_of(run), evals_of(run)
    assert all(math.isfinite(r["kd"]) and r["kd"] >= 0 for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] and evals[-1]["eval/ce"] < evals[0]["eval/ce"]


def test_online_kd_equals_topk_kd_when_k_is_the_vocabulary(tmp_path, corpus_dir, llama_teacher):
    """With top_k = V cached, cached KD and online KD are the same loss, for both tail policies and at T != 1 (the
    bucket's rounding-level teacher tail counts as 0; before issue 12's fix it did not at T != 1), and so is a
    divergence other than forward KL."""
    from conftest import cache_overrides
    from transformers import AutoConfig

    from kd.cache_config import CacheConfig

    vocab = AutoConfig.from_pretrained(llama_teacher).vocab_size
    cache = cache_teacher.main(
        load_config(
            CacheConfig,
            None,
            cache_overrides(
                llama_teacher, corpus_dir, tmp_path / "c", **{"cache.top_k": vocab, "cache.logprob_codec": "fp32"}
            ),
        )
    )
    common = {"train.max_steps": 3, "loss.alpha_feature": 0, "loss.temperature": 2.0}
    online = steps_of(train_student.main(make_cfg(cache, tmp_path / "online", **common, **{"loss.target": "online"})))
    for tail in ("renormalize", "bucket"):
        topk = steps_of(
            train_student.main(make_cfg(cache, tmp_path / tail, **common, **{"loss.target": "topk", "loss.tail": tail}))
        )
        assert len(topk) == len(online) == 3
        for a, b in zip(topk, online):
            for key in ("loss", "ce", "kd", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-4), (tail, key)
    rkl = {
        **common,
        "loss.alpha_feature": "null",
        "loss.terms": "[{kind: ce, weight: 0.5}, {kind: reverse_kl, weight: 0.5}]",
    }
    runs = [
        steps_of(train_student.main(make_cfg(cache, tmp_path / f"rkl-{t}", **rkl, **{"loss.target": t})))
        for t in ("topk", "online")
    ]
    for a, b in zip(*runs):
        for key in ("loss", "reverse_kl", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), ("reverse_kl", key)


def test_sampled_target_needs_sampled_cache(tiny_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    m = json.loads((cache / MANIFEST).read_text())
    m["sample_n"] = 0
    (cache / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(KDError, match="holds no sampled targets; re-cache with cache.sample_n"):
        train_student.main(make_cfg(cache, tmp_path, **{"loss.target": "sampled"}))


# ---- the loss as a list of terms (issue 12) ----

TERMS_EQUAL_TO_ALPHAS = (
    "[{kind: ce, weight: 0.5}, {kind: forward_kl, weight: 0.5, name: kd}, "
    "{kind: feature, weight: 0.1, distance: cosine}]"
)


def test_a_term_list_equal_to_the_alphas_trains_identically(tiny_cache, tmp_path):
    legacy = train_student.main(make_cfg(tiny_cache, tmp_path / "a", **{"train.max_steps": 3}))
    listed = train_student.main(
        make_cfg(
            tiny_cache,
            tmp_path / "b",
            **{"train.max_steps": 3, "loss.alpha_feature": "null", "loss.terms": TERMS_EQUAL_TO_ALPHAS},
        )
    )
    a, b = read_metrics(legacy), read_metrics(listed)
    assert len(a) == len(b) and any("w_feature" in r for r in a)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in set(ra) - {"tokens_per_s", "peak_mem_mb", "elapsed_s", "step_cpu_s", "event"}:
            assert rb[key] == pytest.approx(ra[key], rel=1e-6), key


def test_new_divergence_terms_train_and_are_logged(tiny_cache, tmp_path):
    run = train_student.main(
        make_cfg(
            tiny_cache,
            tmp_path,
            **{
                "train.max_steps": 6,
                "loss.alpha_feature": "null",
                "loss.temperature": 2.0,
                "loss.target": "topk",
                "loss.terms": "[{kind: ce, weight: 0.5}, {kind: reverse_kl, weight: 0.2}, {kind: jsd, beta: 0.3, weight: 0.2}, "
                "{kind: skew_kl, weight: 0.1, name: skl}, {kind: tvd, weight: 0}]",
            },
        )
    )
    steps, evals = steps_of(run), evals_of(run)
    for r in steps:
        for name in ("ce", "reverse_kl", "jsd", "skl"):
            assert math.isfinite(r[name]) and r[name] >= 0 and f"w_{name}" in r
        assert "tvd" not in r  # weight 0: not computed in training (it would cost what a trained term costs)
        assert r["loss"] == pytest.approx(r["w_ce"] + r["w_reverse_kl"] + r["w_jsd"] + r["w_skl"], rel=1e-9)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert "eval/kd" in evals[-1] and evals[-1]["eval/ce"] < evals[0]["eval/ce"]


def test_loss_config_refuses_mixed_or_impossible_term_lists(tiny_cache, tmp_path):
    def cfg(**extra):
        return make_cfg(tiny_cache, tmp_path, **{"loss.alpha_feature": "null", **extra})

    with pytest.raises(KDError, match=r"loss.terms replaces loss.alpha_\*: remove loss.alpha_kd"):
        cfg(**{"loss.alpha_kd": 0.5, "loss.terms": "[{kind: ce}]"})
    with pytest.raises(KDError, match="reverse_kl is not linear in the teacher distribution"):
        cfg(**{"loss.target": "sampled", "loss.terms": "[{kind: ce}, {kind: reverse_kl}]"})
    with pytest.raises(KDError, match="the uld term compares across tokenizers"):
        cfg(**{"loss.terms": "[{kind: ce}, {kind: uld}]"})
    with pytest.raises(KDError, match="need loss.feature_layers"):
        cfg(**{"loss.feature_layers": "[]", "loss.terms": "[{kind: ce}, {kind: feature}]"})
    with pytest.raises(KDError, match=r"loss.terms\[1\]: unknown loss kind 'kl'"):
        cfg(**{"loss.terms": "[{kind: ce}, {kind: kl}]"})
    assert [
        t.kind for t in cfg(**{"loss.target": "sampled", "loss.terms": "[{kind: forward_kl}]"}).loss.loss_terms()
    ] == ["forward_kl"]


@pytest.mark.parametrize(
    "short",
    [
        STUDENT.replace("max_position_embeddings: 128", "max_position_embeddings: 16"),  # Llama trained silently
        "{model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 4, n_positions: 16}",  # GPT-2: an IndexError
    ],
    ids=["llama", "gpt2"],
)
def test_a_student_context_shorter_than_the_windows_is_refused(tiny_cache, tmp_path, short):
    with pytest.raises(
        KDError,
        match=r"the student's context \(16 positions\) is shorter than the training windows "
        r"\(32 tokens\)",
    ):
        train_student.main(make_cfg(tiny_cache, tmp_path, **{"student.config": short}))
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_resuming_a_finished_run_adds_no_records(tiny_cache, tmp_path):
    cfg = make_cfg(tiny_cache, tmp_path, **{"train.max_steps": 4, "loss.alpha_feature": 0})
    run = train_student.main(cfg)
    before = (run / "metrics.jsonl").read_text()
    cfg.train.resume = True
    assert train_student.main(cfg) == run
    assert (run / "metrics.jsonl").read_text() == before
    assert json.loads((run / "final" / "kd_meta.json").read_text())["final_eval"]["eval/ce"] == pytest.approx(
        [r for r in read_metrics(run) if "eval/ce" in r][-1]["eval/ce"], rel=1e-6
    )


@pytest.mark.parametrize(
    "checkpoint_every,save_final_state,kept", [(0, None, False), (2, None, True), (0, True, True), (2, False, False)]
)
def test_the_final_training_state_is_kept_only_when_asked(
    tiny_cache, tmp_path, checkpoint_every, save_final_state, kept
):
    """A sweep's runs keep only their weights (final/); a run that checkpoints keeps its last state. Without the
    state, a resume of the finished run does nothing (and says so) instead of training again from step 0."""
    extra = {"train.max_steps": 4, "train.checkpoint_every": checkpoint_every, "loss.alpha_feature": 0}
    if save_final_state is not None:
        extra["train.save_final_state"] = save_final_state
    cfg = make_cfg(tiny_cache, tmp_path, **extra)
    run = train_student.main(cfg)
    assert (run / "final" / "model.safetensors").exists()
    assert (run / "checkpoints").exists() == kept
    if kept:
        assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 4
    before = (run / "metrics.jsonl").read_text()
    cfg.train.resume = True
    assert train_student.main(cfg) == run and (run / "metrics.jsonl").read_text() == before


def test_an_invalid_student_config_is_one_clear_error(tiny_cache, tmp_path):
    bad = STUDENT.replace("hidden_size: 32", "hidden_size: -64")
    with pytest.raises(KDError, match=r"student.config cannot build a model \(.*negative dimension -64.*\); fix"):
        train_student.main(make_cfg(tiny_cache, tmp_path, **{"student.config": bad}))


def test_tensorboard_receives_every_logged_metric(tiny_cache, tmp_path):
    """train.log_with=[tensorboard]: the event files written are read back and hold the values metrics.jsonl holds,
    at the same steps, and the config as hyperparameters; an unknown tracker is refused before any work."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train_student.main(
        make_cfg(
            tiny_cache, tmp_path, **{"train.max_steps": 4, "train.log_with": "[tensorboard]", "loss.alpha_feature": 0}
        )
    )
    events = sorted({p.parent for p in (run / "trackers").rglob("events.out.tfevents.*")})
    assert events, list((run / "trackers").rglob("*"))
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    records = read_metrics(run)
    for key in ("loss", "lr", "grad_norm", "eval/ce", "eval/bits_per_char"):
        logged = {r["step"]: r[key] for r in records if key in r}
        got = {e.step: e.value for e in acc.Scalars(key)}
        assert got.keys() == logged.keys(), key
        for step, value in logged.items():
            assert got[step] == pytest.approx(value, rel=1e-6), (key, step)
    import yaml

    hparams = yaml.safe_load(next((run / "trackers").rglob("hparams.yml")).read_text())
    assert hparams["train.max_steps"] == 4 and hparams["train.cache_dir"] == str(tiny_cache)
    with pytest.raises(KDError, match=r"unknown tracker\(s\) train.log_with=\['tensorbored'\]"):
        make_cfg(tiny_cache, tmp_path / "b", **{"train.log_with": "[tensorbored]"})


# every schedule of the registry at known points after warmup (progress 1/4, 1/2, 1): a new schedule fails
# test_every_schedule_has_known_values until its values are listed here
LR, MIN_LR = 1e-3, 1e-4
SCHEDULE_VALUES = {
    "cosine": {0.25: MIN_LR + (LR - MIN_LR) * (2 + 2**0.5) / 4, 0.5: (LR + MIN_LR) / 2, 1.0: MIN_LR},
    "linear": {0.25: LR - (LR - MIN_LR) / 4, 0.5: (LR + MIN_LR) / 2, 1.0: MIN_LR},
    "constant": {0.25: LR, 0.5: LR, 1.0: LR},
}


def test_every_schedule_has_known_values():
    from kd.schedule import SCHEDULES

    assert set(SCHEDULES) == set(SCHEDULE_VALUES)


@pytest.mark.parametrize("schedule", sorted(SCHEDULE_VALUES))
def test_each_schedule_at_known_points(schedule):
    """Warmup 4 of 12 steps: linear from lr/4 to lr, then the decay at progress (step - 4) / 8."""
    at = lambda step: lr_at(step, schedule=schedule, lr=LR, min_lr=MIN_LR, warmup_steps=4, total_steps=12)
    assert [at(s) for s in range(1, 5)] == pytest.approx([LR / 4, LR / 2, 3 * LR / 4, LR])
    for progress, value in SCHEDULE_VALUES[schedule].items():
        assert at(4 + int(progress * 8)) == pytest.approx(value, rel=1e-12), progress


def test_a_resumed_run_can_be_made_longer(tiny_cache, tmp_path):
    """train.max_steps raised on resume: the run goes on from its last state to the new end, the warmup its own,
    the LR from the longer curve from there (the jump recorded in metrics.jsonl and config.json); its logged steps
    before the extension are the 6-step run's, after it every LR is the 10-step curve's. Shorter is refused."""
    short = {"train.max_steps": 6, "train.checkpoint_every": 3, "train.eval_every": 3, "train.warmup_steps": 2}
    first = train_student.main(make_cfg(tiny_cache, tmp_path, **short))
    done = steps_of(first)
    longer = {**short, "train.max_steps": 10, "train.resume": "true"}
    run = train_student.main(make_cfg(tiny_cache, tmp_path, **longer))
    steps = steps_of(run)
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert steps[:6] == done
    for r in steps[6:]:
        expected = lr_at(r["step"], schedule="cosine", lr=3e-3, min_lr=3e-4, warmup_steps=2, total_steps=10)
        assert r["lr"] == pytest.approx(expected)
    (event,) = [r for r in read_metrics(run) if r.get("event") == "schedule_extended"]
    assert event["step"] == 6 and event["total_steps_before"] == 6 and event["total_steps"] == 10
    assert event["lr_after"] == pytest.approx(steps[6]["lr"]) and event["lr_after"] > event["lr_before"]
    record = json.loads((run / "config.json").read_text())
    assert record["total_steps"] == 10 and record["extensions"] == [{k: event[k] for k in record["extensions"][0]}]
    # the run's paths as the files they name (a resume compares these: test_bad_inputs.py)
    assert record["paths"]["train.cache_dir"] == record["cache"]["dir"] == str(Path(tiny_cache).resolve())
    assert json.loads((run / "final" / "kd_meta.json").read_text())["step"] == 10
    with pytest.raises(KDError, match="was started for 10 optimizer steps and this config asks for 8: a resumed run"):
        train_student.main(make_cfg(tiny_cache, tmp_path, **{**longer, "train.max_steps": 8}))
