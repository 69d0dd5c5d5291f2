"""Files that must never be half-written or written by two runs at once: atomic JSON, checksums, a directory lock."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

from kd.errors import KDError

LOCK_FILE = ".lock"


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def write_json_atomic(path: Path, obj) -> None:
    """Write under a temporary name, fsync, rename: readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class DirLock:
    """An exclusive `flock` on DIR/.lock, held by one process (rank 0 of a run) for the run's lifetime.

    The kernel drops the lock when the holder dies, SIGKILL included, so a killed run never leaves a stale lock:
    the re-run takes it over. A second run started on the same directory while the first is alive is refused,
    naming the holder. On a shared filesystem across machines this relies on the filesystem's lock support
    (NFSv4 and Lustre with `flock` mounts provide it)."""

    def __init__(self, directory: Path, what: str):
        self.path, self.what, self.fd = Path(directory) / LOCK_FILE, what, None

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
            raise KDError(
                f"another {self.what} is writing {self.path.parent} ({who}); wait for it to finish or stop "
                "it, or choose another output directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no other run can be between check and unlink)."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
