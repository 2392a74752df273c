"""Checking an OpenAI chat completions request and turning it into kimivl messages and sampling settings.

Every problem is a ``RequestError`` with the HTTP status, a message naming the field and the limit, and the field
(``param``), as the OpenAI API reports errors. Images come as ``data:`` URLs (base64); a local path or ``file://`` URL
only under ``allowed_local_media_path``; remote URLs never. A video is a ``video`` (or ``video_url``) part holding a
list of frames, each an image URL as above (with ``timestamps`` in seconds, or ``fps``, default 1), or one
``data:video/...`` URL that is decoded and sampled at ``fps`` (``kimivl.processing.video``). A request's bounds on
video frames (sent and sampled together), decoded frames and decoded pixels are shared evenly among its ``data:video``
URLs, each given its share before any is decoded.
"""

from __future__ import annotations

import io
import os
import stat
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from kimivl.files import unencodable
from kimivl.inference.sampling import MAX_SEED
from kimivl.processing.data_url import data_url_bytes, is_data_url
from kimivl.processing.image import ImageError, open_image


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict:
        """The OpenAI error object. A lone surrogate from the request (JSON's "\\ud800" in a field's name or a path),
        which UTF-8 cannot encode, is written as its escape: the response would fail to render (a 500)."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        message, param = (_utf8_text(s) for s in (self.message, self.param))
        return {"error": {"message": message, "type": kind, "param": param, "code": self.code}}


def _utf8_text(text: str | None) -> str | None:
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class Limits:
    context: int
    max_batch: int
    max_images: int = 8
    max_image_bytes: int = 20 << 20
    max_image_pixels: int = 1 << 24
    max_frames: int = 64  # video frames per request, on top of max_images
    # decoding work per request, shared by its data:video URLs: frames (5 minutes at 30 fps) and pixels (frames x width
    # x height: 5 minutes of 720p at 30 fps, 2.2 minutes of 1080p)
    max_decoded_frames: int = 9000
    max_decoded_pixels: int = 9000 * 1280 * 720
    allowed_local_media_path: str | None = None
    # LM tokens of an image of (width, height), from its header: a request whose images alone overflow the context
    # is refused before any is decoded (``ImageProcessor.image_tokens``; None: not checked here)
    image_tokens: Callable[[int, int], int] | None = None


@dataclass
class ChatRequest:
    messages: list[dict]  # kimivl's chat format, images as bytes
    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class _Used:
    """What a request's parts have taken so far, against ``Limits``: images, video frames, and images' LM tokens."""

    images: int = 0
    frames: int = 0  # each data:video URL counts one here, its share of the rest is given at the end
    tokens: int = 0
    videos: list[dict] = field(default_factory=list)  # the data:video parts, given their shares at the end


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    # compared before any conversion: a huge int is out of range, not an OverflowError; NaN fails every comparison
    if not (_is_int(v) or isinstance(v, float)) or not lo <= v <= hi or (lo_open and v == lo):
        raise RequestError(f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}", name)
    return float(v)


def _integer(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v) or not lo <= v <= hi:
        raise RequestError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}", name)
    return v


def _image_bytes(url: Any, where: str, limits: Limits, used: _Used) -> bytes:
    """An image part's bytes, its header checked against the pixel limit; its LM tokens are added to ``used.tokens``
    (the request's so far), refused once they pass the context."""
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise RequestError(f"{where}: image_url must be {{'url': 'data:image/...;base64,...'}}", where)
    if is_data_url(url):
        try:
            data = data_url_bytes(url, limits.max_image_bytes)
        except ValueError as e:
            raise RequestError(f"{where}: {e}", where) from None
    elif limits.allowed_local_media_path and (url.startswith("file:") or url.startswith("/")):
        data = _local_file(url, where, limits)
    elif limits.allowed_local_media_path:
        raise RequestError(
            f"{where}: only data: URLs or files under the allowed local media path (an absolute path or a file:// URL) "
            "are accepted as images (no remote URLs or relative paths)",
            where,
        )
    else:
        raise RequestError(f"{where}: only data: URLs are accepted as images (no remote URLs or local paths)", where)
    if len(data) > limits.max_image_bytes:
        raise RequestError(f"{where}: the image is over the limit of {limits.max_image_bytes} bytes", where)
    try:
        with open_image(io.BytesIO(data), f"<{len(data)} bytes>") as img:  # the header only
            w, h = img.size
    except Image.DecompressionBombError as e:  # Pillow's own guard, far above the limit below
        raise RequestError(f"{where}: over the limit of {limits.max_image_pixels} pixels: {e}", where) from None
    except ImageError as e:
        raise RequestError(f"{where}: {e}", where) from None
    if w * h > limits.max_image_pixels:
        raise RequestError(
            f"{where}: the image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_image_pixels}", where
        )
    if limits.image_tokens is not None:
        try:
            used.tokens += limits.image_tokens(w, h)
        except ImageError as e:
            raise RequestError(f"{where}: {e}", where) from None
        if used.tokens >= limits.context:
            raise RequestError(
                f"the images up to {where} take {used.tokens} tokens, which leaves no room in the model's context of "
                f"{limits.context} tokens; send fewer or smaller images",
                "messages",
                code="context_length_exceeded",
            )
    return data


def _local_file(url: str, where: str, limits: Limits) -> bytes:
    """The bytes (at most ``max_image_bytes`` + 1) of a regular file under the allowed local media path, named by a
    path or a ``file://`` URL. The file is opened first (without waiting on a FIFO) and the opened file itself is
    checked, so a path swapped after a check cannot lead outside the root."""
    refused = RequestError(f"{where}: {url!r} is not a file under the allowed local media path", where)
    path = url
    if url.startswith("file:"):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise refused
        try:  # percent escapes are bytes (RFC 8089): a file whose name is not UTF-8 can be named too
            path = os.fsdecode(urllib.parse.unquote_to_bytes(parts.path))
        except UnicodeEncodeError:  # a lone surrogate, named below
            path = parts.path
    why = unencodable(path)  # the OS cannot be given it: "not a file" would be wrong
    if why:
        raise RequestError(f"{where}: {why}", where)
    if ".." in path.split(os.sep):  # the kernel enters the folder before each "..": its answer would tell of it
        raise refused
    root = os.path.realpath(limits.allowed_local_media_path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except PermissionError:  # under the root, a file the server may not read is named so (nothing outside is told)
        if os.path.commonpath([os.path.realpath(path), root]) == root:
            raise RequestError(f"{where}: {url!r} cannot be read by the server (permission denied)", where) from None
        raise refused from None
    except (OSError, ValueError):  # missing, a NUL in the path
        raise refused from None
    try:
        opened = f"/proc/self/fd/{fd}"  # where the open file really is (Linux); elsewhere the path as it is now
        real = os.path.realpath(opened if os.path.exists(opened) else path)
        if not stat.S_ISREG(os.fstat(fd).st_mode) or os.path.commonpath([real, root]) != root:
            raise refused
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limits.max_image_bytes + 1)
    except OSError as e:
        raise RequestError(f"{where}: {url!r} cannot be read ({e.strerror})", where) from None
    finally:
        os.close(fd)


def _video(part: dict, kind: str, at: str, limits: Limits, used: _Used) -> dict:
    """A ``video`` / ``video_url`` part as kimivl's video part: its frames' bytes and timestamps, or a video's bytes."""
    source = part.get(kind)
    if isinstance(source, dict):
        _refuse_unknown(source, ("url",), f"{at}.{kind}", kind)
        source = source.get("url")
    fps = _number(part, "fps", 1.0, 0.0, 120.0, lo_open=True)
    if is_data_url(source, "video/"):
        used.frames += 1  # at least one frame; the rest of its share is given by _share_video_budgets
        if used.frames > limits.max_frames:
            raise RequestError(f"more than {limits.max_frames} video frames in one request (the limit)", "messages")
        try:
            data = data_url_bytes(source)
        except ValueError as e:
            raise RequestError(f"{at}: {e}", at) from None
        video = {"type": "video", "video": data, "fps": fps, "max_frame_pixels": limits.max_image_pixels}
        used.videos.append(video)
        return video
    if not isinstance(source, list) or not source:
        raise RequestError(
            f"{at}: a {kind} part needs {kind!r}: a non-empty list of frame URLs (data:image/...) or a data:video/ URL",
            at,
        )
    used.frames += len(source)
    if used.frames > limits.max_frames:
        raise RequestError(f"more than {limits.max_frames} video frames in one request (the limit)", "messages")
    times = part.get("timestamps")
    if times is None:
        times = [i / fps for i in range(len(source))]
    elif not isinstance(times, list) or len(times) != len(source):
        raise RequestError(f"{at}: timestamps must be a list of seconds, one per frame ({len(source)})", at)
    frames = [_image_bytes(url, f"{at}.{kind}[{i}]", limits, used) for i, url in enumerate(source)]
    return {"type": "video", "frames": frames, "timestamps": times}


def _share_video_budgets(limits: Limits, used: _Used) -> None:
    """Give each data:video part its even share of what the request may still take: the video frames the frame lists
    left (each video already holds one in ``used.frames``), and the decoded frames and pixels."""
    count = len(used.videos)
    if count > limits.max_decoded_frames:
        raise RequestError(
            f"{count} data:video URLs, but a request may decode only {limits.max_decoded_frames} frames", "messages"
        )
    spare = limits.max_frames - used.frames
    for i, video in enumerate(used.videos):
        video["max_frames"] = 1 + spare // count + (i < spare % count)
        video["max_decoded"] = limits.max_decoded_frames // count
        video["max_decoded_pixels"] = limits.max_decoded_pixels // count


def _content(content: Any, where: str, limits: Limits, used: _Used) -> str | list[dict]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}: content must be a string or a list of parts", where)
    parts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind is not None and not isinstance(kind, str):  # a list or object cannot be looked up in PART_FIELDS
            raise RequestError(f"{at}: type must be a string, got {type(kind).__name__}", f"{at}.type")
        if kind in PART_FIELDS:
            _refuse_unknown(part, PART_FIELDS[kind], at, f"a {kind} part")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError(f"{at}: a text part needs 'text' (a string)", at)
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            used.images += 1
            if used.images > limits.max_images:
                raise RequestError(f"more than {limits.max_images} images in one request (the limit)", "messages")
            image = part.get("image_url")
            if isinstance(image, dict):
                _refuse_unknown(image, ("url", "detail"), f"{at}.image_url", "image_url")
                if image.get("detail") not in (None, "auto", "high"):
                    raise RequestError(
                        f"{at}.image_url.detail={image['detail']!r} is not supported: every image is read at its own "
                        "resolution (up to the pixel limit); use 'auto' or 'high', or leave it out",
                        f"{at}.image_url.detail",
                    )
            parts.append({"type": "image", "image": _image_bytes(image, at, limits, used)})
        elif kind in ("video", "video_url"):
            parts.append(_video(part, kind, at, limits, used))
        else:
            raise RequestError(
                f"{at}: a content part must have type 'text', 'image_url', 'video' or 'video_url', got {kind!r}", at
            )
    return parts


MAX_TOP_LOGPROBS = 20  # the OpenAI API's bound
MAX_TEMPERATURE = 2.0  # the OpenAI API's bound
MAX_STOP_CHARS = 4096  # a stop string's length (the OpenAI API's are short; the engine holds this much text back)

# The request fields this server reads; UNSUPPORTED and HARMLESS below are accepted too, any other is refused
IMPLEMENTED = (
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "n",
    "stop",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
)
# OpenAI fields that do not change the answer (bookkeeping, billing, a tool setting without tools), with their types:
# accepted and ignored
HARMLESS = {
    "user": str,
    "safety_identifier": str,
    "prompt_cache_key": str,
    "metadata": dict,
    "store": bool,
    "service_tier": str,
    "parallel_tool_calls": bool,
}
# the keys of a message (an assistant message's reasoning_content, as this server returns it, is dropped: a past
# answer is sent without its reasoning, as the chat page sends it) and of each content part type
MESSAGE_FIELDS = {
    "system": ("role", "content", "name"),
    "user": ("role", "content", "name"),
    "assistant": ("role", "content", "name", "reasoning_content"),
}
PART_FIELDS = {
    "text": ("type", "text"),
    "image_url": ("type", "image_url"),
    "video": ("type", "video", "fps", "timestamps"),
    "video_url": ("type", "video_url", "fps", "timestamps"),
}
# OpenAI fields this server does not implement, with the values that ask for nothing (accepted and ignored)
UNSUPPORTED = {
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "logit_bias": ({},),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "modalities": (["text"],),
    "audio": (),
}


def _refuse_unknown(obj: dict, known, where: str | None, what: str) -> None:
    """A 400 naming the first key of ``obj`` outside ``known`` (null values ask for nothing and pass)."""
    for key, value in obj.items():
        if key not in known and value is not None:
            raise RequestError(
                f"{what} has the field {key!r}, which this server does not implement; leave it out (accepted: "
                f"{', '.join(known)})",
                f"{where}.{key}" if where else key,
            )


def _check_fields(body: dict) -> None:
    """A 400 for a field that would change the answer in a way this server cannot (an unknown one, an unsupported
    one not holding a value that asks for nothing): never ignored silently."""
    _refuse_unknown(body, (*IMPLEMENTED, *HARMLESS, *UNSUPPORTED), None, "the request")
    for name, kind in HARMLESS.items():
        if body.get(name) is not None and not isinstance(body[name], kind):
            raise RequestError(f"{name} must be a {kind.__name__} (or null), got {body[name]!r}", name)
    for name, inert in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(value == v and type(value) is type(v) for v in inert):
            raise RequestError(
                f"{name}={value!r} is not supported by this server (it returns plain text from greedy or "
                "temperature/top-p sampling); leave it out",
                name,
            )


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    """The request ``body`` (decoded JSON) checked against ``limits``; raises ``RequestError``."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    _check_fields(body)
    out, used = [], _Used()
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role is not None and not isinstance(role, str):  # a list or object cannot be looked up in MESSAGE_FIELDS
            raise RequestError(f"{where}: role must be a string, got {type(role).__name__}", f"{where}.role")
        role = "system" if role == "developer" else role  # newer OpenAI clients' name for the system role
        if role not in MESSAGE_FIELDS:
            raise RequestError(
                f"{where}: must be an object with role 'system' (or 'developer'), 'user' or 'assistant'", where
            )
        _refuse_unknown(m, MESSAGE_FIELDS[role], where, f"{where} (role {m['role']!r})")
        for key in ("name", "reasoning_content"):  # read, then dropped: still a wrong type is refused
            if not isinstance(m.get(key), (str, type(None))):
                kind = type(m[key]).__name__
                raise RequestError(f"{where}: {key} must be a string (or null), got {kind}", f"{where}.{key}")
        if m.get("content") is None:
            raise RequestError(f"{where}: content is missing", f"{where}.content")
        out.append({"role": role, "content": _content(m["content"], f"{where}.content", limits, used)})
    _share_video_budgets(limits, used)
    max_tokens = _integer(body, "max_completion_tokens", 1, limits.context)
    legacy = _integer(body, "max_tokens", 1, limits.context)
    max_tokens = legacy if max_tokens is None else max_tokens
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a non-empty string or a list of at most 4 of them", "stop")
    if (longest := max(map(len, stop), default=0)) > MAX_STOP_CHARS:
        raise RequestError(f"a stop string must be at most {MAX_STOP_CHARS} characters, got one of {longest}", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise RequestError(f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise RequestError("stream_options is only allowed with stream: true", "stream_options")
    options = options or {}
    if not isinstance(options, dict) or not all(
        isinstance(options.get(k, False), (bool, type(None))) for k in ("include_usage", "include_obfuscation")
    ):  # include_obfuscation (padding against length side channels) is accepted and ignored
        raise RequestError(
            "stream_options must be {'include_usage': true|false} (and 'include_obfuscation', accepted and ignored)",
            "stream_options",
        )
    _refuse_unknown(options, ("include_usage", "include_obfuscation"), "stream_options", "stream_options")
    logprobs = body.get("logprobs")
    if not isinstance(logprobs, (bool, type(None))):
        raise RequestError(f"logprobs must be true or false, got {logprobs!r}", "logprobs")
    top_logprobs = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    if top_logprobs and not logprobs:
        raise RequestError(
            f"top_logprobs={top_logprobs} needs logprobs: true (the most likely tokens come with each token's "
            "log-probability); set logprobs to true or leave top_logprobs out",
            "top_logprobs",
        )
    return ChatRequest(
        messages=out,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=_integer(body, "seed", 0, MAX_SEED),
        n=_integer(body, "n", 1, limits.max_batch) or 1,
        stop=stop,
        stream=bool(stream),
        include_usage=bool(options.get("include_usage", False)),
        logprobs=bool(logprobs),
        top_logprobs=top_logprobs,
    )
