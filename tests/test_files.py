"""write_text_atomic: a whole text always, with concurrent writers of one file too; a failed write named. unwritable:
why a path could not be written, found before the work that ends by writing it."""

import errno
import multiprocessing
import os
import stat
import subprocess
import sys

import pytest

from kimivl import files
from kimivl.files import WriteError, file_mode, write_text_atomic


def test_a_writer_that_gets_in_between_does_not_break_another(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    replace, cut_in = os.replace, []

    def racing_replace(src, dst):  # another writer of the same file finishes while this one is about to rename
        if not cut_in:
            cut_in.append(src)
            write_text_atomic(path, "second\n")
        replace(src, dst)

    monkeypatch.setattr(files.os, "replace", racing_replace)
    write_text_atomic(path, "first\n")  # with one shared "<name>.tmp" the other writer renamed ours away
    assert path.read_text() == "first\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left


def _write_many(path, k):
    for i in range(30):
        write_text_atomic(path, f"writer {k} text {i}\n" * 50)


def test_concurrent_writers_leave_one_writers_whole_text(tmp_path):
    path = tmp_path / "f.txt"
    procs = [multiprocessing.get_context("fork").Process(target=_write_many, args=(path, k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    lines = path.read_text().splitlines()
    assert len(lines) == 50 and len(set(lines)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_the_file_gets_the_usual_permissions_and_a_failed_write_leaves_the_old_text(tmp_path):
    path = tmp_path / "config.json"
    write_text_atomic(path, "{}\n")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, "\udc80")  # not encodable: fails mid-write
    assert path.read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_write_the_disk_refuses_names_the_file_and_keeps_the_old_text(tmp_path, file_size_limit):
    path = tmp_path / "run.json"
    write_text_atomic(path, "{}\n")
    file_size_limit(100)
    with pytest.raises(WriteError, match=r"cannot write .*run\.json: File too large") as failed:
        write_text_atomic(path, "x" * 10_000)
    file_size_limit(None)
    assert failed.value.errno == errno.EFBIG
    assert path.read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_a_name_of_255_bytes_is_written(tmp_path):
    """Its temporary name, 38 bytes longer, was too long: a file the OS takes could not be written."""
    for name in ("r" * 250 + ".json", "\U0001f600" * 62 + ".json"):  # 255 and 253 bytes in UTF-8
        path = tmp_path / name
        write_text_atomic(path, "{}\n")
        assert path.read_text() == "{}\n" and path in list(tmp_path.iterdir())
    assert len(list(tmp_path.iterdir())) == 2


def test_file_mode_is_what_open_gives_a_new_file(tmp_path):
    umask = os.umask(0o027)
    try:
        (tmp_path / "f").touch()
        assert file_mode() == stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640
    finally:
        os.umask(umask)


def test_unwritable_names_a_folder_that_cannot_be_written_or_entered_and_a_file_that_cannot_be_replaced(
    tmp_path, monkeypatch
):
    """As root, ``os.access`` allows everything: the permissions it reports are patched."""
    tmp_path = tmp_path.resolve()
    (tmp_path / "f").write_text("")
    assert files.unwritable(tmp_path / "new" / "out.json") is None  # its folder is made when it is written
    assert files.unwritable(tmp_path / "f" / "out.json") == f"{tmp_path / 'f'} is not a directory"
    monkeypatch.setattr(files.os, "access", lambda path, mode: not mode & os.X_OK)  # writable, not enterable
    assert files.unwritable(tmp_path / "new" / "out.json") == f"{tmp_path} is not writable"
    (tmp_path / "out.json").write_text("{}")
    monkeypatch.setattr(files.os, "access", lambda path, mode: os.fspath(path) != str(tmp_path / "out.json"))
    assert files.unwritable(tmp_path / "out.json") == f"{tmp_path / 'out.json'} is not writable"


def test_a_link_to_stdout_redirected_to_a_file_is_written_through_the_shells_descriptor(tmp_path):
    """``passk --out /dev/stdout > file``: /dev/stdout is a link to the regular file the shell opened. Renaming over
    it unlinked that file (what was printed after went to a deleted file); opening it anew would start at offset 0
    and write over what stdout printed. Written through descriptor 1, the file holds all of it, in order."""
    link, out = tmp_path / "stdout", tmp_path / "out.txt"
    link.symlink_to("/proc/self/fd/1")  # what /dev/stdout is, private to the test
    code = (
        "import sys; from kimivl.files import write_text_atomic, unwritable\n"
        f"print('before'); assert unwritable({str(link)!r}) is None\n"
        f"write_text_atomic({str(link)!r}, 'json\\n', through_links=True); print('after')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # print buffers: flushed before the write
    with open(out, "w") as f:
        subprocess.run([sys.executable, "-c", code], stdout=f, check=True, env=env)
    assert out.read_text() == "before\njson\nafter\n" and link.is_symlink()
    assert files.own_descriptor(link) == 1 and files.own_descriptor(tmp_path) is None
    (tmp_path / "a").mkdir()
    relative = tmp_path / "a" / "stdout"  # a relative target, read from the link's folder
    relative.symlink_to(os.path.relpath("/proc/self/fd/1", tmp_path / "a"))
    (tmp_path / "loop").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop")
    assert files.own_descriptor(relative) == 1 and files.own_descriptor(tmp_path / "loop") is None
    (tmp_path / "out").symlink_to(link)  # a link to /dev/stdout, itself a link
    assert files.own_descriptor(tmp_path / "out") == 1


def test_a_descriptor_named_by_dev_fd_is_written_at_its_offset(tmp_path, monkeypatch):
    """``--out /dev/fd/3 3> file``: written through the descriptor, after what was written to it, whatever the
    folder's permissions (the descriptor is open already); ``errors`` applies there too."""
    path = tmp_path / "out.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # as the shell opens it
    try:
        os.write(fd, b"before\n")
        monkeypatch.setattr(files.os, "access", lambda path, mode: False)
        assert files.unwritable(f"/dev/fd/{fd}") is None
        write_text_atomic(f"/dev/fd/{fd}", "json \ud800\n", errors="backslashreplace")
        os.write(fd, b"after\n")
    finally:
        os.close(fd)
    assert path.read_text() == "before\njson \\ud800\nafter\n"


def test_a_descriptor_not_opened_for_writing_is_refused_before_the_work(tmp_path):
    """``--out /dev/fd/7`` with no ``7>`` was taken as written: at the end the output went into whatever file of the
    process's own had number 7 by then (an eval's lock, a checkpoint being read)."""
    fd = os.open(tmp_path / "x", os.O_RDONLY | os.O_CREAT)
    try:
        assert (
            files.unwritable(f"/dev/fd/{fd}") == f"/dev/fd/{fd} names descriptor {fd}, which is open for reading only"
        )
    finally:
        os.close(fd)
    said = files.unwritable(f"/dev/fd/{fd}")  # closed now: the number is free
    assert said == f"/dev/fd/{fd} names descriptor {fd}, which is not open: open it for the command ({fd}> FILE)"


def test_a_fifo_or_device_is_written_where_it_is_and_a_symlink_named_as_out_keeps_its_link(tmp_path, monkeypatch):
    """``passk --out /dev/null`` renamed a temporary file over the device (as root: the system's /dev/null became a
    regular file), and ``--out /dev/stdout`` (a link to a pipe) replaced the link; ``unwritable`` refused
    /dev/stdout for its folder /dev. A FIFO stands in for the device here (private to the test), read without
    blocking: before the fix nothing reached it and a regular file took its place."""
    fifo, link = tmp_path / "fifo", tmp_path / "stdout"
    os.mkfifo(fifo)
    link.symlink_to(fifo)
    for path in (fifo, link):
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader there, as `cat fifo` is
        try:
            # through a link too, without through_links; a lone surrogate as its escape
            write_text_atomic(path, f"to {path.name} \ud800\n", errors="backslashreplace")
            assert os.read(reader, 1000) == f"to {path.name} \\ud800\n".encode()
        finally:
            os.close(reader)
        assert stat.S_ISFIFO(fifo.lstat().st_mode) and link.is_symlink()
    monkeypatch.setattr(files.os, "access", lambda path, mode: os.fspath(path) != os.fspath(tmp_path))
    assert files.unwritable(fifo) is None and files.unwritable(link) is None  # its folder is not written
    monkeypatch.setattr(files.os, "access", lambda path, mode: not mode & os.W_OK)  # readable only
    assert files.unwritable(link) == f"{link} is not writable"

    target = tmp_path / "results" / "passk.json"  # a link to a file: the file is replaced, the link kept
    target.parent.mkdir()
    target.write_text("old\n")
    (tmp_path / "out.json").symlink_to(target)
    write_text_atomic(tmp_path / "out.json", "new\n", through_links=True)
    assert (tmp_path / "out.json").is_symlink() and target.read_text() == "new\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["passk.json"]  # no temporary file left
    write_text_atomic(tmp_path / "out.json", "own\n")  # a checkpoint's file linked into a shared cache: not followed
    assert not (tmp_path / "out.json").is_symlink() and target.read_text() == "new\n"


def test_a_quota_reached_is_named_as_a_full_disk():
    """EDQUOT (a user's quota on a shared disk) is a full disk as ENOSPC is: the message says to free space."""
    for number in (errno.ENOSPC, errno.EDQUOT):
        error = files.write_error(OSError(number, os.strerror(number)), "/out/model.safetensors")
        assert isinstance(error, WriteError) and error.errno == number
        assert str(error).startswith("the disk is full: writing /out/model.safetensors failed"), error
    error = files.write_error(OSError(errno.EACCES, "Permission denied"), "/out/a")
    assert str(error) == "cannot write /out/a: Permission denied"


def test_an_error_of_a_write_keeps_its_message_in_another_kind_and_names_one_without_strerror():
    """A ``WriteError`` (a full disk met by ``write_text_atomic``) re-raised as a checkpoint's error keeps its message;
    an ``OSError`` raised without an errno (a library's own) is named with its text."""

    class Kind(WriteError):
        pass

    full = files.write_error(OSError(errno.ENOSPC, "No space left on device"), "/out/config.json")
    error = files.write_error(full, "/out", Kind)
    assert isinstance(error, Kind) and str(error) == str(full) and error.errno == errno.ENOSPC
    assert files.write_error(full, "/out") is full
    assert str(files.write_error(OSError("header too large"), "/out/a")) == "cannot write /out/a: header too large"


def test_an_interrupt_mid_write_leaves_the_old_text_and_no_temporary_file(tmp_path, monkeypatch):
    """Ctrl-C (a ``KeyboardInterrupt``, no ``Exception``) while the file is written removes the temporary file."""
    path = tmp_path / "results.json"
    write_text_atomic(path, "old\n")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, "new\n")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (errno.EACCES, r"cannot write .*/out\.json: Permission denied"),
        (errno.ENOSPC, r"disk is full: writing .*/out\.json"),
    ],
)
def test_a_temporary_file_that_cannot_be_created_is_a_write_error_naming_the_target(
    tmp_path, monkeypatch, code, message
):
    """Where the temporary file cannot be created (a folder this user cannot write, a full disk), the error names the
    file asked for, not the temporary one, and is not one from removing the file that was never made."""

    def refused(file, *args, **kwargs):
        raise OSError(code, os.strerror(code), os.fspath(file))

    monkeypatch.setattr(files, "open", refused, raising=False)
    with pytest.raises(WriteError, match=message) as failed:
        write_text_atomic(tmp_path / "out.json", "{}\n")
    assert failed.value.errno == code
    assert list(tmp_path.iterdir()) == []


def test_devices_are_written_in_place_and_files_and_folders_are_not(tmp_path):
    (tmp_path / "f").touch()
    assert files.in_place("/dev/null") and files.in_place("/dev/zero")
    assert not files.in_place(tmp_path / "f") and not files.in_place(tmp_path) and not files.in_place(tmp_path / "x")


def test_file_mode_without_proc_reads_the_umask_and_leaves_it_as_it_was(tmp_path, monkeypatch):
    def no_proc(*args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/proc/self/status")

    monkeypatch.setattr(files, "open", no_proc, raising=False)  # file_mode's own open: no /proc (macOS)
    umask = os.umask(0o027)
    try:
        assert file_mode() == 0o640
        assert os.umask(0o027) == 0o027  # still the process's umask
    finally:
        os.umask(umask)


def test_a_path_the_os_cannot_be_given_says_why_and_a_recorded_path_reads_as_utf8():
    """A lone surrogate (a JSON "\\ud800") fits no file name; in the C locale without UTF-8 mode a non-ASCII name does
    not fit either (a run of both is the locale's fault). ``path_text``: a name's bytes as UTF-8, a stray byte
    escaped."""
    assert files.unencodable("/data/été.png") is None
    said = files.unencodable("/data/\ud800.png")
    assert said == "'/data/\\ud800.png' holds the lone UTF-16 surrogate '\\ud800', which no file name can hold"
    code = "from kimivl.files import unencodable; print(ascii(unencodable('/d/\\xe9\\ud800')))"
    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("\"/d/\\xe9\\ud800 holds '\\xe9\\\\ud800', which the filesystem encoding (ascii) cannot")
    assert files.path_text("/d/\udcc3\udca9t\udce8") == "/d/ét\\xe8"  # how the C locale holds b"/d/\xc3\xa9t\xe8"


def test_a_directory_is_published_over_the_previous_one_and_a_stale_old_one_is_cleared(tmp_path):
    """A process killed after its first rename left ``.<name>.old``: the next publish clears it, not fails on it."""
    path = tmp_path / "split"
    for text in ("one", "two"):
        files.temporary_dir(path).mkdir()
        (files.temporary_dir(path) / "data.txt").write_text(text)
        (tmp_path / ".split.old").mkdir(exist_ok=True)
        (tmp_path / ".split.old" / "stale.txt").write_text("stale")
        files.publish_dir(path)
        assert (path / "data.txt").read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["split"]
