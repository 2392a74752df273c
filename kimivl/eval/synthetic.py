"""Scoring the synthetic world's held-out tasks from each record's ``meta.gold``.

Thinking output is scored on the text after ``◁/think▷``; a reasoning that never closes has no answer. Integers
are read as the first integer of the answer; strings compare case- and punctuation-insensitively
(``kimivl.eval.answers.normalize_text``); lists (an order of shapes) compare item by item; GUI clicks score when the
point, or a predicted box's centre, falls in the gold box (normalised coordinates).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kimivl.data.formats import DataError, is_text_file, iter_lines
from kimivl.eval.answers import click_point, final_answer, normalize_text
from kimivl.eval.tables import is_eval_output
from kimivl.finite import finite

_INT = re.compile(r"-?\d+")
_FLOAT = re.compile(r"-?\d+(?:\.\d+)?")


def clicked(answer: str, box: list[float]) -> bool:
    """Whether the point "(x, y)" of ``answer``, or the centre of its box (its first two or four numbers), falls in
    ``box`` ``[x1, y1, x2, y2]``, edges included."""
    point = click_point([float(x) for x in _FLOAT.findall(answer)])
    if point is None:
        return False
    (x, y), (x1, y1, x2, y2) = point, box
    return x1 <= x <= x2 and y1 <= y <= y2


def box_error(meta: dict[str, Any]) -> str | None:
    """Why ``meta.box`` is no box a click can be scored in (4 finite numbers ``[x1, y1, x2, y2]``, ``x1 <= x2`` and
    ``y1 <= y2``: a NaN or reversed box would score every click wrong); None when it is one."""
    box = meta.get("box", "missing")
    numbers = isinstance(box, list) and len(box) == 4
    numbers = numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    if numbers and all(finite(v) for v in box) and box[0] <= box[2] and box[1] <= box[3]:
        return None
    return (
        f"meta.box is {box!r}: a click is scored by the gold box [x1, y1, x2, y2], 4 finite numbers with x1 <= x2 "
        "and y1 <= y2"
    )


def score(prediction: str, meta: dict[str, Any]) -> bool:
    """Whether ``prediction`` answers the record whose meta is ``meta``."""
    answer = final_answer(prediction) or ""  # an unclosed reasoning has no answer
    gold = meta["gold"]
    if meta.get("task") == "gui":
        return clicked(answer, meta["box"])
    if isinstance(gold, int):
        found = _INT.search(answer)
        return found is not None and int(found.group()) == gold
    if isinstance(gold, list):
        return normalize_text(answer) == normalize_text(" ".join(str(g) for g in gold))
    return normalize_text(answer) == normalize_text(str(gold))


def evaluate(
    model, processor, records: list[dict], batch_size: int = 16, max_new_tokens: int = 48, progress: bool = False
) -> tuple[dict[str, float], list[dict]]:
    """Greedy answers to each record's prompt (its messages before the last assistant turn), scored.
    Returns (accuracy per task, with ``all``) and one row per record (its id, task, ``meta.difficulty`` or None,
    prediction, gold and whether it is correct)."""
    from kimivl.inference.chat import generate
    from kimivl.progress import progress_bar

    rows = []
    starts = range(0, len(records), batch_size)
    with progress_bar(starts, desc="eval", disable=not progress) as bar:  # closed however the loop ends
        for start in bar:
            chunk = records[start : start + batch_size]
            prompts = [r["messages"][:-1] if r["messages"][-1]["role"] == "assistant" else r["messages"] for r in chunk]
            for rec, pred in zip(chunk, generate(model, processor, prompts, max_new_tokens=max_new_tokens)):
                rows.append(
                    {
                        "id": rec.get("id"),
                        "task": rec["meta"]["task"],
                        "difficulty": rec["meta"].get("difficulty"),
                        "prediction": pred,
                        "gold": rec["meta"]["gold"],
                        "correct": score(pred, rec["meta"]),
                    }
                )
    acc: dict[str, float] = {}
    for task in sorted({r["task"] for r in rows}):
        mine = [r["correct"] for r in rows if r["task"] == task]
        acc[task] = sum(mine) / len(mine)
    acc["all"] = sum(r["correct"] for r in rows) / max(1, len(rows))
    return acc, rows


def heldout_files(split_dir: str | os.PathLike) -> list[Path]:
    """The task files of a held-out split directory, sorted: its ``*.jsonl`` less text files and eval outputs (such
    as an ``--out`` into the same directory writes)."""
    paths = sorted(Path(split_dir).glob("*.jsonl"))
    return [p for p in paths if not (is_eval_output(p) or is_text_file(p))]


def iter_heldout(path: str | os.PathLike) -> Iterator[dict]:
    """Stream the records of one held-out task file, each checked to hold ``meta.task`` and ``meta.gold``, and a
    ``gui`` one a ``meta.box`` of 4 numbers (a ``DataError`` names the first that lacks them); a record without an
    ``id`` gets ``<file stem>/<line>`` (``ocr/3``: the third line of ``ocr.jsonl``), so that each is a row of its
    own."""
    path = Path(path)
    for i, (lineno, _, record) in enumerate(iter_lines(path, text=False)):
        meta = record.get("meta")
        if not isinstance(meta, dict) or "task" not in meta or "gold" not in meta:
            raise DataError(
                f"{path}: record {i + 1} has no meta.task and meta.gold to score it by (held-out "
                "accuracy needs them; for a loss on your own data use a stage's val)"
            )
        if meta["task"] == "gui" and (why := box_error(meta)):
            raise DataError(f"{path}: record {i + 1} is a gui task whose {why}")
        if record.get("id") in (None, ""):
            record["id"] = f"{path.stem}/{lineno}"
        yield record


def count_heldout(path: str | os.PathLike, task: str | None = None) -> int:
    """How many records ``iter_heldout`` yields from a held-out task file (its non-blank lines), or how many of
    them are of ``task`` (those are read: a file may hold several tasks)."""
    if task is not None:
        return sum(record["meta"]["task"] == task for record in iter_heldout(path))
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def heldout_records(split_dir: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The first ``limit`` records of every task file of a held-out split directory (``heldout_files``; only those
    lines are read), checked and named by ``iter_heldout``."""
    records = [r for path in heldout_files(split_dir) for r in itertools.islice(iter_heldout(path), limit)]
    if not records:
        raise FileNotFoundError(f"no held-out conversation files in {split_dir}")
    return records
