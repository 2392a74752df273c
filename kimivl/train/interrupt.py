"""Ctrl-C (or SIGTERM, as schedulers and torchrun stop jobs) during training: the first stops the stage after the step
in progress (which is then saved), a second one stops at once."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """Training stopped at the user's request; the message names the saved step."""


class StopRequest:
    def __init__(self):
        self.requested = False


@contextlib.contextmanager
def stop_on_interrupt() -> Iterator[StopRequest]:
    """While active, SIGINT and SIGTERM set ``requested`` instead of ending the process (outside the main thread it
    changes nothing)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum, frame):
        if request.requested:
            raise KeyboardInterrupt
        request.requested = True
        name = signal.Signals(signum).name
        log.warning("%s: stopping after this step, which will be saved (again to stop at once, unsaved)", name)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
