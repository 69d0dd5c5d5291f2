"""Faults injected into real runs (issue 11's table): full disks (a small tmpfs, filled to several levels) and
file-size limits (RLIMIT_FSIZE) while caching and while checkpointing, SIGKILL of training at each point. Each test
asserts the exit code, the one `error:` line (no traceback, no segfault), that no partial file or folder is left,
that every complete shard or checkpoint is intact, and that the run completes once the cause is removed.

The full-disk tests mount a tmpfs, which needs root (CAP_SYS_ADMIN); elsewhere they are skipped, saying so, and
the file-size-limit tests (no privilege needed) cover the same code paths."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import warm
from conftest import ROOT, cache_overrides, killing_runner
from test_cache import read_all
from test_train import assert_same_metrics, overrides

from kd import cache_teacher, train_student
from kd.cache import MANIFEST, sha256_file, verify
from kd.cache_config import CacheConfig
from kd.config import load_config
from kd.train_config import TrainConfig


def run(script: str, args: list[str], fsize: int | None = None) -> subprocess.CompletedProcess:
    """Run a script of the repo in a fresh process, optionally under a file-size limit of `fsize` bytes (SIGXFSZ
    ignored, so a write past the limit fails with EFBIG, as it does for a process that handles the signal)."""

    limits = {} if fsize is None else {"rlimits": {"RLIMIT_FSIZE": fsize}, "ignore_signals": ["SIGXFSZ"]}
    return warm.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT, **limits)


def assert_one_clean_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for bad in ("Traceback", "Exception ignored", "Segmentation fault"):
        assert bad not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def no_partial_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial") or "probe" in p.name]


def assert_complete_shards_intact(out: Path) -> None:
    """Every shard with its final name is whole: its sidecar's sha256 and size match."""
    for shard in out.glob("*.h5"):
        info = json.loads(shard.with_suffix(".json").read_text())
        assert sha256_file(shard) == info["sha256"] and shard.stat().st_size == info["bytes"], shard.name


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a directory on a fresh tmpfs of that many bytes; unmounted afterwards."""
    mounts = []

    def mount(size: int) -> Path:
        d = tmp_path / f"disk-{len(mounts)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
        mounts.append(d)
        return d

    yield mount
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill a disk until `leave` bytes are free; returns the filler file (delete it to free the space)."""
    filler = disk / f"filler-{uuid.uuid4().hex[:6]}"
    free = shutil.disk_usage(disk).free
    filler.write_bytes(b"\0" * max(0, free - leave))
    return filler


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# ---- caching ----

CACHE_EXTRA = {"data.unit_bytes": 4000, "cache.sequences_per_shard": 32, "data.max_eval_sequences": 16}


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, corpus_dir, llama_teacher) -> Path:
    out = tmp_path_factory.mktemp("faults") / "ref"
    return cache_teacher.main(
        load_config(CacheConfig, None, cache_overrides(llama_teacher, corpus_dir, out, **CACHE_EXTRA))
    )


def assert_resumes_to_reference(args: list[str], out: Path, reference: Path) -> None:
    """Resumed (in this process: the fault is gone), the cache equals the uninterrupted one."""
    cache_teacher.main(load_config(CacheConfig, None, args))
    assert verify(out, log=lambda *_: None) == []
    a, b = read_all(reference), read_all(out)
    for split in a:
        for field in a[split]:
            np.testing.assert_array_equal(a[split][field], b[split][field], err_msg=f"{split}/{field}")


@pytest.mark.parametrize("limit,where", [(100_000, "ingest/main-000000.h5"), (150_000, "train-00000.h5")])
def test_file_size_limit_while_caching(tmp_path, corpus_dir, llama_teacher, reference_cache, limit, where):
    out = tmp_path / "c"
    args = cache_overrides(llama_teacher, corpus_dir, out, **CACHE_EXTRA)
    err = assert_one_clean_error(run("cache_teacher.py", args, fsize=limit), where, "File too large", "file-size")
    assert not no_partial_files(out), no_partial_files(out)
    assert not (out / MANIFEST).exists(), err
    assert_resumes_to_reference(args, out, reference_cache)


@pytest.mark.parametrize("level", [0.05, 0.5, 0.95])
def test_full_disk_while_caching(tmp_path, corpus_dir, llama_teacher, reference_cache, small_disk, level):
    """The disk fills at `level` x the finished cache's size: during ingest (0.05), mid-way and late in the
    teacher pass (the ingested windows stay on disk until the end, so 0.95 fails too)."""
    size = tree_bytes(reference_cache)
    disk = small_disk(2 * size + (1 << 20))
    filler = fill(disk, int(level * size))
    out = disk / "c"
    args = cache_overrides(llama_teacher, corpus_dir, out, **CACHE_EXTRA)
    result = run("cache_teacher.py", args)
    assert_one_clean_error(result, "No space left on device", "the disk is full")
    if level > 0.05:  # the ingest fitted: the pre-flight check warned before the teacher pass began
        assert "sequences still to cache need about" in result.stderr, result.stderr[-2000:]
    assert not no_partial_files(out), no_partial_files(out)
    assert_complete_shards_intact(out)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    filler.unlink()
    assert_resumes_to_reference(args, out, reference_cache)
    assert all(p.stat().st_mtime_ns == kept[p.name] for p in out.glob("*.h5") if p.name in kept)  # not redone


def test_full_disk_at_start_leaves_nothing(tmp_path, corpus_dir, llama_teacher, small_disk):
    """A disk too full for even the lock or the write probe: one error, and no `.write-probe-*` or lock left."""
    disk = small_disk(1 << 20)
    fill(disk, 0)
    out = disk / "c"
    assert_one_clean_error(run("cache_teacher.py", cache_overrides(llama_teacher, corpus_dir, out, **CACHE_EXTRA)))
    assert not out.exists() or not [p for p in out.rglob("*") if p.name != "ingest"], list(out.rglob("*"))


# ---- training ----

TRAIN_EXTRA = {"train.max_steps": 10, "train.checkpoint_every": 5, "train.eval_every": 5}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_cache) -> Path:
    out = tmp_path_factory.mktemp("faults-train")
    return train_student.main(load_config(TrainConfig, None, overrides(tiny_cache, out, **TRAIN_EXTRA)))


def resume(args: list[str]) -> Path:
    """The interrupted run resumed, in this process (the fault is gone)."""
    return train_student.main(load_config(TrainConfig, None, args + ["train.resume=true"]))


def checkpoint_bytes(run_dir: Path) -> int:
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    return tree_bytes(run_dir / "checkpoints" / latest["path"])


def test_full_disk_while_checkpointing_keeps_the_previous_one(tmp_path, tiny_cache, reference_run, small_disk):
    """Room for one checkpoint and a half: the step-5 checkpoint is saved, the step-10 one fails part-way. One
    error; no partial folder; step 5 intact and current; resumed after freeing space, the run logs exactly what
    an uninterrupted run logs."""
    ckpt = checkpoint_bytes(reference_run)
    disk = small_disk(4 * ckpt + (1 << 20))
    filler = fill(disk, int(1.5 * ckpt) + 64 * 1024)  # + config.json, metrics.jsonl
    args = overrides(tiny_cache, disk, **TRAIN_EXTRA)
    assert_one_clean_error(run("train_student.py", args), "step_00000010", "No space left on device")
    run_dir = disk / "r"
    assert not no_partial_files(run_dir), no_partial_files(run_dir)
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["path"] == "step_00000005"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest.json", "step_00000005"]
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # never half a line
    filler.unlink()
    assert_same_metrics(reference_run, resume(args))


def test_file_size_limit_while_checkpointing(tmp_path, tiny_cache, reference_run):
    """A limit below the optimizer state's file: the first checkpoint fails; one error, no partial folder, no
    `latest.json` pointing anywhere; with the limit lifted the resumed run equals an uninterrupted one."""
    files = [p.stat().st_size for p in (reference_run / "checkpoints").rglob("*") if p.is_file()]
    limit = max(files) - 1
    args = overrides(tiny_cache, tmp_path, **TRAIN_EXTRA)
    assert_one_clean_error(run("train_student.py", args, fsize=limit), "step_00000005", "File too large")
    run_dir = tmp_path / "r"
    assert not no_partial_files(run_dir), no_partial_files(run_dir)
    assert not (run_dir / "checkpoints" / "latest.json").exists()
    assert_same_metrics(reference_run, resume(args))


def test_a_failed_final_save_loses_no_training(tmp_path, tiny_cache, reference_run, monkeypatch):
    """With no checkpoints asked for (checkpoint_every 0), the disk fills while final/ is written: one error that
    names where the trained state is and the command that finishes; that command writes final/ without a step of
    training, and the run's record equals an uninterrupted run's."""
    import errno

    import kd.train.checkpoint
    from kd.errors import KDError
    from kd.io import disk_error

    real = kd.train.checkpoint.write_bytes_durable

    def disk_fills_at_the_model_card(path, data):
        if path.name == "README.md":  # the last file of final/, after the weights
            raise KDError(f"writing {path} failed: {disk_error(OSError(errno.ENOSPC, 'No space left on device'))}")
        return real(path, data)

    monkeypatch.setattr(kd.train.checkpoint, "write_bytes_durable", disk_fills_at_the_model_card)
    args = overrides(tiny_cache, tmp_path, **{**TRAIN_EXTRA, "train.checkpoint_every": 0})
    with pytest.raises(
        KDError,
        match=r"the disk is full; .*The trained state is saved in .*step_00000010, so the re-run to use is "
        r"`.* train\.resume=true`: it writes final/ from that state without training again",
    ):
        train_student.main(load_config(TrainConfig, None, args))
    run_dir = tmp_path / "r"
    assert not (run_dir / "final").exists() and not no_partial_files(run_dir)
    steps = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    monkeypatch.undo()
    assert resume(args) == run_dir
    assert (run_dir / "final" / "README.md").exists() and not (run_dir / "checkpoints").exists()
    again = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert again == steps  # not one step trained again
    assert_same_metrics(reference_run, run_dir)


TRAIN_KILL_AT = {
    # point -> (module, owner, function, on which call): SIGKILL there, in a real run
    "before-any-checkpoint": ("kd.train.state", "MetricsLog", "write", 3),
    "mid-run": ("kd.train.state", "MetricsLog", "write", 8),  # after step 5's checkpoint
    "during-checkpoint-save": ("kd.io", None, "write_json_atomic", "trainer_state.json"),
    "during-final": ("kd.io", None, "write_json_atomic", "kd_meta.json"),
}


@pytest.mark.parametrize("point", sorted(TRAIN_KILL_AT))
def test_sigkill_training_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_cache, reference_run, point):
    runner = tmp_path / "runner.py"
    runner.write_text(killing_runner("train_student.py", *TRAIN_KILL_AT[point]))
    args = overrides(tiny_cache, tmp_path, **TRAIN_EXTRA)
    killed = warm.run([sys.executable, str(runner), "train_student.py", *args], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = resume(args)
    assert_same_metrics(reference_run, run_dir)
    assert not no_partial_files(run_dir), no_partial_files(run_dir)
    assert (run_dir / "final" / "model.safetensors").exists()


def test_a_save_that_fails_for_another_reason_keeps_its_traceback(tmp_path):
    """Only write errors (I/O, a full disk, a size limit) become one line; a bug inside a save stays a traceback,
    and the partial folder goes either way."""
    from kd.errors import KDError
    from kd.io import staged_dir

    with pytest.raises(RuntimeError, match="a bug"):
        with staged_dir(tmp_path / "a") as tmp:
            tmp.mkdir()
            raise RuntimeError("a bug")
    with pytest.raises(KDError, match="saving .*b failed: .*No space left on device: the disk is full"):
        with staged_dir(tmp_path / "b") as tmp:
            tmp.mkdir()
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_a_complete_cache_on_a_read_only_disk_is_only_read(tmp_path, small_disk, llama_teacher, corpus_dir):
    """Re-running the caching pass on a complete cache mounted read-only: "already complete", exit 0, nothing
    written (not even the lock); another config there is one error. Training and verify read it as before."""
    disk = small_disk(64 << 20)
    out = disk / "cache"
    args = cache_overrides(llama_teacher, corpus_dir, out)
    cache_teacher.main(load_config(CacheConfig, None, args))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    again = run("cache_teacher.py", args)
    assert again.returncode == 0 and "is already complete (same config); nothing to do" in again.stdout, again.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    assert_one_clean_error(
        run("cache_teacher.py", [*args, "cache.top_k=8"]), "holds a cache made with a different config"
    )
    assert verify(out, log=lambda *_: None) == []
