"""ScreenSpot and ScreenSpot-Pro: GUI grounding, a click inside the target element's box; accuracy.

Box conventions differ by release, so each loader states its own (``BOX_FORMATS``; ``box_format=`` overrides):

| task | file | box | units |
|---|---|---|---|
| screenspot | VLMEvalKit TSV (``image`` base64, ``question``) | ``[x, y, w, h]`` | pixels |
| screenspot | original JSON (``img_filename``, ``instruction``) | ``[x, y, w, h]`` | pixels |
| screenspot | hub parquet (``image`` struct, ``instruction``) | ``[x1, y1, x2, y2]`` | normalised |
| screenspot_pro | official JSON (``img_filename``, ``img_size``, ``instruction``) | ``[x1, y1, x2, y2]`` | pixels |
| screenspot_pro | TSV / parquet | ``[x1, y1, x2, y2]`` | pixels |

Units need no table: a box whose values all lie in [0, 1] is normalised, otherwise it is in pixels and divided
by the image size. Image files named by JSON rows are looked up next to the file, in ``images/`` beside it, or in
``../images/`` (the ScreenSpot-Pro layout ``annotations/*.json`` + ``images/``).

Scoring, ``mode="official"`` (the default): SeeClick's ScreenSpot rule (``pretrain/screenspot_test.py`` and
``pretrain/process_utils.py`` of github:njucckevin/SeeClick, commit 0ef37ac4d7aaf37ba7b990e3e3c3ca77e1fb8f93, last
changed in 661ff1b), rule for rule: an answer containing "box" (case-sensitive, "checkbox" too) must hold Qwen-VL's
``<box>(x1,y1),(x2,y2)</box>`` (integers on the 0-1000 grid, no spaces): the first box's centre / 1000 is the
click, and no such box is a wrong format; any other answer is read with the pattern ``-?\\d+\\.?\\d*`` ("1,000" is
two numbers, ".5" is 5): exactly 2 numbers are the click, exactly 4 a box whose centre is the click, any other
count a wrong format. The click is taken as normalised as it stands (pixel or 0-1000 points outside ``<box>`` miss).
Right when it lies in the gold box (edges included); accuracy over every row, wrong formats included. An
``extracted`` answer goes through the same rule. ScreenSpot-Pro rows are scored by the same rule.

``mode="lenient"`` (kimivl's own): a ``<box>(x1,y1),(x2,y2)</box>`` answer is read on the 0-1000 grid; otherwise
the answer's first two numbers are the click and four numbers a box whose centre is the click (commas always
separate numbers); a click with a coordinate above 1 is in pixels and is divided by the image size.
"""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path

from kimivl.eval.answers import check_mode, click_point, final_answer, numbers, official_text
from kimivl.eval.tables import (
    RowError,
    Sample,
    image_bytes,
    image_size,
    literal_list,
    load_samples,
    present,
    user_turn,
)

BOX_FORMATS = {
    ("screenspot", ".tsv"): "xywh",
    ("screenspot", ".json"): "xywh",
    ("screenspot", ".jsonl"): "xywh",
    ("screenspot", ".parquet"): "xyxy",
    ("screenspot_pro", ".json"): "xyxy",
    ("screenspot_pro", ".jsonl"): "xyxy",
    ("screenspot_pro", ".tsv"): "xyxy",
    ("screenspot_pro", ".parquet"): "xyxy",
}
PROMPT = "{instruction}\nAnswer with the point to click as (x, y), each coordinate normalised to [0, 1] of the image."


def normalized_box(box: list[float], box_format: str, size: tuple[int, int]) -> list[float]:
    """``box`` as normalised ``[x1, y1, x2, y2]``, from ``xywh`` or ``xyxy`` in pixels or normalised units."""
    if len(box) != 4:
        raise RowError(f"a box needs 4 numbers, got {box}")
    try:
        x1, y1, a, b = (float(v) for v in box)
    except (TypeError, ValueError, OverflowError):
        raise RowError(f"a box needs 4 numbers, got {box}") from None
    if not all(math.isfinite(v) for v in (x1, y1, a, b)):  # Python's json reads NaN and Infinity
        raise RowError(f"box {box} holds a number that is not finite")
    x2, y2 = (x1 + a, y1 + b) if box_format == "xywh" else (a, b)
    if max(x1, y1, x2, y2) > 1:
        w, h = size
        x1, x2, y1, y2 = x1 / w, x2 / w, y1 / h, y2 / h
    if not (x1 <= x2 and y1 <= y2):
        raise RowError(f"box {box} ({box_format}) has negative width or height")
    return [x1, y1, x2, y2]


def _image(row: dict, file: Path):
    if present(row.get("image")):
        return image_bytes(row["image"], file.parent)
    name = row.get("img_filename") or row.get("image_path") or row.get("file_name")
    if not name:
        raise RowError("no image")
    for root in (file.parent, file.parent / "images", file.parent.parent / "images"):
        if (root / name).is_file():
            return str(root / name)
    raise RowError(f"image file {name!r} not found next to {file} or in images/")


def _size(value) -> tuple[int, int]:
    """An ``img_size`` cell: [width, height], both positive (pixel boxes are divided by them)."""
    size = tuple(int(v) for v in literal_list(value))
    if len(size) != 2 or min(size) < 1:
        raise RowError(f"img_size must be [width, height] of positive pixels, got {value!r}")
    return size


def parse_row(row: dict, index, file: Path, task: str, box_format: str | None) -> Sample:
    fmt = box_format or BOX_FORMATS[(task, file.suffix)]
    image = _image(row, file)
    size = _size(row["img_size"]) if present(row.get("img_size")) else image_size(image)
    box = normalized_box(literal_list(row["bbox"]), fmt, size)
    instruction = str(row.get("instruction") or row.get("question") or "").strip()
    if not instruction:
        raise RowError("no instruction")
    group = row.get("ui_type") or row.get("data_type") or ""
    if task == "screenspot_pro" and (row.get("group") or row.get("application")):
        where = row.get("group") or row.get("application")
        group = f"{where}/{group}" if group else where
    return Sample(
        index,
        user_turn([image], PROMPT.format(instruction=instruction)),
        {"box": box, "size": list(size), "group": str(group)},
    )


def load(data, task: str, box_format: str | None = None, **_):
    return load_samples(data, partial(parse_row, task=task, box_format=box_format), ("index", "id"))


def loader(task: str):
    """The loader of ``screenspot`` or ``screenspot_pro`` (a partial: a task pickles, for worker processes)."""
    return partial(load, task=task)


_QWEN_BOX = re.compile(r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")


def click(answer: str, size: tuple[int, int]) -> tuple[float, float] | None:
    """The normalised click point written in ``answer`` (lenient: a point, a box's centre, a Qwen-VL ``<box>`` on
    the 0-1000 grid), or ``None``."""
    box = _QWEN_BOX.search(answer.replace(" ", ""))
    if box:
        x1, y1, x2, y2 = (int(v) for v in box.groups())
        return (x1 + x2) / 2000, (y1 + y2) / 2000
    point = click_point(numbers(answer, thousands=False))
    if point is None:
        return None
    x, y = point
    if max(x, y) > 1:
        x, y = x / size[0], y / size[1]
    return x, y


def official_click(answer: str) -> list[float] | None:
    """The click SeeClick's evaluation reads from ``answer``; ``None`` for what it counts as a wrong format."""
    if "box" in answer:
        box = _QWEN_BOX.search(answer)
        if not box:
            return None
        x1, y1, x2, y2 = (int(v) for v in box.groups())
        return [(x1 + x2) / 2 / 1000, (y1 + y2) / 2 / 1000]
    found = [float(v) for v in re.findall(r"-?\d+\.?\d*", answer)]
    if len(found) == 2:
        return found
    if len(found) == 4:
        return [(found[0] + found[2]) / 2, (found[1] + found[3]) / 2]
    return None


def score(prediction: str, meta: dict, mode: str = "official", extracted: str | None = None) -> dict:
    """One row's score; ``extracted``, when given, is read instead of the prediction."""
    if check_mode(mode) == "official":
        point = official_click(official_text(prediction) if extracted is None else extracted)
    else:
        answer = final_answer(prediction) if extracted is None else extracted
        point = None if answer is None else click(answer, meta["size"])
    if point is None:
        return {"score": 0.0, "extracted": None}
    x1, y1, x2, y2 = meta["box"]
    return {"score": float(x1 <= point[0] <= x2 and y1 <= point[1] <= y2), "extracted": list(point)}
