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

Scoring: the answer's first two numbers are the click; four numbers are a box whose centre is the click. A
click with a coordinate above 1 is in pixels and is divided by the image size. Right when the click lies in the
gold box (edges included).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from kimivl.eval.answers import final_answer, numbers
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

BOX_FORMATS = {("screenspot", ".tsv"): "xywh", ("screenspot", ".json"): "xywh", ("screenspot", ".jsonl"): "xywh",
               ("screenspot", ".parquet"): "xyxy", ("screenspot_pro", ".json"): "xyxy",
               ("screenspot_pro", ".jsonl"): "xyxy", ("screenspot_pro", ".tsv"): "xyxy",
               ("screenspot_pro", ".parquet"): "xyxy"}
PROMPT = "{instruction}\nAnswer with the point to click as (x, y), each coordinate normalised to [0, 1] of the image."


def normalized_box(box: list[float], box_format: str, size: tuple[int, int]) -> list[float]:
    """``box`` as normalised ``[x1, y1, x2, y2]``, from ``xywh`` or ``xyxy`` in pixels or normalised units."""
    if len(box) != 4:
        raise RowError(f"a box needs 4 numbers, got {box}")
    x1, y1, a, b = (float(v) for v in box)
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


def parse_row(row: dict, index, file: Path, task: str, box_format: str | None) -> Sample:
    fmt = box_format or BOX_FORMATS[(task, file.suffix)]
    image = _image(row, file)
    size = tuple(int(v) for v in literal_list(row["img_size"])) if present(row.get("img_size")) else image_size(image)
    box = normalized_box(literal_list(row["bbox"]), fmt, size)
    instruction = str(row.get("instruction") or row.get("question") or "").strip()
    if not instruction:
        raise RowError("no instruction")
    group = row.get("ui_type") or row.get("data_type") or ""
    if task == "screenspot_pro" and (row.get("group") or row.get("application")):
        group = f"{row.get('group') or row.get('application')}/{group}" if group else row.get("group")
    return Sample(index, user_turn([image], PROMPT.format(instruction=instruction)),
                  {"box": box, "size": list(size), "group": str(group)})


def loader(task: str):
    """The loader of ``screenspot`` or ``screenspot_pro``."""
    def load(data, box_format: str | None = None, **_):
        return load_samples(data, partial(parse_row, task=task, box_format=box_format), ("index", "id"))
    return load


def click(answer: str, size: tuple[int, int]) -> tuple[float, float] | None:
    """The normalised click point written in ``answer`` (a point, or a box's centre), or ``None``."""
    found = numbers(answer)
    if len(found) >= 4:
        x, y = (found[0] + found[2]) / 2, (found[1] + found[3]) / 2
    elif len(found) >= 2:
        x, y = found[0], found[1]
    else:
        return None
    if max(x, y) > 1:
        x, y = x / size[0], y / size[1]
    return x, y


def score(prediction: str, meta: dict) -> dict:
    answer = final_answer(prediction)
    point = None if answer is None else click(answer, meta["size"])
    if point is None:
        return {"score": 0.0, "extracted": None}
    x1, y1, x2, y2 = meta["box"]
    return {"score": float(x1 <= point[0] <= x2 and y1 <= point[1] <= y2), "extracted": list(point)}
