"""How a command ends when it is stopped from outside, for ``kimivl``, ``python -m kimivl.rl.passk`` and
``kimivl.rl.compare`` and the benchmark scripts alike: Ctrl-C prints one line (no traceback) and exits 130; the
reader of its stdout or stderr going away early (``| head -1``, ``| true``) ends it quietly with 141 (128 + SIGPIPE), as
a shell's tools do; a closed stdout (``>&-``), where the result is printed, is refused with 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def reader_gone(stream) -> bool:
    """Whether ``stream`` is a pipe whose reader has closed it (the poll of its write end reports an error)."""
    import select

    try:
        poll = select.poll()
        poll.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no such stream, or not a file (a test's capture)
        return False


def stop_code(prog: str, error: BaseException) -> int | None:
    """The exit status of command ``prog`` stopped by ``error`` from outside: 130 for Ctrl-C, after ``PROG:
    interrupted`` on stderr; 141 for a ``BrokenPipeError`` of stdout's or stderr's reader gone (a log filter that
    exited), quietly (that stream then goes to /dev/null, so what is left of it goes nowhere at exit either). None for
    any other error (a broken pipe or socket that is neither of them too): the caller's to report."""
    if isinstance(error, KeyboardInterrupt):
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    gone = [s for s in (sys.stdout, sys.stderr) if reader_gone(s)] if isinstance(error, BrokenPipeError) else []
    for stream in gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    return 141 if gone else None


def run_command(prog: str, command: Callable[[], int | None], prints: bool = True) -> int:
    """``command()``'s exit status (None counting as 0), stdout flushed after it (so that a reader that has gone is
    found here, not in the interpreter's last flush); ``stop_code``'s when Ctrl-C or a reader gone stops it. A command
    that ``prints`` its result is refused with ``PROG: error: stdout is closed ...`` and 2 when stdout is closed
    (``>&-``: ``print`` would drop the result unsaid)."""
    if prints and sys.stdout is None:
        print(
            f"{prog}: error: stdout is closed, so the result would be lost: redirect it to a file (or /dev/null)",
            file=sys.stderr,
        )
        return 2
    try:
        code = command()
        if sys.stdout is not None:
            sys.stdout.flush()
        return code or 0
    except (KeyboardInterrupt, BrokenPipeError) as e:
        if (code := stop_code(prog, e)) is None:
            raise
        return code
