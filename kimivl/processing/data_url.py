"""The bytes of a ``data:<mime type>;base64,<data>`` URL, as OpenAI-style clients send images and videos."""

from __future__ import annotations

import base64
import binascii


def data_url_bytes(url: str, max_bytes: int | None = None) -> bytes:
    """The decoded payload of ``url``; a ``ValueError`` says what is wrong with it (a payload that would decode to
    more than ``max_bytes`` is refused before it is decoded)."""
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ValueError("a data: URL must be 'data:<mime type>;base64,<data>'")
    if max_bytes is not None and len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise ValueError(f"the data is over the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the data: URL's payload is not valid base64") from None
