"""One run at a time in a run directory: ``out/.lock`` is held (``flock``) while a run trains there, and names its
holder, so a second run on the same ``out`` is refused instead of corrupting the first. Likewise one export at a time
to an export path: ``.<name>.lock`` beside it is held while a run writes and publishes its export there. A lock goes
with the process, however it ends."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from kimivl.train.recipe import ExportRefused, RecipeError

LOCK = ".lock"


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    fd = _take(out / LOCK, {}, f"{out} is in use by another run", "wait for it to end, or choose another --out")
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def export_lock(path: Path, out: Path, advice: str) -> Iterator[None]:
    """The export to ``path`` by the run in ``out``: another run exporting there now is an ``ExportRefused`` naming
    its ``out``, with ``advice``. The lock file is removed when the export ends (a run that opened it just before
    then holds a removed file, and opens the path again)."""
    file = path.with_name(f".{path.name}.lock")
    while True:
        fd = _take(
            file,
            {"out": str(out.resolve())},
            f"export path {path} is being written by another run",
            advice,
            ExportRefused,
        )
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(file)):
                break
        os.close(fd)
    try:
        yield
    finally:
        file.unlink(missing_ok=True)
        os.close(fd)


def _take(file: Path, holder: dict[str, str], refusal: str, advice: str, error: type[RecipeError] = RecipeError) -> int:
    """The descriptor of ``file``, locked by this process, which it names there (with ``holder``); while another
    process holds it, an ``error``: ``refusal``, that process, ``advice``."""
    try:
        import fcntl
    except ImportError:  # Windows
        raise RecipeError(
            f"{file.parent} would be locked for this run alone with fcntl (training and eval take such a lock on "
            "their output directory), which this platform lacks: run kimivl on Linux or macOS (on Windows, under WSL)"
        ) from None
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        os.close(fd)
        try:
            who = json.loads(held)
            who = f"pid {who['pid']} on {who['host']}, started {who['started']}" + (
                f", out {who['out']}" if "out" in who else ""
            )
        except (ValueError, KeyError, TypeError):
            who = "another process"
        raise error(f"{refusal} ({who}); {advice}") from None
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")  # with its UTC offset: the run
    # refused may be in another time zone, or on another host of a shared filesystem
    held = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, **holder}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(held).encode(), 0)
    return fd
