"""One run at a time in a run directory: ``out/.lock`` is held (``flock``) while a run trains there, and names its
holder, so a second run on the same ``out`` is refused instead of corrupting the first. Likewise one export at a time
to an export path: ``.<name>.lock`` beside it is held while a run writes and publishes its export there; and one build
at a time of a synthetic world: ``.<name>.lock`` beside its folder, which a second builder waits for. A lock goes with
the process, however it ends."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kimivl.files import FULL, write_error
from kimivl.train.recipe import ExportRefused, RecipeError

if TYPE_CHECKING:
    from kimivl.distributed.world import World

log = logging.getLogger(__name__)
LOCK = ".lock"
IN_USE, ADVICE = "is in use by another run", "wait for it to end, or choose another --out"


@contextlib.contextmanager
def run_lock(out: Path, world: World | None = None) -> Iterator[None]:
    """``out`` for this run alone. Under torchrun (``world``) rank 0 takes the lock for every rank, and a refusal
    stops every rank with its message (the other ranks went on into their first collective, and died there)."""
    fd, refused = None, None
    if world is None or world.main:
        try:
            if out.exists() and not out.is_dir():
                raise RecipeError(f"{out} is not a directory: choose another --out")
            out.mkdir(parents=True, exist_ok=True)
            fd = _take(out / LOCK, {}, f"{out} {IN_USE}", ADVICE)
        except RecipeError as e:
            refused = str(e)
        except OSError as e:  # a folder this user cannot write (a default --out in a read-only clone), a full disk
            file = e.filename or out / LOCK
            refused = (
                str(write_error(e, file))
                if e.errno in FULL
                else f"cannot write to {out}: {e.strerror} ({file}); choose another --out"
            )
    if world is not None:
        refused = world.wait_for_main(refused)
    if refused is not None:
        raise RecipeError(refused)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def check_free(out: Path, world: World | None = None) -> None:
    """Refuse now, as ``run_lock`` would (on every rank under torchrun: rank 0 looks), when another process's run
    holds ``out``: before a check that would send the user to ``--resume`` on a folder in use."""
    who = running(out) if world is None or world.main else None
    if world is not None:
        who = world.wait_for_main(who)
    if who is not None:
        raise RecipeError(f"{out} {IN_USE} ({who}); {ADVICE}")


def running(out: Path) -> str | None:
    """The other process (``pid N on HOST, started ...``) whose run holds ``out`` now; None when none does, or when
    it is this process's own run."""
    try:
        import fcntl  # not at import, as in _take
    except ImportError:  # Windows: no run holds a lock there (run_lock refuses to run)
        return None
    try:
        fd = os.open(out / LOCK, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError, PermissionError):  # no run there, or one run_lock names
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken only while no run holds it
        return None
    except BlockingIOError:
        held = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        with contextlib.suppress(ValueError, AttributeError):
            who = json.loads(held)
            if (who.get("pid"), who.get("host")) == (os.getpid(), socket.gethostname()):
                return None
        return _who(held)
    finally:
        os.close(fd)


@contextlib.contextmanager
def export_lock(path: Path, out: Path, advice: str) -> Iterator[None]:
    """The export to ``path`` by the run in ``out``: another run exporting there now is an ``ExportRefused`` naming
    its ``out``, with ``advice``."""
    holder = {"out": str(out.resolve())}
    with _beside(path, holder, f"export path {path} is being written by another run", advice, ExportRefused):
        yield


@contextlib.contextmanager
def world_lock(path: Path) -> Iterator[None]:
    """The synthetic world in the folder ``path`` for this process to build: while another process builds it, a
    warning names that process, and this one waits for it to end."""
    try:
        import fcntl  # noqa: F401  (not at import, as in _take)
    except ImportError:  # Windows: built unlocked (training and eval, which lock their folders, refuse to run there)
        yield
        return
    refusal = f"the world under {path} is being built by another process"
    with _beside(path, {}, refusal, "waiting for it to end", wait=True):
        yield


@contextlib.contextmanager
def _beside(
    path: Path,
    holder: dict[str, str],
    refusal: str,
    advice: str,
    error: type[RecipeError] = RecipeError,
    wait: bool = False,
) -> Iterator[None]:
    """The lock ``.<name>.lock`` beside ``path`` (``_take``'s, with these arguments). The lock file is removed when the
    block ends (a process that opened it just before then holds a removed file, and opens the path again)."""
    file = path.with_name(f".{path.name}.lock")
    while True:
        fd = _take(file, holder, refusal, advice, error, wait)
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(file)):
                break
        os.close(fd)
    try:
        yield
    finally:
        file.unlink(missing_ok=True)
        os.close(fd)


def _take(
    file: Path,
    holder: dict[str, str],
    refusal: str,
    advice: str,
    error: type[RecipeError] = RecipeError,
    wait: bool = False,
) -> int:
    """The descriptor of ``file``, locked by this process, which it names there (with ``holder``); while another
    process holds it, an ``error``: ``refusal``, that process, ``advice`` (with ``wait``, a warning of those, and the
    lock once that process lets it go)."""
    try:
        import fcntl
    except ImportError:  # Windows
        raise RecipeError(
            f"{file.parent} would be locked for this run alone with fcntl (training and eval take such a lock on "
            "their output directory), which this platform lacks: run kimivl on Linux or macOS (on Windows, under WSL)"
        ) from None
    try:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o666)  # as the umask allows: a group's members share a folder
    except PermissionError as e:
        if not file.exists():
            raise  # the folder is not writable: the caller names it
        whose = "another user made it" if file.stat().st_uid != os.geteuid() else "its mode allows no writing"
        raise error(
            f"{file} cannot be opened for writing ({e.strerror}): {whose}; make it writable for this user "
            "(chmod g+w, for a folder the group shares)"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = _who(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        if not wait:
            os.close(fd)
            raise error(f"{refusal} ({who}); {advice}") from None
        log.warning("%s (%s): %s", refusal, who, advice)
        fcntl.flock(fd, fcntl.LOCK_EX)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")  # with its UTC offset: the run
    # refused may be in another time zone, or on another host of a shared filesystem
    held = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, **holder}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(held).encode(), 0)
    except OSError as e:  # a full disk: the lock is let go, and the lock file named
        os.close(fd)
        e.filename = os.fspath(file)
        raise
    return fd


def _who(held: str) -> str:
    """The holder a lock file names (``_take`` wrote it), as words."""
    try:
        who = json.loads(held)
        return f"pid {who['pid']} on {who['host']}, started {who['started']}" + (
            f", out {who['out']}" if "out" in who else ""
        )
    except (ValueError, KeyError, TypeError):
        return "another process"
