"""Files that must never be half-written or written by two runs at once: atomic JSON, checksums, a directory lock."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from kd.errors import KDError

LOCK_FILE = ".lock"


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def json_sha256(obj) -> str:
    """The sha256 of a JSON-able record with its keys sorted: the digest kd's identities (a cache's config hash, a
    teacher's weights or served model, an ingest spec) are made of."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    """Write under a temporary name, fsync, rename: readers see the old file or the whole new one, never a part.
    A failed write (full disk) removes its temporary file and raises KDError."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    write_bytes_durable(tmp, (json.dumps(obj, indent=2, sort_keys=True)).encode())
    os.replace(tmp, path)


# Errors a write to a full disk or past a file-size limit surfaces as: OSError from Python's own I/O, RuntimeError
# from torch's and HDF5's writers, SafetensorError (an Exception subclass) from safetensors.
WRITE_ERRORS = (OSError, RuntimeError)


def is_write_error(e: BaseException) -> bool:
    return isinstance(e, WRITE_ERRORS) or type(e).__name__ == "SafetensorError"


def write_bytes_durable(path: Path, data) -> None:
    """Write `data` (bytes or a buffer) to `path` and fsync it. On failure the partial file is removed and one
    KDError says what failed and how to fix it."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        path.unlink(missing_ok=True)
        raise KDError(f"writing {path} failed: {disk_error(e)}") from None


def append_line(path: Path, line: str) -> None:
    """Append one line to a log and fsync it; a failed write (full disk) is cut back off, never left as half a
    line that would break every later read of the log, and raises one KDError."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])
            os.fsync(fd)
        except OSError as e:
            os.ftruncate(fd, end)
            raise KDError(f"writing {path} failed: {disk_error(e)}") from None
    finally:
        os.close(fd)


def diagnose(e: BaseException, where: Path | None = None) -> tuple[bool, bool]:
    """(the disk is full, a file-size limit was hit) for a write error. Writers that hide the errno (torch's
    "unexpected pos ...") are diagnosed from the state of `where`, the file or directory written (checked before
    the partial output is removed): almost no space left, or a file at the process's file-size limit."""
    code = getattr(e, "errno", None)
    full = code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)
    too_big = code == errno.EFBIG or "File too large" in str(e)
    if where is not None and not (full or too_big):
        import resource

        try:
            full = shutil.disk_usage(where).free < 4 << 20
            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            files = [where] if where.is_file() else list(where.rglob("*"))
            too_big = limit != resource.RLIM_INFINITY and any(p.is_file() and p.stat().st_size >= limit for p in files)
        except OSError:
            pass
    return full, too_big


def disk_error(e: BaseException, where: Path | None = None) -> str:
    """A write error in words, with the fix: a full disk and a file-size limit are the user's to resolve."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    full, too_big = diagnose(e, where)
    if full:
        said = "" if "No space left" in text else " (No space left on device)"
        return f"{text}{said}: the disk is full; free space (or choose another directory), then re-run"
    if too_big:
        said = "" if "File too large" in text else " (File too large)"
        return f"{text}{said}: a file-size limit was hit (ulimit -f, or the filesystem's); raise it, then re-run"
    return f"{text}; fix the cause (space, permissions), then re-run"


def h5_in_memory(name: str):
    """A new HDF5 file built in memory (core driver, no backing store); `h5_image` closes it and returns its bytes.
    Why: HDF5 reports failed writes (a full disk, a file-size limit) late, from buffered flushes and object
    deallocation, as "Exception ignored" tracebacks and often a segfault at close. Built in memory and written to
    disk by `write_bytes_durable`, a file's write fails as one OSError at a known place."""
    import h5py

    return h5py.File(name, "w", driver="core", backing_store=False, block_size=1 << 22)


def h5_image(f) -> bytes:
    f.flush()
    image = f.id.get_file_image()
    f.close()
    return image


@contextmanager
def staged_dir(final: Path, is_main: bool = True, barrier=lambda: None):
    """Build a directory at a temporary name `<final>.partial` (yielded), renamed into place when the block
    succeeds: a reader sees the old directory or the whole new one. Every process of a launch may write into it;
    `barrier` (accelerator.wait_for_everyone) orders their writes before the main process renames. On a write
    error the partial directory is removed and one KDError is raised."""
    tmp = final.with_name(final.name + ".partial")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    barrier()
    try:
        yield tmp
        barrier()
        if is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except Exception as e:
        if not (is_write_error(e) or isinstance(e, KDError)):
            raise
        # diagnosed before the removal frees the space; an error that is neither I/O nor a full disk or a size
        # limit is a bug, and keeps its traceback
        disk = isinstance(e, OSError) or any(diagnose(e, tmp))
        why = disk_error(e, tmp) if disk and not isinstance(e, KDError) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if why is None:
            raise
        raise KDError(f"saving {final} failed: {why}") from None


class DirLock:
    """An exclusive `flock` on DIR/.lock, held by one process (rank 0 of a run) for the run's lifetime.

    The kernel drops the lock when the holder dies, SIGKILL included, so a killed run never leaves a stale lock:
    the re-run takes it over. A second run started on the same directory while the first is alive is refused,
    naming the holder. On a shared filesystem across machines this relies on the filesystem's lock support
    (NFSv4 and Lustre with `flock` mounts provide it)."""

    def __init__(self, directory: Path, what: str, name: str = LOCK_FILE):
        self.path, self.what, self.fd = Path(directory) / name, what, None

    def acquire(self) -> DirLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            try:
                holder = json.loads(self.path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            who = (
                (
                    f"pid {holder.get('pid')} on {holder.get('host')}, started "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))}"
                )
                if holder
                else "unknown"
            )
            target = self.path.parent if self.path.name == LOCK_FILE else self.path.with_name(self.path.name[1:-5])
            raise KDError(
                f"another {self.what} is writing {target} ({who}); wait for it to finish or stop "
                "it, or choose another output directory"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(
                fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()
            )
            os.fsync(fd)
        except OSError as e:
            self.path.unlink(missing_ok=True)  # still ours (flock held): no other run can be between
            os.close(fd)
            raise KDError(f"cannot write the lock {self.path}: {disk_error(e)}") from None
        self.fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no other run can be between check and unlink)."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
