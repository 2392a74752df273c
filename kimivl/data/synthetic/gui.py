"""GUI grounding: synthetic screens with labelled buttons and text fields; answers are normalised click points
``(x, y)`` (2 decimals) or, for some hard questions, boxes ``[x1, y1, x2, y2]``."""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

from kimivl.data.synthetic.draw import COLOURS, canvas_size, font, light_background, norm_box, pick_difficulty
from kimivl.data.synthetic.sample import Sample
from kimivl.data.synthetic.vocab import GUI_BUTTONS, GUI_FIELDS, WORDS

N_WIDGETS = {"easy": (2, 3), "medium": (3, 4), "hard": (5, 6)}
FIELD_FILL = (255, 255, 255)
DARK_TEXT = {"yellow", "orange", "pink"}  # button colours that take black labels


def _widgets(rng: random.Random, n: int, fsize: int, max_width: int) -> list[dict]:
    n_fields = rng.randint(0, min(2, n - 1))
    labels = [("button", b) for b in rng.sample(GUI_BUTTONS, n - n_fields)]
    labels += [("field", f) for f in rng.sample(GUI_FIELDS, n_fields)]
    rng.shuffle(labels)
    out = []
    for kind, label in labels:
        tw = font(fsize).getbbox(label)[2]
        pad = rng.randint(4, 8)
        width = tw + 2 * pad if kind == "button" else tw + rng.randint(40, 80)
        out.append(
            {
                "kind": kind,
                "label": label,
                "size": (min(width, max_width), fsize + 2 * pad),
                "colour": rng.choice(sorted(COLOURS)) if kind == "button" else "white",
            }
        )
    return out


def _layout(rng: random.Random, widgets: list[dict], w: int, top: int, h: int) -> list[dict]:
    """Place widgets one per grid cell (cells shuffled); drop widgets from the end until they fit (one always does)."""
    while True:
        fits = []
        for cols in (1, 2, 3):
            rows = math.ceil(len(widgets) / cols)
            cw, ch = (w - 8) / cols, (h - top - 8) / rows
            if all(wd["size"][0] + 4 <= cw and wd["size"][1] + 4 <= ch for wd in widgets):
                fits.append((cols, rows, cw, ch))
        if fits:
            cols, rows, cw, ch = rng.choice(fits)
            for wd, cell in zip(widgets, rng.sample(range(cols * rows), len(widgets))):
                bw, bh = wd["size"]
                x = 4 + (cell % cols) * cw + rng.randint(2, int(cw - bw - 2))
                y = top + 4 + (cell // cols) * ch + rng.randint(2, int(ch - bh - 2))
                wd["px"] = (int(x), int(y), int(x) + bw, int(y) + bh)
            return widgets
        widgets = widgets[:-1]


def _draw(draw: ImageDraw.ImageDraw, wd: dict, fsize: int) -> None:
    x1, y1, x2, y2 = wd["px"]
    if wd["kind"] == "button":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=COLOURS[wd["colour"]])
        ink = (0, 0, 0) if wd["colour"] in DARK_TEXT else (255, 255, 255)
        draw.text(((x1 + x2) / 2, (y1 + y2) / 2), wd["label"], font=font(fsize), fill=ink, anchor="mm")
    else:
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=FIELD_FILL, outline=(120, 120, 120))
        draw.text((x1 + 5, (y1 + y2) / 2), wd["label"], font=font(fsize), fill=(150, 150, 150), anchor="lm")


def make_gui(rng: random.Random, difficulty: str | None = None) -> Sample:
    """A screen with a title bar and a few widgets; the question asks where to click one (or for its box)."""
    difficulty = pick_difficulty(rng, difficulty)
    w, h = canvas_size(rng, min_side=128, big_chance=0.2, aspect=(0.5, 2.0))
    fsize = rng.randint(10, 12 if min(w, h) < 200 else 15)
    img = Image.new("RGB", (w, h), light_background(rng))
    draw = ImageDraw.Draw(img)
    top = fsize + 10
    shade = rng.randint(40, 90)
    draw.rectangle([0, 0, w - 1, top - 1], fill=(shade, shade, shade + 30))
    draw.text((6, top / 2), rng.choice(WORDS).capitalize(), font=font(fsize), fill=(240, 240, 240), anchor="lm")
    widgets = _layout(rng, _widgets(rng, rng.randint(*N_WIDGETS[difficulty]), fsize, w - 16), w, top, h)
    for wd in widgets:
        _draw(draw, wd, fsize)
    target = rng.choice(widgets)
    box = norm_box(target["px"], w, h)
    noun = target["kind"]
    if difficulty == "hard" and rng.random() < 0.5:
        kind, gold = "box", [round(v, 2) for v in box]
        question = f"Give the bounding box of the '{target['label']}' {noun}."
        answer = "[" + ", ".join(f"{v:.2f}" for v in gold) + "]"
    else:
        kind = "point"
        gold = [round((box[0] + box[2]) / 2, 2), round((box[1] + box[3]) / 2, 2)]
        question, answer = f"Click the '{target['label']}' {noun}.", f"({gold[0]:.2f}, {gold[1]:.2f})"
    meta = {
        "task": "gui",
        "kind": kind,
        "difficulty": difficulty,
        "gold": gold,
        "box": box,
        "widgets": [
            {**{k: wd[k] for k in ("kind", "label", "colour")}, "box": norm_box(wd["px"], w, h)} for wd in widgets
        ],
    }
    return Sample([img, question], answer, meta)
