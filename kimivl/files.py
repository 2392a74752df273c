"""Files (and directories) written so that a crash mid-write leaves the previous content, never a torn one; a write
that fails (a full disk) is an error naming the file."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)  # the errnos of a full disk (or quota)


def unencodable(path: str | os.PathLike) -> str | None:
    """Why the OS cannot be given ``path``: it holds characters that the filesystem encoding cannot encode (ASCII in
    the C locale without Python's UTF-8 mode, where ``Path.is_file`` says False and ``open`` names no path), or a
    lone UTF-16 surrogate (a JSON "\\ud800"), which no encoding can; None when it can be given."""
    try:
        os.fsencode(path)
    except UnicodeEncodeError as e:
        bad = e.object[e.start : e.end]
        if all("\ud800" <= c <= "\udfff" for c in bad):
            return f"{os.fspath(path)!r} holds the lone UTF-16 surrogate {bad!r}, which no file name can hold"
        return (
            f"{os.fspath(path)} holds {bad!r}, which the filesystem encoding "
            f"({sys.getfilesystemencoding()}) cannot encode: run with PYTHONUTF8=1, or in a UTF-8 locale (LANG=C.UTF-8)"
        )
    return None


def path_text(path: str | os.PathLike) -> str:
    """``path`` as text to record (in JSON, say): its bytes read as UTF-8, as a UTF-8 locale reads them, whatever this
    one is (under ``LC_ALL=C`` without UTF-8 mode Python holds a non-ASCII name as lone surrogates, which UTF-8 cannot
    write and another locale reads as another path); a byte that is not UTF-8 as its escape (``\\xe8``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def unwritable(path: str | os.PathLike) -> str | None:
    """Why this user could not create ``path`` (or replace it, by a rename beside it), checked before long work that
    ends by writing it: its nearest existing folder is no directory or not writable, or ``path`` exists and is not
    writable; None when it could. A device or FIFO (``/dev/null``, ``/dev/stdout`` on a pipe) is written where it is
    (``write_text_atomic``): only it must be writable. Nothing is created."""
    if (fd := own_descriptor(path)) is not None:  # written through that descriptor, which the shell opened
        return _unopened(path, fd)
    if in_place(path):
        return None if os.access(path, os.W_OK) else f"{os.fspath(path)} is not writable"
    path = Path(path).resolve()
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a directory"
    for where in [folder, *([path] if path.exists() else [])]:
        if not os.access(where, os.W_OK | (os.X_OK if where.is_dir() else 0)):
            return f"{where} is not writable"
    return None


def _unopened(path: str | os.PathLike, fd: int) -> str | None:
    """Why the descriptor ``fd`` that ``path`` names cannot take a command's output: it is not open (later, this
    process's own files would take the number, and the output would go into one of them), or open for reading only."""
    try:
        import fcntl

        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except ImportError:  # Windows: no /dev/fd to name one
        return None
    except OSError:
        return f"{os.fspath(path)} names descriptor {fd}, which is not open: open it for the command ({fd}> FILE)"
    if flags & os.O_ACCMODE == os.O_RDONLY:
        return f"{os.fspath(path)} names descriptor {fd}, which is open for reading only"
    return None


class WriteError(OSError):
    """Writing a file failed; the message names the file, and a full disk says so. ``errno`` is the failure's."""


def write_error(e: OSError, file: str | os.PathLike, kind: type[WriteError] = WriteError) -> WriteError:
    """The ``kind`` of error for an OS failure ``e`` while writing ``file``: a full disk says so (a ``WriteError``
    already names its file: its message is kept)."""
    if isinstance(e, kind):
        return e
    if isinstance(e, WriteError):
        error = kind(str(e))
    elif e.errno in FULL:
        error = kind(
            f"the disk is full: writing {os.fspath(file)} failed ({e.strerror or e}); "
            "free space (or choose another directory) and try again"
        )
    else:
        error = kind(f"cannot write {os.fspath(file)}: {e.strerror or e}")
    error.errno = e.errno
    return error


@contextlib.contextmanager
def writing(file: str | os.PathLike) -> Iterator[None]:
    """An ``OSError`` inside the block (a full disk) becomes a ``WriteError`` naming ``file``."""
    try:
        yield
    except OSError as e:
        raise write_error(e, file) from None


def file_mode() -> int:
    """The mode a new file gets from ``open`` (0o666 less the umask), for files that a library creates private
    (safetensors' 0o600). The umask is read from ``/proc`` where it can be: setting it to read it is not thread-safe."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def own_descriptor(path: str | os.PathLike) -> int | None:
    """The descriptor ``N`` of this process that ``path`` names through its symlinks (``/dev/stdout``,
    ``/proc/self/fd/N``, ``/dev/fd/N``), else None. Opening such a name anew would start at offset 0 and truncate
    what the shell opened (``--out /dev/stdout > file``), so it is written through ``N`` itself."""
    name = os.fspath(path)
    for _ in range(40):  # the kernel's own limit on links followed
        found = re.fullmatch(r"/(?:proc/self|dev)/fd/(\d+)", os.path.normpath(name))
        if found:
            return int(found.group(1))
        try:
            name = os.path.join(os.path.dirname(name), os.readlink(name))
        except (OSError, ValueError):  # not a link (or no such file)
            return None
    return None


def in_place(path: str | os.PathLike) -> bool:
    """Whether ``path`` is, through its symlinks, a device, FIFO or socket: written where it is, since a rename over
    it would put a regular file in its place (``--out /dev/null`` as root: the system's /dev/null)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # absent (or a dangling link), or a name the OS cannot be given
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def write_text_atomic(
    path: str | os.PathLike, text: str, errors: str = "strict", *, through_links: bool = False
) -> None:
    """Write ``text`` to a temporary file of this writer's own beside ``path`` (``.<name>.<random>.tmp``, so writers
    of one file at once never share one), then rename it over ``path``: the file is always one writer's whole text. A
    failed write (a full disk) is a ``WriteError`` naming ``path``, which keeps its old text. ``errors``: what UTF-8
    does with a lone surrogate, the one character it cannot write (``"backslashreplace"``: its JSON escape).

    A descriptor of this process (``own_descriptor``: ``/dev/stdout``) is written through; a device or FIFO
    (``in_place``) is opened and written, not replaced. ``through_links``: a symlink's target is
    replaced, not the link, as a shell's ``>`` writes (for a file the user named, such as ``--out``); without it a
    symlink is replaced by the file (a checkpoint's file linked into a cache of blobs shared with others)."""
    if (fd := own_descriptor(path)) is not None:
        for stream in (sys.stdout, sys.stderr):  # what was printed first stays first
            if stream is not None:
                stream.flush()
        data = memoryview(text.encode("utf-8", errors))
        with writing(path):
            while data:
                data = data[os.write(fd, data) :]
        return
    if in_place(path):
        with writing(path), open(path, "w", encoding="utf-8", errors=errors) as f:
            f.write(text)
        return
    path = Path(os.path.realpath(path) if through_links else path)
    tmp = path.with_name(f".{path.name[:50]}.{uuid.uuid4().hex}.tmp")  # at most 238 bytes: a name of 255 has one
    try:
        with writing(path), open(tmp, "x", encoding="utf-8", errors=errors) as f:  # created and closed in the block
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the error raised is the write's
            tmp.unlink(missing_ok=True)
        raise


def temporary_dir(path: Path) -> Path:
    """Where the directory ``path`` is written before ``publish_dir`` renames it into place: ``.<name>.tmp`` beside
    it."""
    return path.with_name(f".{path.name}.tmp")


def publish_dir(path: Path) -> None:
    """Rename the directory completed under ``path``'s temporary name into place, replacing ``path``: the previous
    one is first renamed aside (``.<name>.old``, removed after), so a process killed at any point leaves at ``path``
    the previous directory whole, the new one whole, or (between the two renames) none, never a part of either."""
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)  # left by a process killed after its swap
    if path.exists():
        os.replace(path, old)
    os.replace(temporary_dir(path), path)
    shutil.rmtree(old, ignore_errors=True)
