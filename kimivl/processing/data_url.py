"""The bytes of a ``data:<mime type>;base64,<data>`` URL, as OpenAI-style clients send images and videos.

Read as browsers read them, and a little more: the scheme and the ``base64`` marker in any case (spaces around the
marker allowed), ASCII whitespace anywhere in the payload (base64 wrapped at 76 columns, CRLF), padding missing or
present, and the URL-safe alphabet (``-_``) as well as the standard one.
"""

from __future__ import annotations

import base64
import binascii
import os
import re

WHITESPACE = re.compile("[\t\n\f\r ]+")  # ASCII whitespace, as the WHATWG forgiving-base64 decode drops it
URL_SAFE = str.maketrans("-_", "+/")


def is_data_url(value: object, mime_prefix: str = "") -> bool:
    """Whether ``value`` is a string starting (after leading whitespace) with ``data:`` and ``mime_prefix``, in any
    case (``is_data_url(url, "video/")`` for a video)."""
    return isinstance(value, str) and re.match(f"[\t\n\f\r ]*data:{re.escape(mime_prefix)}", value, re.I) is not None


def is_inline_data(value: object) -> bool:
    """Whether a local input ``value`` (a path or a data: URL) is a data: URL: one unless a file is so named."""
    return is_data_url(value) and not os.path.exists(value)


def data_url_bytes(url: str, max_bytes: int | None = None) -> bytes:
    """The decoded payload of ``url``; a ``ValueError`` says what is wrong with it (a payload that would decode to
    more than ``max_bytes`` is refused before it is decoded)."""
    header, comma, payload = url.lstrip().partition(",")
    if not comma or not is_data_url(header) or header.split(";")[-1].strip().lower() != "base64":
        raise ValueError("a data: URL must be 'data:<mime type>;base64,<data>'")
    payload = WHITESPACE.sub("", payload).rstrip("=")
    if max_bytes is not None and len(payload) * 3 // 4 > max_bytes:  # the bytes that n base64 characters decode to
        raise ValueError(f"the data is over the limit of {max_bytes} bytes")
    if len(payload) % 4 == 1:  # no padding can complete it
        raise ValueError("the data: URL's payload is not valid base64 (its length is one past a whole block)")
    try:
        return base64.b64decode(payload.translate(URL_SAFE) + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the data: URL's payload is not valid base64") from None
