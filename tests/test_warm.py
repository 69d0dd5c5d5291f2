"""tests/warm.py: a process started warm is what a fresh `python ...` would be, seen from inside and from outside."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
import warm

PROBE = """
import json, os, resource, signal, sys
print(json.dumps({
    "argv": sys.argv,
    "path0": sys.path[0],
    "cwd": os.getcwd(),
    "name": __name__,
    "env": os.environ.get("KD_PROBE"),
    "fsize": resource.getrlimit(resource.RLIMIT_FSIZE)[0],
    "sigint_raises": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
    "sigterm": int(signal.getsignal(signal.SIGTERM)),
    "stdin": sys.stdin.read(),
}))
print("to stderr", file=sys.stderr)
sys.exit(int(os.environ.get("KD_PROBE_EXIT", "0")))
"""


def both(monkeypatch, args, **options) -> tuple:
    """The same command started warm and fresh (KD_TEST_COLD=1)."""
    monkeypatch.delenv("KD_TEST_COLD", raising=False)
    warm_run = warm.run(args, capture_output=True, text=True, **options)
    monkeypatch.setenv("KD_TEST_COLD", "1")
    cold_run = warm.run(args, capture_output=True, text=True, **options)
    monkeypatch.delenv("KD_TEST_COLD")
    return warm_run, cold_run


@pytest.mark.parametrize("form", ["script", "module", "code"])
def test_a_warm_process_sees_what_a_fresh_one_sees(tmp_path, monkeypatch, form):
    (tmp_path / "probe_mod.py").write_text(PROBE)
    env = dict(os.environ, KD_PROBE="é 1", KD_PROBE_EXIT="7")
    args = {
        "script": [sys.executable, str(tmp_path / "probe_mod.py"), "a b", "--x"],
        "module": [sys.executable, "-m", "probe_mod", "a b", "--x"],
        "code": [sys.executable, "-c", PROBE, "a b", "--x"],
    }[form]
    hot, cold = both(monkeypatch, args, env=env, cwd=tmp_path, rlimits={"RLIMIT_FSIZE": 1 << 30})
    assert (hot.returncode, hot.stderr) == (cold.returncode, cold.stderr) == (7, "to stderr\n")
    seen_hot, seen_cold = json.loads(hot.stdout), json.loads(cold.stdout)
    assert seen_hot == seen_cold, (seen_hot, seen_cold)
    assert seen_hot["env"] == "é 1" and seen_hot["fsize"] == 1 << 30 and seen_hot["name"] == "__main__"
    assert seen_hot["sigint_raises"] and seen_hot["sigterm"] == signal.SIG_DFL and seen_hot["stdin"] == ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_signal_ends_a_warm_process_as_it_ends_a_fresh_one(tmp_path, monkeypatch, sig):
    """Unhandled: KeyboardInterrupt (a traceback, then death by SIGINT), SIGTERM and SIGKILL kill."""
    script = tmp_path / "wait.py"
    script.write_text("import pathlib, sys, time\npathlib.Path(sys.argv[1]).touch()\ntime.sleep(60)\n")
    codes = []
    for cold in (False, True):
        if cold:
            monkeypatch.setenv("KD_TEST_COLD", "1")
        else:
            monkeypatch.delenv("KD_TEST_COLD", raising=False)
        started = tmp_path / f"started-{cold}"
        proc = warm.Popen([sys.executable, str(script), started], stderr=warm.PIPE, text=True)
        deadline = time.time() + 120  # generous: a machine loaded by other jobs starts processes slowly
        while not started.exists() and time.time() < deadline:
            time.sleep(0.01)
        assert started.exists(), f"the {'fresh' if cold else 'warm'} process did not start within 120 s"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        codes.append((proc.returncode, "KeyboardInterrupt" in err))
    assert codes[0] == codes[1] == (-sig, sig == signal.SIGINT), codes


def test_a_launch_gives_each_process_its_rank_and_fails_as_torchrun_does(tmp_path):
    """Every process gets torchrun's worker environment; one failing takes the others down, exit 1."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, sys, time\n"
        "print(os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['LOCAL_RANK'], os.environ['MASTER_PORT'])\n"
        "if os.environ.get('FAIL') and os.environ['RANK'] == '1': sys.exit(5)\n"
        "if os.environ.get('FAIL'): time.sleep(60)\n"
    )
    ok = warm.launch([script], 3, 12345, dict(os.environ))
    assert ok.returncode == 0 and ok.stdout.splitlines() == [f"{r} 3 {r} 12345" for r in range(3)]
    start = time.time()
    failed = warm.launch([script], 2, 12345, dict(os.environ, FAIL="1"))
    assert failed.returncode == 1 and time.time() - start < 30  # the sleeping rank 0 was terminated


def test_an_environment_read_at_import_time_starts_a_fresh_interpreter(monkeypatch):
    monkeypatch.delenv("KD_TEST_COLD", raising=False)  # (a cold session starts every process fresh)
    base = dict(os.environ)
    assert not warm._cold(dict(base, KD_ANYTHING="1", OMP_NUM_THREADS="1", RANK="0", TORCHELASTIC_RUN_ID="x"))
    assert warm._cold(dict(base, HF_HUB_CACHE="/elsewhere")) and warm._cold(dict(base, PYTHONHASHSEED="3"))
