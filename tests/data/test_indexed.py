import json
import os
import re
import threading

import pytest
from PIL import Image

from kimivl.data.formats import DataError, iter_records, iter_texts, write_records
from kimivl.data.indexed import Concat, JsonlRecords, locate
from tests.midway import Midway


def _conversations(tmp_path, n=7):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (28, 28), (200, 10, 10)).save(tmp_path / "img" / "a.png")
    records = [
        {
            "id": i,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": "img/a.png"}, {"type": "text", "text": f"q{i} é"}],
                },
                {"role": "assistant", "content": f"◁think▷step◁/think▷{i}"},
            ],
            "meta": {"difficulty": "easy" if i % 2 else "hard"},
        }
        for i in range(n)
    ]
    path = tmp_path / "conv.jsonl"
    write_records(path, records)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("\n" + "".join(lines[:3]) + "\n  \n" + "".join(lines[3:]), encoding="utf-8")  # blank lines
    return path


def test_records_are_those_the_stream_gives_in_order(tmp_path):
    path = _conversations(tmp_path)
    records = JsonlRecords(path, text=False)
    streamed = list(iter_records(path))
    assert len(records) == 7 and list(records) == streamed
    assert records[-1] == streamed[-1] and records[2:5] == streamed[2:5] and records[::3] == streamed[::3]
    assert records[0]["messages"][0]["content"][0]["image"] == str((tmp_path / "img" / "a.png").resolve())
    with pytest.raises(IndexError):
        records[7]


def test_texts_and_line_numbers(tmp_path):
    path = tmp_path / "t.jsonl"
    texts = ["first", "second, with\nnewline", "third ü"]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + "\n", encoding="utf-8")
    seen = []
    docs = JsonlRecords(path, text=True, keep=lambda lineno, t: seen.append(lineno) or t != "second, with\nnewline")
    assert seen == [1, 2, 3] and list(docs) == ["first", "third ü"] and list(iter_texts(path)) == texts


def test_line_numbers_count_across_the_blocks_kept_in_any_order(tmp_path, monkeypatch):
    """``where`` keeps each block's count of newlines (a warning per skipped sample would otherwise read the file up
    to its record every time): every record's line is right, asked in any order, whatever the block size."""
    import kimivl.data.indexed as indexed

    path = _conversations(tmp_path, n=12)
    raw = path.read_bytes()
    starts = [k for k, line in enumerate(raw.split(b"\n"), 1) if line.strip()]
    for block in (7, 64, 300, 1 << 20):
        monkeypatch.setattr(indexed, "LINE_BLOCK", block)
        records = JsonlRecords(path, text=False)
        for i in (11, 3, 0, 7, 11, 1):
            assert records.where(i) == f"{path}:{starts[i]}"
        ascending = JsonlRecords(path, text=False)  # each record in the block after the last one counted, or in it
        assert [ascending.where(i) for i in range(12)] == [f"{path}:{line}" for line in starts]


def test_the_digest_follows_each_records_length_in_order(tmp_path):
    """A copy of the file has the same digest; a record edited to another length (the last one included: the file's
    size counts its end) changes it."""
    path = tmp_path / "t.jsonl"
    texts = ["alpha", "beta", "gamma"]

    def digest(docs, name="t.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
        return JsonlRecords(tmp_path / name, text=True).digest()

    first = digest(texts)
    assert path.exists() and digest(texts, "copy.jsonl") == first and len(first) == 32
    assert digest(["alpha", "beta", "gammas"]) != first  # the last record longer
    assert digest(["alpha", "betas", "gamm"]) != first  # two records, the file's size the same


def test_holds_tells_the_records_kept_by_their_offsets(tmp_path):
    path = _conversations(tmp_path)
    every = JsonlRecords(path, text=False)
    easy = JsonlRecords(path, text=False, keep=lambda _, r: r["meta"]["difficulty"] == "easy")
    offsets = [every.offset(i) for i in range(7)]
    assert [easy.offset(i) for i in range(3)] == offsets[1:7:2]
    assert [easy.holds(o) for o in offsets] == [False, True, False, True, False, True, False]
    assert all(every.holds(o) for o in offsets)
    assert not every.holds(offsets[1] - 1) and not every.holds(offsets[-1] + 1) and not easy.holds(path.stat().st_size)


def test_keep_and_transform(tmp_path):
    path = _conversations(tmp_path)
    easy = JsonlRecords(
        path,
        text=False,
        keep=lambda _, r: r["meta"]["difficulty"] == "easy",
        transform=lambda r: r["messages"][-1]["content"][-1],
    )
    assert list(easy) == ["1", "3", "5"]


def test_a_bad_line_is_named_when_indexing(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        JsonlRecords(path, text=True)
    path.write_bytes(b'{"text": "ok"}\n\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: not UTF-8"):
        JsonlRecords(path, text=True)
    path.write_bytes(b'{"text": "ok"}\n{"messages": []}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: a conversation in a file of text documents"):
        JsonlRecords(path, text=True)
    path.write_bytes(b'{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: a text record needs a string 'text'"):
        JsonlRecords(path, text=True)


def test_a_file_changed_after_indexing_is_refused(tmp_path):
    path = _conversations(tmp_path)
    records = JsonlRecords(path, text=False)
    assert records[1]["id"] == 1
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n")
    with pytest.raises(DataError, match="changed after it was indexed"):
        records[1]
    assert JsonlRecords(path, text=False)[1]["id"] == 1  # indexed again, it reads


def test_an_edit_that_keeps_the_size_is_refused_too(tmp_path):
    path = _conversations(tmp_path)
    records = JsonlRecords(path, text=False)
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    path.write_text(path.read_text(encoding="utf-8").replace('"q1 é"', '"q9 é"'), encoding="utf-8")
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # a later write, whatever the clock's resolution
    assert path.stat().st_size == size
    with pytest.raises(DataError, match="changed after it was indexed"):
        records[1]


def _next_tick(tmp_path, st: os.stat_result) -> None:
    """Wait until a change gets a later ctime than ``st``'s: timestamps are coarse (a clock tick or more)."""
    tick = tmp_path / "tick"
    tick.touch()
    while tick.stat().st_ctime_ns <= st.st_ctime_ns:
        tick.touch()


@pytest.mark.parametrize("how", ["chmod", "hard link", "same bytes renamed over"])
def test_a_change_of_metadata_alone_is_no_change(tmp_path, how, monkeypatch):
    """With the ctime in the stamp, a ``chmod -R g+r data/`` or a backup hard-linking the file (``cp -al``,
    rsnapshot) stopped a training run as if the data had changed: a moved ctime now has the bytes compared, once (the
    new stamp is kept: hashing the file at every read would cost a pass over it per record)."""
    path = _conversations(tmp_path)
    records = JsonlRecords(path, text=False)
    want, where = records[1], records.where(1)
    st = path.stat()
    _next_tick(tmp_path, st)
    if how == "chmod":
        path.chmod(0o640)
    elif how == "hard link":
        os.link(path, tmp_path / "snapshot.jsonl")
    else:
        copy = tmp_path / "copy.jsonl"
        copy.write_bytes(path.read_bytes())
        os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(copy, path)
    assert path.stat().st_ctime_ns != st.st_ctime_ns
    hashed, real = [], JsonlRecords._hash
    monkeypatch.setattr(JsonlRecords, "_hash", lambda self: hashed.append(1) or real(self))
    for _ in range(3):
        assert records[1] == want and records.where(1) == where
    assert len(hashed) == 1


@pytest.mark.parametrize("how", ["in place", "renamed over"])
def test_a_same_size_file_with_the_old_mtime_is_refused(tmp_path, how):
    """Other content of the same size with the old mtime copied (``cp -p`` onto the file, or ``rsync -t`` and
    ``os.replace`` of a new one) was read silently: the check compared the size and mtime only."""
    path = _conversations(tmp_path)
    records = JsonlRecords(path, text=False)
    st = path.stat()
    _next_tick(tmp_path, st)
    other = path.read_bytes().replace(b'"q1 ', b'"q9 ')
    new = path if how == "in place" else tmp_path / "new.jsonl"
    new.write_bytes(other)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    if how == "renamed over":
        os.replace(new, path)
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.raises(DataError, match="changed after it was indexed"):
        records[1]
    assert JsonlRecords(path, text=False)[1]["messages"][0]["content"][1]["text"] == "q9 é"  # indexed again, it reads


def test_a_file_removed_after_it_was_indexed_is_named(tmp_path):
    """A FileNotFoundError from ``os.stat`` came out of reading a record, not the data's own error."""
    path = _conversations(tmp_path)
    records = JsonlRecords(path, text=False)
    path.rename(tmp_path / "elsewhere.jsonl")
    message = f"{path} cannot be read since it was indexed (No such file or directory)"
    with pytest.raises(DataError, match=re.escape(message)):
        records[1]
    with pytest.raises(DataError, match="cannot be read since it was indexed"):
        records.where(1)


def test_a_file_that_cannot_be_stated_since_it_was_indexed_is_named(tmp_path):
    """Any error of ``os.stat`` (here ELOOP, a symlink made a loop), not a missing file alone, is the data's error."""
    real = _conversations(tmp_path)
    path = tmp_path / "link.jsonl"
    path.symlink_to(real)
    records = JsonlRecords(path, text=False)
    assert records[1]["id"] == 1
    path.unlink()
    path.symlink_to(path.name)  # a link to itself
    message = f"{path} cannot be read since it was indexed (Too many levels of symbolic links)"
    with pytest.raises(DataError, match=re.escape(message)):
        records[1]


def test_concat_indexes_across_parts():
    joined = Concat([[0, 1, 2], [], [3], [4, 5]])
    assert len(joined) == 6 and list(joined) == [0, 1, 2, 3, 4, 5]
    assert joined[-1] == 5 and joined[-6] == 0 and joined[3] == 3 and joined[1:5] == [1, 2, 3, 4]
    for bad in (6, -7):
        with pytest.raises(IndexError, match="out of range for 6 items"):
            joined[bad]
    assert len(Concat([])) == 0 and list(Concat([])) == []


def test_where_names_a_file_line_or_a_record_number(tmp_path):
    path = _conversations(tmp_path, n=2)  # a blank line, then the records on lines 2 and 3
    joined = Concat([JsonlRecords(path, text=False), ["a", "b"]])
    assert [joined.where(i) for i in range(4)] == [f"{path}:2", f"{path}:3", "record 1", "record 2"]
    assert locate(["x"], 0) == "record 1"


def test_where_asked_from_two_threads_at_once_keeps_its_line_counts(tmp_path, monkeypatch):
    """The table of newlines per block was extended in place: a second thread's where() midway through the first's
    count left entries out of step, and every later where() named a wrong line."""
    from kimivl.data import indexed

    path = _conversations(tmp_path)
    want = [JsonlRecords(path, text=False).where(i) for i in range(7)]
    records = JsonlRecords(path, text=False)
    monkeypatch.setattr(indexed, "LINE_BLOCK", 16)  # many blocks to count
    midway, real_open = Midway(), open

    class Pausing:  # the other thread's file stops at its third block
        def __init__(self, f):
            self.f, self.reads = f, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def seek(self, n):
            return self.f.seek(n)

        def read(self, n):
            self.reads += 1
            if self.reads == 3 and threading.current_thread() is not threading.main_thread():
                midway.stop()
            return self.f.read(n)

    monkeypatch.setattr(indexed, "open", lambda p, mode: Pausing(real_open(p, mode)), raising=False)
    assert midway.run(lambda: records.where(6), lambda: records.where(3)) == (want[6], want[3])
    assert [records.where(i) for i in range(7)] == want


def test_large_files_show_indexing_progress(tmp_path, monkeypatch, capsys):
    from kimivl.data import indexed

    path = _conversations(tmp_path)
    JsonlRecords(path, text=False, progress=True)
    assert "indexing" not in capsys.readouterr().err  # under PROGRESS_BYTES: quiet
    monkeypatch.setattr(indexed, "PROGRESS_BYTES", 0)
    records = JsonlRecords(path, text=False, progress=True)
    err = capsys.readouterr().err
    assert "indexing conv.jsonl" in err and "100%" in err and len(records) == 7
    JsonlRecords(path, text=False)
    assert "indexing" not in capsys.readouterr().err  # progress off
