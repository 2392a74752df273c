"""How a command ends when it is stopped from outside, for ``kimivl``, ``python -m kimivl.rl.passk`` and
``kimivl.rl.compare`` and the benchmark scripts alike: Ctrl-C prints one line (no traceback) and exits 130; its
stdout's reader going away early (``| head -1``, ``| true``) ends it quietly with 141 (128 + SIGPIPE), as a shell's
tools do."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (the poll of its write end reports an error)."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no stdout, or not a file (a test's capture)
        return False


def stop_code(prog: str, error: BaseException) -> int | None:
    """The exit status of command ``prog`` stopped by ``error`` from outside: 130 for Ctrl-C, after ``PROG:
    interrupted`` on stderr; 141 for a ``BrokenPipeError`` of stdout's reader gone, quietly (stdout then goes to
    /dev/null, so what is left of it goes nowhere at exit either). None for any other error (a broken pipe or socket
    that is not stdout's too): the caller's to report."""
    if isinstance(error, KeyboardInterrupt):
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    if isinstance(error, BrokenPipeError) and reader_gone():
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return None


def run_command(prog: str, command: Callable[[], int | None]) -> int:
    """``command()``'s exit status (None counting as 0), stdout flushed after it (so that a reader that has gone is
    found here, not in the interpreter's last flush); ``stop_code``'s when Ctrl-C or stdout's reader stops it."""
    try:
        code = command()
        if sys.stdout is not None:
            sys.stdout.flush()
        return code or 0
    except (KeyboardInterrupt, BrokenPipeError) as e:
        if (code := stop_code(prog, e)) is None:
            raise
        return code
