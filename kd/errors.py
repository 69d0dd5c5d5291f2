"""User-facing errors: one clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable


class KDError(Exception):
    """Bad input or a refused operation. The message says what is wrong and what to do."""


# Exit status for a KDError; distinct from 1 (an unexpected crash) so scripts and tests can tell them apart.
EXIT_USER_ERROR = 2


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that its clean-up (locks, staged folders) runs as for Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def run_cli(fn: Callable[[], object]) -> None:
    """Run a command-line entry point: a KDError is one line on stderr and exit status 2; Ctrl-C (SIGINT) and
    SIGTERM are one line and the shell's 130 and 143, after the clean-up on the way out (locks released, partial
    files removed: complete shards and checkpoints are kept, so the same command resumes)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        fn()
    except KDError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except (KeyboardInterrupt, Terminated) as e:
        what, code = (
            ("interrupted (Ctrl-C)", 130) if isinstance(e, KeyboardInterrupt) else ("terminated (SIGTERM)", 143)
        )
        print(
            f"error: {what}; what was complete is kept (shards, checkpoints): the same command resumes",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(code)
