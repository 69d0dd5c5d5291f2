"""kd beside TRL's GKDTrainer on the same work: CPU time, wall time and peak memory of one training run per arm,
and the per-step KD loss of kd's online mode against TRL's (the same computation, so they should agree).

    pip install trl==1.16.0          # or pip install -e '.[bench]': TRL is never in kd's default install or tests
    python bench/bench_peers.py [--cache caches/shakespeare_smollm2] [--steps 20] [--seeds 0 1 2] [--arms ...]

The same work in every arm: the cache's teacher (SmolLM2-135M-Instruct for the demo cache), the same student init
(the demo's 6-layer random-init Llama, built once with seed 0 and saved, loaded by every arm), the same windows in
the same order (kd's epoch order for seed 0, handed to TRL as a dataset read sequentially), AdamW at a constant
LR of 1e-4 (betas 0.9/0.999, eps 1e-8, no weight decay, gradient clipping at 1.0), fp32, micro-batch 4 x 256
tokens, no accumulation, `--steps` optimizer steps, and the KD-only objective: TRL's GKD with lmbda 0 (no
student-generated data) and beta 0 (forward KL) at temperature 1 against the live teacher on fixed windows, kd
with loss.alpha_ce=0, loss.alpha_kd=1, loss.temperature=1. Arms, each in a process of its own:

    kd cached topk     the top-256 of the cache (tail bucket)
    kd cached sampled  the cache's sampled targets
    kd online          the teacher in the training process, full vocabulary (TRL's computation)
    kd CE only         loss.alpha_ce=1, loss.alpha_kd=0: what CE alone costs in kd
    TRL GKD            trl.experimental.gkd.GKDTrainer

Measured per arm and seed (the seed draws the student's init and the windows' order, the same for every arm):
CPU seconds per optimizer step (user + system of the process between the end of step 1 and the end of the last
step, divided by the steps between: start-up, loading, the first step's warm-up and kd's final eval excluded),
CPU and wall seconds of the whole process, peak RSS (VmHWM), the last step's loss, and the held-out CE of the final
student (nats per target token on the cache's first 32 eval windows, computed by one function for every arm, after
the run and outside its timings). Printed: each arm's mean and standard error over the seeds, and TRL's ratios to
kd cached top-k computed per seed (the arms of a seed run back to back). With --cache-cost: the CPU seconds of the
caching pass that made the cache (run again from its recorded config), and after how many training runs of the
demo's length (its epochs over the cache) the per-step savings against each live-teacher arm have paid for it.
What could not be matched: TRL's GKD has no CE term and no cached teacher, so the cached and CE-only arms have no
TRL counterpart; TRL evaluates nothing during training, kd evaluates once at the end (outside the per-step figure).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB, LR = 4, 1e-4
ARMS = ("kd cached topk", "kd cached sampled", "kd online", "kd CE only", "TRL GKD")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


STEP_ENDS: list[float] = []  # the process's CPU seconds at the end of each optimizer step


def per_step_cpu() -> float:
    """CPU seconds per optimizer step, from the end of step 1 to the end of the last one."""
    if len(STEP_ENDS) < 2:
        raise SystemExit("fewer than 2 optimizer steps were timed: use --steps 2 or more")
    return (STEP_ENDS[-1] - STEP_ENDS[0]) / (len(STEP_ENDS) - 1)


def heldout_ce(model, cache_dir: str, windows: int = 32) -> float:
    """Nats per target token of `model` on the cache's first `windows` eval windows (plain next-token CE, fp32,
    padding excluded): the same measure for every arm's final student."""
    import torch
    import torch.nn.functional as F

    from kd.cache import TeacherCache

    split = TeacherCache(cache_dir).split("eval", ("input_ids",))
    nats, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(min(windows, len(split))):
            item = split[i]
            n = int(item["length"])
            ids = item["input_ids"][:n].unsqueeze(0)
            logits = model(input_ids=ids).logits.float()
            nats += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            tokens += n - 1
    return nats / tokens


def student_init(cache_dir: str, out: Path, seed: int) -> Path:
    """The demo's student (configs/train_shakespeare.yaml), random init with `seed`, saved with the teacher's
    tokenizer: every arm of that seed starts from these weights."""
    import torch
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    from kd.cache import TeacherCache
    from kd.models import load_tokenizer

    cache = TeacherCache(cache_dir)
    spec = dict(yaml.safe_load((ROOT / "configs" / "train_shakespeare.yaml").read_text())["student"]["config"])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec, vocab_size=cache.info.teacher.vocab_size)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    load_tokenizer(cache.info.teacher.name_or_path).save_pretrained(out)
    return out


def kd_arm(arm: str, cache_dir: str, student: str, steps: int, out: str, seed: int) -> dict:
    from transformers import AutoModelForCausalLM

    import kd.train.recipe
    from kd import train_student
    from kd.config import load_config
    from kd.train import read_metrics
    from kd.train_config import TrainConfig

    real_step = kd.train.recipe.optimizer_step

    def timed_step(*args, **kwargs):  # the recipe's optimizer step (kd/train/step.py), its end timed
        result = real_step(*args, **kwargs)
        STEP_ENDS.append(cpu_seconds())
        return result

    kd.train.recipe.optimizer_step = timed_step

    loss = {
        "kd cached topk": ["loss.alpha_ce=0", "loss.alpha_kd=1", "loss.target=topk"],
        "kd cached sampled": ["loss.alpha_ce=0", "loss.alpha_kd=1", "loss.target=sampled"],
        "kd online": ["loss.alpha_ce=0", "loss.alpha_kd=1", "loss.target=online"],
        "kd CE only": ["loss.alpha_ce=1", "loss.alpha_kd=0", "loss.target=topk"],
    }[arm]
    args = loss + [
        "student.config=null",
        f"student.pretrained={student}",
        "loss.alpha_feature=0",
        "loss.feature_layers=[]",  # caches without hidden states too
        "loss.temperature=1.0",
        f"train.cache_dir={cache_dir}",
        f"train.output_dir={out}",
        "train.run_name=run",
        "train.epochs=0",
        f"train.max_steps={steps}",
        f"train.micro_batch_size={MB}",
        "train.gradient_accumulation_steps=1",
        f"train.lr={LR}",
        f"train.min_lr={LR}",
        "train.schedule=constant",
        "train.warmup_steps=0",
        "train.warmup_fraction=0",
        "train.weight_decay=0",
        "train.betas=[0.9, 0.999]",
        "train.max_grad_norm=1.0",
        f"train.eval_every={steps}",
        "train.eval_max_sequences=16",
        "train.checkpoint_every=0",
        "train.num_workers=0",
        "train.shuffle=exact",
        f"train.seed={seed}",
        "train.eval_generations=0",
    ]
    run = train_student.main(load_config(TrainConfig, ROOT / "configs" / "train_shakespeare.yaml", args))
    steps_logged = [r for r in read_metrics(run) if "loss" in r]
    return {
        "losses": [r["kd"] if "kd" in r else r["ce"] for r in steps_logged],
        "model": AutoModelForCausalLM.from_pretrained(run / "final"),
    }


def trl_arm(cache_dir: str, student: str, steps: int, out: str, seed: int) -> dict:
    import datasets
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kd.cache import TeacherCache
    from kd.models import load_causal_lm
    from kd.train import epoch_order

    cache = TeacherCache(cache_dir)
    split = cache.split("train", ("input_ids",))
    order = epoch_order(len(split), 0, seed, 0, 1, MB)[: steps * MB]  # kd's order for this seed, epoch 0
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for i in order:
        item = split[int(i)]
        ids, n = item["input_ids"].tolist(), int(item["length"])
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * n + [0] * (len(ids) - n))
        rows["labels"].append(ids[:n] + [-100] * (len(ids) - n))
    dataset = datasets.Dataset.from_dict(rows)

    def collate(features):
        return {k: torch.tensor([f[k] for f in features]) for k in ("input_ids", "attention_mask", "labels")}

    t = cache.info.teacher
    teacher = load_causal_lm(t.name_or_path, t.revision, "fp32", "sdpa").eval()
    args = GKDConfig(
        output_dir=out,
        per_device_train_batch_size=MB,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        lmbda=0.0,
        beta=0.0,
        temperature=1.0,
        seed=seed,
        use_cpu=True,
        bf16=False,  # transformers 5 turns bf16 autocast on by default where the CPU supports it: fp32, as kd here
        fp16=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        disable_tqdm=True,
    )
    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
        teacher_model=teacher,
        args=args,
        data_collator=collate,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(student),
    )
    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(dataset)  # kd's order, as given

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            STEP_ENDS.append(cpu_seconds())

    trainer.add_callback(StepClock())
    trainer.train()
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "model": trainer.model}


def child(arm: str, cache_dir: str, student: str, steps: int, seed: int) -> dict:
    t0, c0 = time.time(), cpu_seconds()
    with tempfile.TemporaryDirectory() as out:
        run = trl_arm if arm == "TRL GKD" else partial(kd_arm, arm)
        result = run(cache_dir, student, steps, out, seed)
        cpu_s, wall_s = cpu_seconds() - c0, time.time() - t0
        from kd.train.state import resident_mb

        peak = resident_mb(peak=True)
        ce = heldout_ce(result.pop("model"), cache_dir)
    return dict(result, cpu_s=cpu_s, wall_s=wall_s, peak_mb=peak, step_cpu_s=per_step_cpu(), heldout_ce=ce)


def caching_cpu(cache_dir: str) -> float:
    """CPU seconds (user + system) of the caching pass that made `cache_dir`, run again from its recorded config
    into a scratch directory (cache_teacher.py, a process of its own)."""
    import yaml

    config = json.loads((Path(cache_dir) / "manifest.json").read_text())["config"]
    with tempfile.TemporaryDirectory() as scratch:
        cfg_file = Path(scratch) / "cache.yaml"
        cfg_file.write_text(yaml.safe_dump(config))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        cmd = [sys.executable, str(ROOT / "cache_teacher.py"), "--config", str(cfg_file)]
        r = subprocess.run([*cmd, f"cache.output_dir={scratch}/cache"], capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if r.returncode != 0:
            raise SystemExit(f"the caching pass failed:\n{r.stderr[-3000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def demo_run_tokens(cache_dir: str) -> int:
    """Training tokens of a run of the demo's length (configs/train_shakespeare.yaml: its epochs over the cache)."""
    import yaml

    from kd.cache import TeacherCache

    epochs = yaml.safe_load((ROOT / "configs" / "train_shakespeare.yaml").read_text())["train"]["epochs"]
    info = TeacherCache(cache_dir).info
    return epochs * info.splits["train"].num_sequences * info.seq_len


def mean_se(values: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); the error is nan for one value (unknown, not zero). The benchmarks over
    seeds share it (bench_budget.py, bench_sampled_gap.py)."""
    import statistics

    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else math.nan)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="caches/shakespeare_smollm2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache-cost", action="store_true", help="also run the caching pass once, for the payback")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--child")
    ap.add_argument("--student")
    args = ap.parse_args()
    if args.child:
        print(
            "RESULT " + json.dumps(child(args.child, args.cache, args.student, args.steps, args.seeds[0])), flush=True
        )
        return
    if "TRL GKD" in args.arms:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("TRL is not installed: pip install trl==1.16.0 (or pip install -e '.[bench]')") from None
    work = Path(tempfile.mkdtemp(prefix="kd-bench-peers-"))
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", HF_HUB_OFFLINE="1")
    results: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    for seed in args.seeds:
        student = student_init(args.cache, work / f"student-{seed}", seed)
        for arm in args.arms:
            cmd = [sys.executable, __file__, "--child", arm, "--cache", args.cache, "--student", str(student)]
            cmd += ["--steps", str(args.steps), "--seeds", str(seed)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                raise SystemExit(f"{arm} (seed {seed}) failed:\n{r.stderr[-3000:]}")
            res = json.loads(r.stdout.split("RESULT ", 1)[1])
            results[arm].append(res)
            print(
                f"seed {seed} {arm:<18} CPU/step {res['step_cpu_s']:6.2f} s  run CPU {res['cpu_s']:7.1f} s  "
                f"wall {res['wall_s']:7.1f} s  peak {res['peak_mb']:7,.0f} MB  last loss {res['losses'][-1]:.4f}  "
                f"held-out CE {res['heldout_ce']:.4f}",
                flush=True,
            )
    print(f"\nover {len(args.seeds)} seed(s), {args.steps} steps of {MB} x 256 tokens (mean +- standard error):")
    for arm, runs in results.items():
        cells = [mean_se([r[key] for r in runs]) for key in ("step_cpu_s", "cpu_s", "peak_mb", "heldout_ce")]
        print(
            f"{arm:<18} CPU/step {cells[0][0]:.2f} +- {cells[0][1]:.2f} s  run CPU {cells[1][0]:.1f} +- "
            f"{cells[1][1]:.1f} s  peak {cells[2][0]:,.0f} MB  held-out CE {cells[3][0]:.4f} +- {cells[3][1]:.4f}"
        )
    base = "kd cached topk"
    if "TRL GKD" in results and base in results:
        pairs = list(zip(results["TRL GKD"], results[base]))
        ratio = {k: mean_se([t[k] / b[k] for t, b in pairs]) for k in ("step_cpu_s", "cpu_s", "peak_mb")}
        diff = mean_se([t["heldout_ce"] - b["heldout_ce"] for t, b in pairs])
        print(
            f"TRL GKD / kd cached topk, per seed: CPU per step {ratio['step_cpu_s'][0]:.2f}x +- "
            f"{ratio['step_cpu_s'][1]:.2f}, run CPU {ratio['cpu_s'][0]:.2f}x, peak memory {ratio['peak_mb'][0]:.2f}x; "
            f"held-out CE TRL - kd {diff[0]:+.4f} +- {diff[1]:.4f}"
        )
    if "TRL GKD" in results and "kd online" in results:
        worst = 0.0
        for a_run, b_run in zip(results["kd online"], results["TRL GKD"]):
            a, b = a_run["losses"], b_run["losses"]
            worst = max([worst] + [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)])
        print(
            f"per-step KD loss, kd online vs TRL GKD, every step of every seed: largest relative difference {worst:.2e}"
        )
    if args.cache_cost and base in results:
        cost, tokens = caching_cpu(args.cache), demo_run_tokens(args.cache)
        per_token = mean_se([r["step_cpu_s"] for r in results[base]])[0] / (MB * 256)
        print(f"caching pass: {cost:.0f} CPU s; a run of the demo's length trains {tokens:,} tokens")
        for live in ("kd online", "TRL GKD"):
            if live in results:
                saved = mean_se([r["step_cpu_s"] for r in results[live]])[0] / (MB * 256) - per_token
                print(
                    f"  vs {live}: the cache saves {saved * tokens:.0f} CPU s per such run, so it has paid for itself "
                    f"after {cost / (saved * tokens):.2f} runs"
                )
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
