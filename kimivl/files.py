"""Files written so that a crash mid-write leaves the previous content, never a torn one."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file of this writer's own beside ``path`` (``.<name>.<random>.tmp``, so writers
    of one file at once never share one), then rename it over ``path``: the file is always one writer's whole text."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
