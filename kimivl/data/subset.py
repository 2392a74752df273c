"""Copy the first records of each task of a split, with their media, into a self-contained folder (how the
repository bundles its held-out examples)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from kimivl.data.formats import is_text_file, iter_records, write_records


def _media_paths(record: dict) -> list[str]:
    out = []
    for m in record["messages"]:
        for p in m["content"] if isinstance(m["content"], list) else []:
            if p["type"] == "image":
                out.append(p["image"])
            elif p["type"] == "video":
                out += p.get("frames", [p.get("video")])
    return out


def _relocate(record: dict, mapping: dict[str, str]) -> dict:
    def part(p):
        if p["type"] == "image":
            return {**p, "image": mapping[p["image"]]}
        if p["type"] == "video" and "frames" in p:
            return {**p, "frames": [mapping[f] for f in p["frames"]]}
        if p["type"] == "video":
            return {**p, "video": mapping[p["video"]]}
        return p

    messages = [
        {**m, "content": [part(p) for p in m["content"]]} if isinstance(m["content"], list) else m
        for m in record["messages"]
    ]
    return {**record, "messages": messages}


def _copy_name(stem: str, media: str, taken: set[str]) -> str:
    """``{stem}_{file name}``, or, when another file already has that name (``a/1.png`` and ``b/1.png``), with a short
    hash of the file's path inserted."""
    name = f"{stem}_{Path(media).name}"
    if name in taken:
        name = f"{stem}_{hashlib.sha256(media.encode()).hexdigest()[:8]}_{Path(media).name}"
    return name


def copy_subset(split_dir: str | os.PathLike, out_dir: str | os.PathLike, per_task: int) -> int:
    """Copy ``per_task`` records of every conversation file in ``split_dir`` to ``out_dir`` (media under
    ``out_dir/media``); returns the number of records copied."""
    src, out = Path(split_dir), Path(out_dir)
    (out / "media").mkdir(parents=True, exist_ok=True)
    copied: dict[str, str] = {}  # media file -> its copy's name
    names: set[str] = set()
    total = 0
    for path in sorted(p for p in src.glob("*.jsonl") if not is_text_file(p)):
        records = []
        for record in iter_records(path):
            if len(records) == per_task:
                break
            mapping = {}
            for media in _media_paths(record):
                if media not in copied:
                    copied[media] = _copy_name(path.stem, media, names)
                    names.add(copied[media])
                    shutil.copyfile(media, out / "media" / copied[media])
                mapping[media] = str((out / "media" / copied[media]).absolute())
            records.append(_relocate(record, mapping))
        if records:
            write_records(out / path.name, records)
            total += len(records)
    return total
