"""kd beside TRL's GKDTrainer on the same work: CPU time, wall time and peak memory of one training run per arm,
and the per-step KD loss of kd's online mode against TRL's (the same computation, so they should agree).

    pip install trl==1.16.0          # or pip install -e '.[bench]': TRL is never in kd's default install or tests
    python bench/bench_peers.py [--cache caches/shakespeare_smollm2] [--steps 20] [--arms ...]

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

Measured per arm: CPU seconds (user + system) and wall seconds of the whole process (start-up, model loading and
kd's one eval of 16 held-out windows included; TRL runs no eval), peak RSS (VmHWM), and the last step's loss.
What could not be matched: TRL's GKD has no CE term and no cached teacher, so the cached and CE-only arms have no
TRL counterpart; TRL evaluates nothing here, kd evaluates once at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB, LR = 4, 1e-4
ARMS = ("kd cached topk", "kd cached sampled", "kd online", "kd CE only", "TRL GKD")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def student_init(cache_dir: str, out: Path) -> Path:
    """The demo's student (configs/train_shakespeare.yaml), random init with seed 0, saved with the teacher's
    tokenizer: every arm starts from these weights."""
    import torch
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    from kd.cache import TeacherCache
    from kd.models import load_tokenizer

    cache = TeacherCache(cache_dir)
    spec = dict(yaml.safe_load((ROOT / "configs" / "train_shakespeare.yaml").read_text())["student"]["config"])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec, vocab_size=cache.info.teacher.vocab_size)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    load_tokenizer(cache.info.teacher.name_or_path).save_pretrained(out)
    return out


def kd_arm(arm: str, cache_dir: str, student: str, steps: int, out: str) -> dict:
    from kd import train_student
    from kd.config import load_config
    from kd.train import read_metrics
    from kd.train_config import TrainConfig

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
        "train.seed=0",
        "train.eval_generations=0",
    ]
    run = train_student.main(load_config(TrainConfig, ROOT / "configs" / "train_shakespeare.yaml", args))
    steps_logged = [r for r in read_metrics(run) if "loss" in r]
    return {"losses": [r["kd"] if "kd" in r else r["ce"] for r in steps_logged]}


def trl_arm(cache_dir: str, student: str, steps: int, out: str) -> dict:
    import datasets
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kd.cache import TeacherCache
    from kd.models import load_causal_lm
    from kd.train import epoch_order

    cache = TeacherCache(cache_dir)
    split = cache.split("train", ("input_ids",))
    order = epoch_order(len(split), 0, 0, 0, 1, MB)[: steps * MB]  # kd's order for seed 0, epoch 0
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
        seed=0,
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
    trainer.train()
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def child(arm: str, cache_dir: str, student: str, steps: int) -> dict:
    t0, c0 = time.time(), cpu_seconds()
    with tempfile.TemporaryDirectory() as out:
        result = (
            trl_arm(cache_dir, student, steps, out) if arm == "TRL GKD" else kd_arm(arm, cache_dir, student, steps, out)
        )
    from kd.train.state import resident_mb

    return dict(result, cpu_s=cpu_seconds() - c0, wall_s=time.time() - t0, peak_mb=resident_mb(peak=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="caches/shakespeare_smollm2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--child")
    ap.add_argument("--student")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.cache, args.student, args.steps)), flush=True)
        return
    if "TRL GKD" in args.arms:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("TRL is not installed: pip install trl==1.16.0 (or pip install -e '.[bench]')") from None
    work = Path(tempfile.mkdtemp(prefix="kd-bench-peers-"))
    student = student_init(args.cache, work / "student")
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", HF_HUB_OFFLINE="1")
    results = {}
    for arm in args.arms:
        cmd = [sys.executable, __file__, "--child", arm, "--cache", args.cache, "--student", str(student)]
        r = subprocess.run([*cmd, "--steps", str(args.steps)], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise SystemExit(f"{arm} failed:\n{r.stderr[-3000:]}")
        results[arm] = json.loads(r.stdout.split("RESULT ", 1)[1])
        res = results[arm]
        print(
            f"{arm:<20} CPU {res['cpu_s']:7.1f} s  wall {res['wall_s']:7.1f} s  peak {res['peak_mb']:7,.0f} MB  "
            f"last loss {res['losses'][-1]:.4f}",
            flush=True,
        )
    base = "kd cached topk"
    if "TRL GKD" in results and base in results:
        trl, kd = results["TRL GKD"], results[base]
        print(
            f"TRL GKD / kd cached topk: CPU {trl['cpu_s'] / kd['cpu_s']:.2f}x, wall {trl['wall_s'] / kd['wall_s']:.2f}x, "
            f"peak memory {trl['peak_mb'] / kd['peak_mb']:.2f}x"
        )
    if "TRL GKD" in results and "kd online" in results:
        a, b = results["kd online"]["losses"], results["TRL GKD"]["losses"]
        worst = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
        print(
            f"per-step KD loss, kd online vs TRL GKD over {min(len(a), len(b))} steps: largest relative difference "
            f"{worst:.2e} (first {a[0]:.4f} vs {b[0]:.4f}, last {a[-1]:.4f} vs {b[-1]:.4f})"
        )
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
