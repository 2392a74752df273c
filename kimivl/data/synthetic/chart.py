"""Bar and line charts of lettered categories with integer values 1-9, read off a 0-10 gridded axis."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from kimivl.data.synthetic.draw import COLOURS, canvas_size, light_background, norm_box, pick_difficulty, text_centred
from kimivl.data.synthetic.sample import Sample

# difficulty: (number of categories, values written on the chart, question kinds)
LEVELS = {
    "easy": ((3, 4), True, ("value", "max", "min")),
    "medium": ((4, 5), False, ("value", "max", "min")),
    "hard": ((5, 6), False, ("value", "diff", "sum")),
}
CHART_COLOURS = ("red", "green", "blue", "orange", "purple")


def _draw_axes(draw: ImageDraw.ImageDraw, left: int, bottom: int, right: int, unit: int, fsize: int) -> None:
    for v in range(11):
        y = bottom - v * unit
        draw.line([(left, y), (right, y)], fill=(205, 205, 205) if v else (60, 60, 60))
        if v % 2 == 0:
            text_centred(draw, (left - fsize, y), str(v), fsize, (60, 60, 60))
    draw.line([(left, bottom), (left, bottom - 10 * unit)], fill=(60, 60, 60))


def _question(rng: random.Random, kinds: tuple[str, ...], values: dict[str, int], bar: bool) -> tuple[str, str, object]:
    top, low = max(values.values()), min(values.values())
    kinds = [
        k
        for k in kinds
        if not (k == "max" and list(values.values()).count(top) > 1)
        and not (k == "min" and list(values.values()).count(low) > 1)
        and not (k == "diff" and top == low)
    ]
    kind = rng.choice(kinds)
    thing = "bar {}" if bar else "point {}"
    if kind == "value":
        key = rng.choice(sorted(values))
        return kind, f"What is the value of {thing.format(key)}?", values[key]
    if kind == "max":
        best = max(values, key=values.get)
        return kind, "Which bar is the tallest?" if bar else "Which point is the highest?", best
    if kind == "min":
        worst = min(values, key=values.get)
        return kind, "Which bar is the shortest?" if bar else "Which point is the lowest?", worst
    if kind == "sum":
        a, b = rng.sample(sorted(values), 2)
        return kind, f"What is the sum of the values of {thing.format(a)} and {thing.format(b)}?", values[a] + values[b]
    a = rng.choice([k for k in sorted(values) if values[k] > low])
    b = rng.choice([k for k in sorted(values) if values[k] < values[a]])
    more = "taller" if bar else "higher"
    return kind, f"How much {more} is {thing.format(a)} than {thing.format(b)}?", values[a] - values[b]


def make_chart(rng: random.Random, difficulty: str | None = None) -> Sample:
    """A bar or line chart with a question about its values; the gold answer is an integer or a letter."""
    difficulty = pick_difficulty(rng, difficulty)
    n_range, labelled, kinds = LEVELS[difficulty]
    bar = rng.random() < 0.6
    keys = "ABCDEF"[: rng.randint(*n_range)]
    values = {k: rng.randint(1, 9) for k in keys}
    w, h = canvas_size(rng, min_side=112, aspect=(0.75, 2.5))
    fsize = max(9, min(14, h // 14))
    left, right, top, bottom = 2 * fsize + 4, w - 6, fsize + 6, h - fsize - 8
    unit = (bottom - top) // 10
    img = Image.new("RGB", (w, h), light_background(rng))
    draw = ImageDraw.Draw(img)
    _draw_axes(draw, left, bottom, right, unit, fsize)
    colour = rng.choice(CHART_COLOURS)
    slot = (right - left) / len(keys)
    marks, points = {}, []
    for i, k in enumerate(keys):
        cx, y = left + (i + 0.5) * slot, bottom - values[k] * unit
        text_centred(draw, (cx, bottom + fsize // 2 + 4), k, fsize, (40, 40, 40))
        if bar:
            half = int(slot * 0.3)
            box = (int(cx) - half, y, int(cx) + half, bottom - 1)
            draw.rectangle(box, fill=COLOURS[colour])
            marks[k] = norm_box(box, w, h)
        else:
            points.append((cx, y))
            marks[k] = [round(cx / w, 4), round(y / h, 4)]
        if labelled:
            text_centred(draw, (cx, y - fsize // 2 - 3), str(values[k]), fsize, (20, 20, 20))
    if not bar:
        draw.line(points, fill=COLOURS[colour], width=2)
        for cx, y in points:
            draw.ellipse([cx - 3, y - 3, cx + 3, y + 3], fill=COLOURS[colour])
    kind, question, gold = _question(rng, kinds, values, bar)
    meta = {
        "task": "chart",
        "kind": kind,
        "difficulty": difficulty,
        "gold": gold,
        "chart": "bar" if bar else "line",
        "values": values,
        "colour": colour,
        "marks": marks,
    }
    return Sample([img, question], str(gold), meta)
