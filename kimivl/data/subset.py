"""Copy the first records of each task of a split, with their media, into a self-contained folder (how the
repository bundles its held-out examples)."""

from __future__ import annotations

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


def copy_subset(split_dir: str | os.PathLike, out_dir: str | os.PathLike, per_task: int) -> int:
    """Copy ``per_task`` records of every conversation file in ``split_dir`` to ``out_dir`` (media under
    ``out_dir/media``); returns the number of records copied."""
    src, out = Path(split_dir), Path(out_dir)
    (out / "media").mkdir(parents=True, exist_ok=True)
    total = 0
    for path in sorted(p for p in src.glob("*.jsonl") if not is_text_file(p)):
        records = []
        for record in iter_records(path):
            if len(records) == per_task:
                break
            mapping = {}
            for media in _media_paths(record):
                target = out / "media" / f"{path.stem}_{Path(media).name}"
                shutil.copyfile(media, target)
                mapping[media] = str(target.resolve())
            records.append(_relocate(record, mapping))
        if records:
            write_records(out / path.name, records)
            total += len(records)
    return total
