"""Reading benchmark files in their usual distribution formats, row by row.

- VLMEvalKit TSV: one row per question with an ``index`` column; images are base64 in an ``image`` column (a
  Python-list string of several base64 images for multi-image rows, or, to save space, the ``index`` of another
  row holding the same image).
- Parquet as published on dataset hubs: image columns are structs ``{"bytes": ..., "path": ...}``. A directory
  is read as all the parquet (or TSV/JSON) files below it, sorted. Needs ``pyarrow`` (``pip install kimivl[eval]``).
- JSON (a list of objects, or ``{"data": [...]}``) and JSONL, e.g. the original annotation files.

``Sample`` is a question ready for generation; ``Skipped`` a row that cannot be scored, with the reason.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from kimivl.data.formats import DataError, parse_json, parse_line

TABLE_SUFFIXES = (".tsv", ".parquet", ".json", ".jsonl")
Keep = Callable[[dict, Path], bool]  # whether a row (with its file) is one of the task's


@dataclass
class Sample:
    """One benchmark question: its row ``index``, the prompt as chat ``messages``, and what scoring needs."""

    index: Any
    messages: list[dict]
    meta: dict = field(default_factory=dict)


@dataclass
class Skipped:
    """A malformed row: reported with its index and reason, never scored."""

    index: Any
    reason: str


class RowError(ValueError):
    """Raised by a row parser for a malformed row; the loader turns it into ``Skipped``."""


OUTPUT_SUFFIXES = (".predictions.jsonl", ".scored.jsonl", ".run.json")


def is_eval_output(path: Path) -> bool:
    """A file kimivl eval (or another system) wrote: predictions, scores, results; never benchmark rows."""
    if path.name == "results.json" or path.name.endswith(OUTPUT_SUFFIXES):
        return True
    if path.suffix != ".jsonl":
        return False
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        row = json.loads(first)
    except (json.JSONDecodeError, RecursionError):  # not a predictions line: reading it as data says what is wrong
        return False
    return isinstance(row, dict) and "prediction" in row and "question" not in row


def index_key(index: Any) -> str:
    """A row's index as the runner matches rows and predictions by: its text, with a whole number written the same
    way however it was stored ("000", 0, "7.0" and 7.0 are "0" and "7"), as ``load_samples`` reads digit-only
    indices as integers while a predictions file may keep them as written."""
    text = str(index).strip()
    whole = re.fullmatch(r"([-+]?[0-9]+)(?:\.0*)?", text)
    return str(int(whole[1])) if whole else text


def table_files(path: str | os.PathLike) -> list[Path]:
    """``path`` itself, or every table file below a directory (sorted), less the files of predictions and scores
    found there (``*.predictions.jsonl``, ``*.scored.jsonl``, ``results.json``, or JSONL rows of predictions)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"benchmark data not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.suffix in TABLE_SUFFIXES and p.is_file() and not is_eval_output(p))
    if not files:
        raise FileNotFoundError(f"no {', '.join(TABLE_SUFFIXES)} files under {path}")
    return files


def _not_utf8(path: Path) -> DataError:
    """The ``DataError`` for a text file that is not UTF-8, naming its first line that is not (no byte of a UTF-8
    character is a line end, so each line decodes alone)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataError(f"{path}:{lineno}: not UTF-8 (byte {e.start + 1} of the line)")
    return DataError(f"{path}: not UTF-8")


def _tsv_rows(path: Path, keep: Keep | None, counted: Callable[[int], None]) -> Iterator[dict]:
    """The rows of a TSV file; the first pass (for the images other rows refer to) tells ``counted`` how many rows
    ``keep`` keeps."""
    csv.field_size_limit(sys.maxsize)

    def rows() -> Iterator[dict]:  # a byte-order mark (Excel, Notepad) must not become part of the first column's name
        with open(path, newline="", encoding="utf-8-sig") as f:
            try:
                yield from csv.DictReader(f, delimiter="\t")
            except UnicodeDecodeError:
                raise _not_utf8(path) from None

    refs, kept = set(), 0
    for r in rows():
        if 0 < len(r.get("image") or "") <= 64:
            refs.add(r["image"])
        kept += keep is None or bool(keep(r, path))
    counted(kept)
    shared = {r["index"]: r["image"] for r in rows() if r.get("index") in refs} if refs else {}
    for row in rows():
        if row.get("image") in refs:
            row["image"] = shared.get(row["image"], row["image"])
        yield row


def _parquet(path: Path):
    """``path`` opened as a ``pyarrow.parquet.ParquetFile``; an ``ImportError`` saying what to install without
    pyarrow."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading {path} needs pyarrow: pip install 'kimivl[eval]' (or pip install pyarrow)"
        ) from None
    return pq.ParquetFile(path)


def _parquet_rows(path: Path, keep: Keep | None, counted: Callable[[int], None]) -> Iterator[dict]:
    for batch in _parquet(path).iter_batches(batch_size=64):
        yield from batch.to_pylist()


def jsonl_objects(path: Path, lines: Iterable[bytes]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file's ``lines`` of bytes, split at b"\\n" only
    (str.splitlines would also split inside a JSON string holding U+2028, U+2029 or U+0085); a UTF-8 BOM before the
    first line is skipped (``parse_line``); a line that is not UTF-8, not JSON or not an object is a ``DataError``
    naming path:line."""
    for lineno, raw in enumerate(lines, 1):
        if raw.strip():
            yield lineno, parse_line(raw, f"{path}:{lineno}")


def _json_rows(path: Path, keep: Keep | None, counted: Callable[[int], None]) -> Iterator[dict]:
    """The rows of a JSONL file, or of a JSON file: parsed whole, it tells ``counted`` how many rows ``keep`` keeps."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            yield from (row for _, row in jsonl_objects(path, f))
        return
    data = parse_json(path.read_bytes(), str(path), "the file")
    rows = data.get("data", data.get("samples", data.get("annotations"))) if isinstance(data, dict) else data
    if type(rows) is not list:
        raise ValueError(f"{path}: expected a JSON list of rows (or an object with a 'data' list)")
    counted(sum(keep is None or bool(keep(r, path)) for r in rows))
    yield from rows


def _count(file: Path, keep: Keep | None) -> int | None:
    """How many rows of a table file ``keep`` keeps, where that is known before the rows are read: a parquet file's
    from its metadata (with ``keep``: from its columns less the binary and nested ones, such as images), a JSONL
    file's non-blank lines (with ``keep``: a first pass parsing each line, as a TSV file's reader makes one: seconds
    a gigabyte, next to minutes of generation); ``None`` for the rest, counted as they are read."""
    if file.suffix == ".parquet":
        table = _parquet(file)
        if keep is None:
            return table.metadata.num_rows
        import pyarrow as pa

        kinds = (pa.types.is_nested, pa.types.is_binary, pa.types.is_large_binary)
        flat = [f.name for f in table.schema_arrow if not any(kind(f.type) for kind in kinds)]
        return sum(bool(keep(row, file)) for row in table.read(columns=flat).to_pylist())
    if file.suffix == ".jsonl":
        with open(file, "rb") as f:
            if keep is None:
                return sum(1 for line in f if line.strip())
            return sum(bool(keep(row, file)) for _, row in jsonl_objects(file, f))
    return None


def iter_rows(
    path: str | os.PathLike, keep: Keep | None = None, counts: dict[Path, int | None] | None = None
) -> Iterator[tuple[Path, dict]]:
    """(file, row as a dict) for every row of every table file at ``path``. ``counts`` gets each file's number of
    rows that ``keep(row, file)`` keeps (all without it) as soon as it is known: a parquet or JSONL file's before any
    row is read (``_count``), a TSV file's once the reader's first pass over it is done, a JSON file's once it is
    parsed; ``None`` until then."""
    readers = {".tsv": _tsv_rows, ".parquet": _parquet_rows, ".json": _json_rows, ".jsonl": _json_rows}
    files = table_files(path)
    counts = {} if counts is None else counts
    counts.update((file, _count(file, keep)) for file in files)
    for file in files:
        if file.suffix not in readers:
            raise ValueError(f"{file}: unknown table format (expected one of {', '.join(TABLE_SUFFIXES)})")
        for row in readers[file.suffix](file, keep, partial(counts.__setitem__, file)):
            yield file, row


class Rows:
    """Rows read as they are iterated (``read(counts)`` makes a fresh iterator, filling ``counts`` as ``iter_rows``
    does), and ``total``: how many there are, ``None`` until every count is known."""

    def __init__(self, read: Callable[[dict], Iterator]):
        self._read, self._counts = read, {}

    def __iter__(self) -> Iterator:
        self._counts = {}
        return self._read(self._counts)

    @property
    def total(self) -> int | None:
        counts = list(self._counts.values())
        return sum(counts) if counts and None not in counts else None


def load_samples(
    path: str | os.PathLike, parse, index_keys: tuple[str, ...] = ("index",), keep: Keep | None = None
) -> Rows:
    """Apply ``parse(row, index, file) -> Sample`` to every row that ``keep(row, file)`` keeps (all without it); a
    row it cannot parse (``RowError``, a missing column, a value of the wrong kind, a number that overflows or
    divides by zero, an index out of range) becomes ``Skipped`` with the reason. The index is the first present
    column of ``index_keys``, else the row's position among all rows. Rows are read as they are iterated; the
    ``Rows``' ``total`` is known once every file's count is (``iter_rows``)."""
    return Rows(partial(_samples, path, parse, index_keys, keep))


def _samples(path, parse, index_keys, keep, counts) -> Iterator[Sample | Skipped]:
    for position, (file, row) in enumerate(iter_rows(path, keep, counts)):
        if keep is not None and not keep(row, file):
            continue
        index = next((row[k] for k in index_keys if row.get(k) not in (None, "")), position)
        index = int(index) if isinstance(index, str) and re.fullmatch(r"-?[0-9]+", index) else index
        try:
            sample = parse(row, index, file)
        except (LookupError, ValueError, TypeError, ArithmeticError) as e:
            reason = f"missing column {e}" if isinstance(e, KeyError) else str(e)
            if not isinstance(e, RowError):
                reason = f"{type(e).__name__}: {reason}"
            sample = Skipped(index, reason)
        yield sample


def present(value: Any) -> bool:
    """A cell that holds something (not None, NaN or an empty string)."""
    return not (value is None or value == "" or (isinstance(value, float) and math.isnan(value)))


def has_text(value: Any) -> bool:
    """Whether a cell holds text: a null, NaN or blank one does not (it must not become the prompt "None")."""
    return present(value) and bool(str(value).strip())


def text_cell(row: dict, *keys: str) -> str:
    """The text of the first of ``keys`` the row holds (``has_text``), as written; a ``RowError`` naming ``keys[0]``
    when none does."""
    for key in keys:
        if has_text(row.get(key)):
            return str(row[key])
    raise RowError(f"no {keys[0]}")


def literal_list(value: Any) -> list:
    """A list cell: a list already, or a Python/JSON list written as a string (a lone value is a list of one)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, RecursionError, MemoryError):  # the last two: nested or chained too deep
            raise RowError(f"cannot read {value[:60]!r} as a list") from None
        return list(parsed)
    return [value] if present(value) else []


def _decoded_image(value: str) -> bytes | None:
    """The bytes of ``value`` when it is base64 of an image (PIL knows its header), else ``None``."""
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.format  # noqa: B018  (the header was read)
    except (OSError, Image.DecompressionBombError, ValueError):
        return None
    return data


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long or with a NUL byte is no file
        return False


def image_bytes(value: Any, root: Path | None = None) -> bytes | str:
    """One image cell as bytes (base64 text, raw bytes or a ``{"bytes", "path"}`` struct) or as a file path
    (relative to ``root``). The content decides: a cell that is base64 of an image is that image, however short;
    otherwise it must name a file. Raises ``RowError`` (the row is skipped with the reason) when it is neither."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise RowError("no image")
    decoded = _decoded_image(value)
    if decoded is not None:
        return decoded
    if root is not None and _is_file(root / value):
        return str(root / value)
    if len(value) <= 64:
        raise RowError(f"image {value!r} is neither a file under {root} nor the index of a row with an image")
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RowError(f"image is neither base64 nor a file under {root}: {value[:40]!r}") from None
    raise RowError(f"image cell is base64 but not a readable image: {value[:40]!r}...")


def image_list(value: Any, root: Path | None = None) -> list[bytes | str]:
    """An image cell that may hold several images (a list, or a list written as a string)."""
    items = literal_list(value) if isinstance(value, (list, tuple)) or str(value).startswith("[") else [value]
    return [image_bytes(v, root) for v in items]


def image_size(image: bytes | str) -> tuple[int, int]:
    """(width, height) read from the image header; ``RowError`` for an unreadable image."""
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as img:
            return img.size
    except (OSError, Image.DecompressionBombError) as e:
        raise RowError(f"unreadable image: {e}") from None


def user_turn(images: list, text: str) -> list[dict]:
    """A one-turn conversation: the images, then the text."""
    return [
        {"role": "user", "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": text}]}
    ]
