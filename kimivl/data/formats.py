"""On-disk data formats: JSONL conversations and JSONL text documents.

Conversations: one JSON object per line (blank lines are skipped)::

    {"id": "train/caption/000007",                                  # optional, str or int
     "messages": [{"role": "user", "content": [
                      {"type": "image", "image": "images/caption/000007.png"},
                      {"type": "text", "text": "How many red circles are there?"}]},
                  {"role": "assistant", "content": "2"}],
     "meta": {"task": "caption", "difficulty": "easy", "gold": 2}}   # optional, a JSON object

``role`` is ``system``, ``user`` or ``assistant``; ``content`` is a string or a non-empty list of parts:
``{"type": "text", "text": str}``, ``{"type": "image", "image": path}``, ``{"type": "video", "video": path}``
(an encoded file, e.g. mp4) or ``{"type": "video", "frames": [path, ...], "timestamps": [seconds, ...]}``
(pre-sampled frames; timestamps optional, same length, non-decreasing, finite seconds >= 0). Media paths are relative
to the directory the JSONL file is named in (for a symbolic link, the link's folder, not its target's: a Hugging Face
snapshot links each file to a blob elsewhere), or absolute, and must exist. ``iter_records`` yields records with
media paths made absolute; ``write_records`` writes paths inside the file's directory back as relative ones.

Text (for language pre-training and tokenizer training): one JSON object per line with a string ``"text"``
key holding a whole document (newlines escaped by JSON); other keys are free-form. Read with ``iter_texts``.

Every malformed line (a lone UTF-16 surrogate escaped in a string included) raises ``DataError`` naming the file and
1-based line number. Both readers stream.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

from kimivl.files import unencodable
from kimivl.finite import finite
from kimivl.processing.chat_template import ROLES, part_type

# A line that may hold a lone surrogate (only a JSON escape puts one into valid UTF-8): an escaped high half not
# followed by an escaped low half, a low half not preceded by a high one, or "ud" after two backslashes (an escaped
# backslash: the "\\ud83d" after it is text, so a low half after that is alone). A whole pair is text, not checked.
LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
    rb"|\\u[dD][c-fC-F](?<!\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F])"
    rb"|\\\\u[dD]"
)


class DataError(ValueError):
    """Malformed or unusable data; the message starts with where: ``file:line:``, the file and byte offset of an
    indexed record, or the mixture's sample."""


def _lines(path: Path) -> Iterator[tuple[int, int, Any]]:
    """Yield (line number, byte offset, parsed JSON object) for each non-blank line of ``path``."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if raw.strip():
                yield lineno, start, parse_line(raw, f"{path}:{lineno}")


def parse_json(raw: bytes, where: str, text: str = "the line") -> Any:
    """JSON ``text`` (UTF-8 bytes; the byte-order mark some editors put first is skipped) as a value; a ``DataError``
    starting with ``where`` (``file:line``, or a file) when it is not UTF-8, not JSON, or nested too deeply."""
    try:
        return json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 (byte {e.start + 1} of {text})") from None
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        # some of json's messages end in "at" ("Unterminated string starting at"): said once
        raise DataError(f"{where}: invalid JSON ({e.msg.removesuffix(' at')} at {at})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read") from None


def parse_line(raw: bytes, where: str) -> dict:
    """One JSONL line (``parse_json``) as a JSON object."""
    obj = parse_json(raw, where)
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    if LONE_SURROGATE.search(raw):
        _check_unicode(obj, where)
    return obj


def _check_unicode(value: Any, where: str) -> None:
    """A ``DataError`` for a string of ``value`` (keys included) that holds a lone surrogate (``\\ud800`` escaped
    without its pair): no text, it would break tokenizer training or become U+FFFD when encoded."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, where)
            _check_unicode(item, where)
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item, where)
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(
                f"{where}: a string holds a lone surrogate {ascii(value[e.start])} (half of a UTF-16 pair without "
                f"the other) at character {e.start + 1} of {ascii(value[max(0, e.start - 20) : e.start + 20])}: "
                "not text; fix or remove it"
            ) from None


def _media(value: Any, root: Path, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: a media path must be a non-empty string, got {value!r}")
    path = root / value
    if why := unencodable(path):
        raise DataError(f"{where}: media file {why}")
    try:
        found = path.is_file()
    except (OSError, ValueError) as e:  # a NUL byte, a name too long for the filesystem
        raise DataError(f"{where}: bad media path {value!r:.80}: {e}") from None
    if not found:
        raise DataError(f"{where}: media file {value!r} not found (looked for {path})")
    return str(path)


def _part(part: Any, root: Path, where: str) -> dict:
    kind = part_type(part, where, DataError)
    if kind == "text":
        return part
    if kind == "image":
        return {**part, "image": _media(part.get("image"), root, where)}
    if ("video" in part) == ("frames" in part):
        raise DataError(f"{where}: a video part needs exactly one of 'video' (a file) or 'frames' (a list)")
    if "video" in part:
        return {**part, "video": _media(part["video"], root, where)}
    frames = part["frames"]
    if not isinstance(frames, list) or not frames:
        raise DataError(f"{where}: 'frames' must be a non-empty list of image paths")
    out = {**part, "frames": [_media(f, root, f"{where}, frame {k}") for k, f in enumerate(frames)]}
    times = part.get("timestamps")
    if times is not None:
        ok = (
            isinstance(times, list)
            and len(times) == len(frames)
            and all(isinstance(t, (int, float)) and not isinstance(t, bool) and finite(t) and t >= 0 for t in times)
        )
        if not ok or any(b < a for a, b in pairwise(times)):
            raise DataError(
                f"{where}: 'timestamps' must be {len(frames)} non-decreasing finite numbers of seconds "
                ">= 0 (one per frame)"
            )
    return out


def _message(msg: Any, root: Path, where: str) -> dict:
    if not isinstance(msg, dict):
        raise DataError(f"{where}: a message must be an object with 'role' and 'content'")
    if msg.get("role") not in ROLES:
        raise DataError(f"{where}: bad role {msg.get('role')!r} (expected one of {', '.join(ROLES)})")
    content = msg.get("content")
    if isinstance(content, str):
        return msg
    if not isinstance(content, list) or not content:
        raise DataError(f"{where}: 'content' must be a string or a non-empty list of parts")
    return {**msg, "content": [_part(p, root, f"{where}, part {j}") for j, p in enumerate(content)]}


def parse_record(obj: Any, root: str | os.PathLike, where: str = "record") -> dict:
    """Validate one conversation record; return a copy with media paths resolved against ``root``."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: missing 'messages' (a non-empty list)")
    if "id" in obj and not isinstance(obj["id"], (str, int)):
        raise DataError(f"{where}: 'id' must be a string or an integer")
    if "meta" in obj and not isinstance(obj["meta"], dict):
        raise DataError(f"{where}: 'meta' must be an object")
    root = Path(root)
    return {**obj, "messages": [_message(m, root, f"{where}: message {i}") for i, m in enumerate(messages)]}


def parse_text(obj: dict, where: str = "record") -> str:
    """The ``"text"`` of one text document."""
    if "text" not in obj and "messages" in obj:
        raise DataError(
            f"{where}: a conversation in a file of text documents (judged by its first record): a file holds one "
            "kind of record"
        )
    if "text" not in obj:
        raise DataError(_neither(obj, where))
    if not isinstance(obj["text"], str):
        raise DataError(f"{where}: a text record needs a string 'text'")
    return obj["text"]


def _neither(obj: dict, where: str) -> str:
    return (
        f"{where}: neither a conversation (a 'messages' list) nor a text document (a string 'text'); its keys are "
        f"{sorted(obj)}"
    )


def parse_item(obj: dict, text: bool, root: str | os.PathLike, where: str = "record") -> dict | str:
    """A validated conversation record (media paths resolved against ``root``) or, with ``text``, a document's
    text."""
    return parse_text(obj, where) if text else parse_record(obj, root, where)


def iter_lines(path: str | os.PathLike, text: bool) -> Iterator[tuple[int, int, dict | str]]:
    """Stream (line number, byte offset, item) over a JSONL file: validated conversation records (media paths made
    absolute) or, with ``text``, the documents' texts."""
    path = Path(path)
    root = path.absolute().parent
    for lineno, offset, obj in _lines(path):
        yield lineno, offset, parse_item(obj, text, root, f"{path}:{lineno}")


def iter_records(path: str | os.PathLike) -> Iterator[dict]:
    """Stream the validated conversation records of a JSONL file (media paths made absolute)."""
    return (record for _, _, record in iter_lines(path, text=False))


def iter_texts(path: str | os.PathLike) -> Iterator[str]:
    """Stream the ``"text"`` of each document in a JSONL text file."""
    return (text for _, _, text in iter_lines(path, text=True))


def _relative(value: str, root: Path) -> str:
    p = Path(value)
    if p.is_absolute() and p.is_relative_to(root):
        return p.relative_to(root).as_posix()
    return value


def _portable(record: dict, root: Path) -> dict:
    messages = []
    for msg in record["messages"]:
        if isinstance(msg.get("content"), list):
            parts = []
            for part in msg["content"]:
                part = dict(part)
                for key in ("image", "video"):
                    if isinstance(part.get(key), str):
                        part[key] = _relative(part[key], root)
                if isinstance(part.get("frames"), list):
                    part["frames"] = [_relative(f, root) if isinstance(f, str) else f for f in part["frames"]]
                parts.append(part)
            msg = {**msg, "content": parts}
        messages.append(msg)
    return {**record, "messages": messages}


def write_records(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write conversation (or ``{"text": ...}``) records as JSONL; return how many were written.

    Absolute media paths inside the file's directory are written relative to it, so a data folder can move.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.absolute().parent
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            if "messages" in record:
                record = _portable(record, root)
            f.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
            n += 1
    return n


def is_text_file(path: str | os.PathLike) -> bool:
    """Whether a JSONL file holds text documents rather than conversations (judged by its first record, which must
    be one or the other)."""
    for lineno, _, obj in _lines(Path(path)):
        if "messages" not in obj and "text" not in obj:
            raise DataError(_neither(obj, f"{path}:{lineno}"))
        return "messages" not in obj
    return False


def content_text(content: str | list[dict]) -> str:
    """The text of a message's content: the string itself, or its text parts joined by spaces."""
    if isinstance(content, str):
        return content
    return " ".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")
