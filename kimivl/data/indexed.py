"""Random access to the records of JSONL files without holding them in memory.

``JsonlRecords`` validates a file in one streaming pass and keeps only each record's byte offset (8 bytes a record,
against kilobytes for a parsed conversation); record i is read and parsed again when asked for, and ``where(i)``
gives its ``file:line`` (the lines before it are counted then, and the count of each MiB block of the file kept, so
that a later call counts within one block: errors and warnings are rare, and a table of line numbers would cost every
record 4 bytes more). ``Concat`` joins several such sequences into one. Training samples by index
(``Mixture``, the ViT stage, RL), so a source of millions of conversations costs its offsets, not its contents.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any

from kimivl.data.formats import DataError, iter_lines, parse_item, parse_line
from kimivl.progress import progress_bar

PROGRESS_BYTES = 1 << 26  # 64 MiB
LINE_BLOCK = 1 << 20  # bytes whose newlines ``where`` counts once and keeps


class JsonlRecords(Sequence):
    """The validated conversation records (or, with ``text``, the document texts) of a JSONL file, read on demand.

    ``keep(line number, item)`` chooses which records are indexed (all by default); ``transform`` is applied to each
    record read. Reading a record after the file's bytes have changed raises ``DataError``: its offsets no longer hold
    (a change of its metadata alone, as ``chmod`` or a hard link to it makes, is not one). With
    ``progress``, files of ``PROGRESS_BYTES`` or more show a progress bar while they are indexed."""

    def __init__(
        self,
        path: str | os.PathLike,
        text: bool,
        keep: Callable[[int, Any], bool] | None = None,
        transform: Callable[[Any], Any] | None = None,
        progress: bool = False,
    ):
        self.path, self.text, self.transform = Path(path), text, transform
        self._root = self.path.absolute().parent
        self._stamp = self._stat()
        self._offsets = array("q")
        self._newlines = [0]  # newlines before each block of LINE_BLOCK bytes counted so far
        with progress_bar(
            total=self._stamp[0],
            unit="B",
            unit_scale=True,
            desc=f"indexing {self.path.name}",
            disable=not progress or self._stamp[0] < PROGRESS_BYTES,
        ) as bar:
            for lineno, offset, item in iter_lines(self.path, text):
                bar.update(offset - bar.n)
                if keep is None or keep(lineno, item):
                    self._offsets.append(offset)
            bar.update(self._stamp[0] - bar.n)
        self._content = self._hash()

    def _stat(self) -> tuple[int, int, int]:
        """The file's size, mtime and ctime: no tool sets the ctime, so a file replaced or rewritten with the old size
        and mtime (``cp -p``, ``rsync -t``, ``touch -r``) shows. The inode and device numbers are left out: some FUSE
        mounts (rclone's) give an unchanged file a new inode number now and then."""
        st = os.stat(self.path)
        return st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def _hash(self) -> bytes:
        """A hash of the file's bytes (at about 0.7 GB/s, beside indexing's JSON parsing): whether a file whose ctime
        alone moved holds the same bytes."""
        h = hashlib.blake2b(digest_size=16)
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.digest()

    def __len__(self) -> int:
        return len(self._offsets)

    def digest(self) -> str:
        """A fingerprint of the records as indexed: a hash of their byte offsets and the file's size, so of each
        record's length in bytes, in order (a copy of the file has the same; a second read of the file is not needed:
        the index is in memory, 8 MB per million records, hashed in milliseconds). Records added, removed, reordered or
        edited to another length change it; an edit that keeps every record's length does not."""
        h = hashlib.blake2b(memoryview(self._offsets).cast("B"), digest_size=16)
        h.update(self._stamp[0].to_bytes(8, "little"))
        return h.hexdigest()

    def _unchanged(self) -> None:
        try:
            stamp = self._stat()
        except OSError as e:  # deleted, renamed away or unmounted since it was indexed
            raise DataError(f"{self.path} cannot be read since it was indexed ({e.strerror}); restore it") from None
        if stamp == self._stamp:
            return
        if stamp[:2] == self._stamp[:2] and self._hash() == self._content:  # chmod, chown, a hard link: the same bytes
            self._stamp = stamp
            return
        raise DataError(f"{self.path} changed after it was indexed; load the data source again")

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        offset = self._offsets[i]
        self._unchanged()
        where = f"{self.path} at byte {offset}"
        with open(self.path, "rb") as f:
            f.seek(offset)
            obj = parse_line(f.readline(), where)
        item = parse_item(obj, self.text, self._root, where)
        return item if self.transform is None else self.transform(item)

    def offset(self, i: int) -> int:
        """Where record ``i`` starts in the file, in bytes: with the file's resolved path, which record it is."""
        return self._offsets[i]

    def holds(self, offset: int) -> bool:
        """Whether the record starting at byte ``offset`` is one of these (``keep`` may have left it out)."""
        k = bisect_left(self._offsets, offset)
        return k < len(self._offsets) and self._offsets[k] == offset

    def where(self, i: int) -> str:
        """``file:line`` of record ``i`` (1-based line, counting blank lines and records left out by ``keep``)."""
        offset = self._offsets[i]
        self._unchanged()
        block, rest = divmod(offset, LINE_BLOCK)
        counts = self._newlines  # extended on a copy, swapped in whole: threads asking at once each see one that holds
        with open(self.path, "rb") as f:
            if len(counts) <= block:
                counts = list(counts)
                f.seek((len(counts) - 1) * LINE_BLOCK)
                while len(counts) <= block:
                    counts.append(counts[-1] + f.read(LINE_BLOCK).count(b"\n"))
                self._newlines = counts
            f.seek(block * LINE_BLOCK)
            line = counts[block] + f.read(rest).count(b"\n") + 1
        return f"{self.path}:{line}"


class Concat(Sequence):
    """Sequences joined end to end, indexed without copying them."""

    def __init__(self, parts: Sequence[Sequence]):
        self.parts = list(parts)
        self._ends = list(accumulate(len(p) for p in self.parts))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        part, k = self.find(i)
        return self.parts[part][k]

    def find(self, i: int) -> tuple[int, int]:
        """Which part item ``i`` is in, and its index there."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i %= len(self)
        part = bisect_right(self._ends, i)
        return part, i - (self._ends[part - 1] if part else 0)

    def where(self, i: int) -> str:
        """Where item ``i`` comes from (``locate`` in its part)."""
        part, k = self.find(i)
        return locate(self.parts[part], k)


def locate(items: Sequence, i: int) -> str:
    """Where item ``i`` of ``items`` is: ``file:line`` for ``JsonlRecords`` (and a ``Concat`` of them), else
    ``record i + 1``."""
    return items.where(i) if hasattr(items, "where") else f"record {i + 1}"
