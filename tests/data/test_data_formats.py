import json
from pathlib import Path

import pytest
from PIL import Image

from kimivl.data.formats import DataError, is_text_file, iter_records, iter_texts, write_records


@pytest.fixture()
def media(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (28, 28), "red").save(tmp_path / "img" / name)
    (tmp_path / "clip.mp4").write_bytes(b"not really a video; only its existence is checked")
    return tmp_path


GOOD = {
    "id": "x/1",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "img/a.png"},
                {"type": "text", "text": "What is it?"},
                {"type": "video", "frames": ["img/b.png", "img/c.png"], "timestamps": [0, 1.5]},
                {"type": "video", "video": "clip.mp4"},
            ],
        },
        {"role": "assistant", "content": "A square."},
    ],
    "meta": {"task": "t", "gold": 3},
}


def test_round_trip_resolves_paths_and_writes_them_back_relative(media):
    src = media / "data.jsonl"
    assert write_records(src, [GOOD, {"messages": [{"role": "user", "content": "hi"}]}]) == 2
    records = list(iter_records(src))
    user = records[0]["messages"][1]["content"]
    assert user[0]["image"] == str(media / "img" / "a.png")
    assert user[2]["frames"] == [str(media / "img" / "b.png"), str(media / "img" / "c.png")]
    assert user[3]["video"] == str(media / "clip.mp4")
    assert records[0]["meta"] == GOOD["meta"] and records[0]["id"] == "x/1"
    copy = media / "copy.jsonl"
    write_records(copy, records)
    assert copy.read_bytes() == src.read_bytes()


def test_absolute_paths_outside_the_folder_stay_absolute(media, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere") / "d.jsonl"
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": str(media / "img" / "a.png")}]}]}
    write_records(other, [record])
    assert json.loads(other.read_text())["messages"][0]["content"][0]["image"] == str(media / "img" / "a.png")
    assert next(iter_records(other))["messages"][0]["content"][0]["image"] == str(media / "img" / "a.png")


def _user(*parts):
    return json.dumps({"messages": [{"role": "user", "content": list(parts)}]})


MALFORMED = {
    "invalid JSON": ('{"messages": [', "invalid JSON"),
    "not an object": ("[1, 2]", "must be a JSON object"),
    "no messages": ('{"id": "a"}', "missing 'messages'"),
    "empty messages": ('{"messages": []}', "missing 'messages'"),
    "message not an object": ('{"messages": ["hi"]}', "message 0: a message must be an object"),
    "bad role": ('{"messages": [{"role": "robot", "content": "hi"}]}', "message 0: bad role 'robot'"),
    "no content": ('{"messages": [{"role": "user"}]}', "'content' must be a string or a non-empty list"),
    "empty content": (_user(), "'content' must be a string or a non-empty list"),
    "part not an object": (_user("hi"), "part 0: a content part must be an object"),
    "unknown part": (_user({"type": "audio", "audio": "a.wav"}), "part 0: unknown part type 'audio'"),
    "text without text": (_user({"type": "text", "txt": "hi"}), "text part needs a string 'text'"),
    "image without path": (_user({"type": "image"}), "media path must be a non-empty string"),
    "missing image file": (_user({"type": "image", "image": "img/nope.png"}), "media file 'img/nope.png' not found"),
    "missing video file": (_user({"type": "video", "video": "nope.mp4"}), "media file 'nope.mp4' not found"),
    "video and frames": (_user({"type": "video", "video": "clip.mp4", "frames": ["img/a.png"]}), "exactly one of"),
    "empty frames": (_user({"type": "video", "frames": []}), "'frames' must be a non-empty list"),
    "missing frame": (
        _user({"type": "video", "frames": ["img/a.png", "img/x.png"]}),
        "frame 1: media file 'img/x.png'",
    ),
    "timestamp count": (
        _user({"type": "video", "frames": ["img/a.png"], "timestamps": [0, 1]}),
        "'timestamps' must be 1",
    ),
    "timestamps backwards": (
        _user({"type": "video", "frames": ["img/a.png", "img/b.png"], "timestamps": [1, 0]}),
        "non-decreasing",
    ),
    "boolean timestamp": (
        _user({"type": "video", "frames": ["img/a.png", "img/b.png"], "timestamps": [0, True]}),
        "non-decreasing finite numbers",
    ),
    "bad id": ('{"id": [1], "messages": [{"role": "user", "content": "hi"}]}', "'id' must be"),
    "bad meta": ('{"meta": 3, "messages": [{"role": "user", "content": "hi"}]}', "'meta' must be an object"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_record_names_file_and_line(media, case):
    line, message = MALFORMED[case]
    path = media / "bad.jsonl"
    good = json.dumps(GOOD)
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
    records = iter_records(path)
    assert next(records)["id"] == "x/1"  # streamed: the good first line is read before the bad one
    with pytest.raises(DataError, match=r"bad\.jsonl:3: ") as err:
        next(records)
    assert message in str(err.value)
    assert str(err.value).startswith(f"{path}:3: ")


def test_texts_stream_and_name_the_bad_line(tmp_path):
    path = tmp_path / "text.jsonl"
    write_records(path, [{"text": "one\n\ntwo"}, {"id": 2, "text": "three"}])
    assert list(iter_texts(path)) == ["one\n\ntwo", "three"]
    path.write_text('{"text": "ok"}\n{"body": "no text key"}\n', encoding="utf-8")
    with pytest.raises(
        DataError, match=r"text\.jsonl:2: neither a conversation .* nor a text document .*; its keys are \['body'\]"
    ):
        list(iter_texts(path))
    path.write_text('{"mesages": [], "id": 1}\n', encoding="utf-8")  # a typo in the first record: no kind to judge
    with pytest.raises(DataError, match=r"text\.jsonl:1: neither a conversation .*; its keys are \['id', 'mesages'\]"):
        is_text_file(path)
    path.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"text\.jsonl:2: invalid JSON \(Expecting value at column 1\)"):
        list(iter_texts(path))
    path.write_text('{"text": "ok}\n', encoding="utf-8")  # json's message ends in "at": said once
    with pytest.raises(DataError, match=r"text\.jsonl:1: invalid JSON \(Invalid control character at column 14\)$"):
        list(iter_texts(path))


def test_a_byte_order_mark_before_the_first_record_is_skipped(tmp_path):
    """Files saved by some editors start with a UTF-8 BOM: the first record was 'invalid JSON'."""
    from kimivl.data.indexed import JsonlRecords

    path = tmp_path / "bom.jsonl"
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(chat) + "\n").encode() * 2)
    assert [r["messages"][1]["content"] for r in iter_records(path)] == ["Hello."] * 2
    assert not is_text_file(path) and JsonlRecords(path, text=False)[0]["messages"][0]["content"] == "Hi"


def test_a_lone_surrogate_is_an_error_naming_file_and_line(tmp_path):
    """JSON may escape half of a UTF-16 pair alone ("\\ud800"): that passed validation, then broke tokenizer training
    naming no file (or became U+FFFD when encoded)."""
    from kimivl.data.indexed import JsonlRecords

    path = tmp_path / "text.jsonl"
    path.write_text(
        '{"text": "pair \\ud83d\\ude00 and \\\\ud800 as text", "n": [1, null, 2.5]}\n\n{"text": "bad \\uD800 x"}\n',
        encoding="utf-8",
    )
    texts = iter_texts(path)
    # a whole pair, and an escaped backslash, are text; numbers and nulls beside them are checked for nothing
    assert next(texts) == "pair \U0001f600 and \\ud800 as text"
    with pytest.raises(DataError, match=r"text\.jsonl:3: a string holds a lone surrogate '\\ud800'"):
        next(texts)
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"}]}
    path.write_text(json.dumps(chat) + "\n", encoding="utf-8")
    records = JsonlRecords(path, text=False)
    path.write_text(json.dumps(chat).replace("ok", "\\udfff"), encoding="utf-8")  # same size: read again, by offset
    records._stamp = records._stat()
    with pytest.raises(DataError, match=r"text\.jsonl at byte 0: a string holds a lone surrogate '\\udfff'"):
        records[0]


def test_media_paths_of_a_linked_file_are_relative_to_the_link(media, tmp_path_factory):
    """A JSONL file that is a symbolic link (a Hugging Face snapshot links each file to a blob elsewhere) names its
    media relative to the link's folder; they were looked for beside its target."""
    from kimivl.data.indexed import JsonlRecords

    store = tmp_path_factory.mktemp("blobs") / "0123abcd"
    store.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "img/a.png"}]}]}))
    (media / "linked.jsonl").symlink_to(store)
    expected = str(media / "img" / "a.png")
    assert next(iter_records(media / "linked.jsonl"))["messages"][0]["content"][0]["image"] == expected
    assert JsonlRecords(media / "linked.jsonl", text=False)[0]["messages"][0]["content"][0]["image"] == expected
    with pytest.raises(DataError, match=f"media file 'img/a.png' not found \\(looked for {store.parent}"):
        next(iter_records(store))


def test_equal_timestamps_are_non_decreasing(media):
    """Two frames at the same second (a repeated frame) are allowed: timestamps must not go back, only."""
    path = media / "same.jsonl"
    frames = {"type": "video", "frames": ["img/a.png", "img/b.png", "img/c.png"], "timestamps": [0, 2, 2]}
    path.write_text(_user(frames) + "\n", encoding="utf-8")
    assert next(iter_records(path))["messages"][0]["content"][0]["timestamps"] == [0, 2, 2]


def test_a_media_name_the_filesystem_encoding_cannot_encode_is_named_so(media, ascii_filesystem):
    """Under LANG=C without Python's UTF-8 mode (an ASCII filesystem encoding) an existing img/картинка 0.png was
    reported 'not found': Path.is_file says False for a name it cannot encode."""
    Image.new("RGB", (28, 28), "red").save(media / "img" / "картинка 0.png")
    image = {"type": "image", "image": "img/картинка 0.png"}
    record = {"messages": [{"role": "user", "content": [image]}, {"role": "assistant", "content": "red"}]}
    (media / "d.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    imports = "from kimivl.data.formats import DataError, iter_records"
    encoding, said, stderr = ascii_filesystem(
        imports, "list(iter_records(sys.argv[1]))", "DataError", str(media / "d.jsonl")
    )
    assert said == [
        ascii(
            f"{media / 'd.jsonl'}:1: message 0, part 0: media file {media / 'img' / 'картинка 0.png'} holds "
            f"'картинка', which the filesystem encoding ({encoding}) cannot encode: run with PYTHONUTF8=1, or in a "
            "UTF-8 locale (LANG=C.UTF-8)"
        )
    ], stderr
