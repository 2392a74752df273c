"""Progress bars: ``tqdm``'s, refreshed rarely where stderr is no terminal (a log file, a CI log)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

from kimivl.terminal import is_terminal

QUIET_INTERVAL = 30.0  # seconds between two refreshes of a bar that no terminal shows


def progress_bar(*args, **kwargs) -> tqdm:
    """A ``tqdm`` bar. Written to a file or pipe, each refresh is another ``\\r`` line, several a second: there it
    refreshes every ``QUIET_INTERVAL`` seconds at most (a ``TQDM_MININTERVAL`` in the environment still wins)."""
    stream = kwargs.get("file") or sys.stderr
    if "TQDM_MININTERVAL" not in os.environ and not is_terminal(stream):
        kwargs.setdefault("mininterval", QUIET_INTERVAL)
        kwargs.setdefault("maxinterval", QUIET_INTERVAL)  # nor the monitor thread's forced refresh, every 10 s
    return tqdm(*args, **kwargs)
