"""User-facing errors: one clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
from collections.abc import Callable


class KDError(Exception):
    """Bad input or a refused operation. The message says what is wrong and what to do."""


# Exit status for a KDError; distinct from 1 (an unexpected crash) so scripts and tests can tell them apart.
EXIT_USER_ERROR = 2
# Exit status when what reads the output went away (`... | head`): the shell's for a death by SIGPIPE
EXIT_OUTPUT_CLOSED = 128 + 13


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that its clean-up (locks, staged folders) runs as for Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR)
        return bool(poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll on this platform, or no real stdout
        return False


def _drop_stdout() -> None:
    """Standard output to /dev/null, once its reader has gone: Python flushes it again on the way out, and on the
    closed pipe that prints "Exception ignored ..." and exits 120 whatever the command's status."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _flush_stdout() -> None:
    """Flush standard output now, dropping it if its reader has gone."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        _drop_stdout()


def run_cli(fn: Callable[[], object]) -> None:
    """Run a command-line entry point: a KDError is one line on stderr and exit status 2; Ctrl-C (SIGINT) and
    SIGTERM are one line and the shell's 130 and 143, after the clean-up on the way out (locks released, partial
    files removed: complete shards and checkpoints are kept, so the same command resumes). Output read by a command
    that stops early (`kd verify DIR | head`) ends the run quietly with the shell's 141, as `cat` does, not with a
    traceback; a broken pipe anywhere else (a socket) is still an error."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        fn()
        sys.stdout.flush()  # here, where a closed pipe is the BrokenPipeError below, not at exit
    except KDError as e:
        _flush_stdout()  # the error and its status matter more than output nobody reads
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except (KeyboardInterrupt, Terminated) as e:
        what, code = (
            ("interrupted (Ctrl-C)", 130) if isinstance(e, KeyboardInterrupt) else ("terminated (SIGTERM)", 143)
        )
        _flush_stdout()
        print(
            f"error: {what}; what was complete is kept (shards, checkpoints): the same command resumes",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(code)
    except SystemExit:  # a command's own status (verify's 1 for a damaged cache) is kept
        _flush_stdout()
        raise
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        _drop_stdout()
        sys.exit(EXIT_OUTPUT_CLOSED)
