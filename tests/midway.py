"""Forcing two threads to interleave at a chosen point, for tests of state shared between threads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Midway:
    """``run(other, here)``: ``other()`` in a thread of its own until it calls ``stop()``, then ``here()`` in this
    thread, then ``other`` goes on; returns both results."""

    def __init__(self) -> None:
        self.reached, self.go = threading.Event(), threading.Event()

    def stop(self) -> None:
        self.reached.set()
        self.go.wait(10)

    def run(self, other: Callable[[], Any], here: Callable[[], Any]) -> tuple[Any, Any]:
        got = {}
        thread = threading.Thread(target=lambda: got.update(other=other()))
        thread.start()
        assert self.reached.wait(10), "the other thread never reached its stop"
        mine = here()
        self.go.set()
        thread.join(10)
        return got["other"], mine
