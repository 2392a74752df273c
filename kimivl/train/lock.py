"""One run at a time in a run directory: ``out/.lock`` is held (``flock``) while a run trains there, and names its
holder, so a second run on the same ``out`` is refused instead of corrupting the first. The lock goes with the
process, however it ends."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from kimivl.train.recipe import RecipeError

LOCK = ".lock"


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            try:
                who = json.loads(holder)
                who = f"pid {who['pid']} on {who['host']}, started {who['started']}"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise RecipeError(
                f"{out} is in use by another run ({who}); wait for it to end, or choose another --out"
            ) from None
        holder = json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        ).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder, 0)
        yield
    finally:
        os.close(fd)  # releases the lock
