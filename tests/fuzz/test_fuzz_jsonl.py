"""Generated JSONL data files: random bytes, random JSON, records of random structure. Reading them (streamed or
indexed) either works or is a DataError."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from kimivl.data.formats import DataError, iter_records, iter_texts
from kimivl.data.indexed import JsonlRecords
from tests.fuzz.common import case, expect, fuzz

SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.sampled_from(
        [
            "user",
            "assistant",
            "system",
            "text",
            "image",
            "video",
            "frames",
            "x.png",
            "../x.png",
            "/etc/passwd",
            "a\x00b",
            "é" * 300,
        ]
    ),
)
JSON = st.recursive(
    SCALAR,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "messages",
                    "role",
                    "content",
                    "type",
                    "text",
                    "image",
                    "video",
                    "frames",
                    "timestamps",
                    "id",
                    "meta",
                    "x",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)
LINE = st.one_of(
    JSON.map(json.dumps),
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    st.just(""),
)


@pytest.fixture(scope="module")
def folder():
    path = Path(tempfile.mkdtemp())
    Image.new("RGB", (8, 8)).save(path / "x.png")
    yield path
    shutil.rmtree(path)


def _read_all(path: Path, text: bool):
    items = list(iter_texts(path) if text else iter_records(path))
    indexed = JsonlRecords(path, text=text)
    assert len(indexed) == len(items) and list(indexed) == items
    return items


@fuzz(300)
@given(st.lists(LINE, max_size=4), st.booleans(), st.booleans())
def test_jsonl_files(folder, lines, text, raw_bytes):
    path = folder / "data.jsonl"
    if raw_bytes:
        path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    else:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    with case("jsonl: files"):
        expect(lambda: _read_all(path, text), DataError)


@fuzz(100)
@given(st.binary(max_size=200))
def test_random_bytes(folder, data):
    path = folder / "bytes.jsonl"
    path.write_bytes(data)
    with case("jsonl: random bytes"):
        expect(lambda: _read_all(path, False), DataError)
