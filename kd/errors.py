"""User-facing errors: one clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class KDError(Exception):
    """Bad input or a refused operation. The message says what is wrong and what to do."""


# Exit status for a KDError; distinct from 1 (an unexpected crash) so scripts and tests can tell them apart.
EXIT_USER_ERROR = 2


def run_cli(fn: Callable[[], object]) -> None:
    """Run a command-line entry point, turning KDError into one line on stderr and exit status 2."""
    try:
        fn()
    except KDError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
