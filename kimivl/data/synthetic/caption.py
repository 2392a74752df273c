"""Captions and simple VQA over scenes of coloured shapes on a 3x3 grid of named places."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from kimivl.data.synthetic.draw import (
    COLOURS,
    POSITIONS,
    SHAPES,
    canvas_size,
    draw_shape,
    light_background,
    norm_box,
    pick_difficulty,
    place_phrase,
)
from kimivl.data.synthetic.sample import Sample

N_OBJECTS = {"easy": (1, 2), "medium": (3, 4), "hard": (5, 7)}


def make_scene(rng: random.Random, n: int, size: tuple[int, int] | None = None) -> tuple[Image.Image, list[dict]]:
    """Draw ``n`` (<= 9) shapes, each inside its own cell of a 3x3 grid; return the image and the objects
    (shape, colour, position, normalised box), listed in reading order."""
    w, h = size or canvas_size(rng)
    img = Image.new("RGB", (w, h), light_background(rng))
    draw = ImageDraw.Draw(img)
    # A few colours and shapes per scene, so repeats (and so counting questions) are common.
    colours = rng.sample(sorted(COLOURS), min(n, rng.randint(2, 4)))
    shapes = rng.sample(SHAPES, min(n, rng.randint(2, 4)))
    objects = []
    for cell in sorted(rng.sample(range(9), n)):
        cw, ch = w / 3, h / 3
        r = min(cw, ch) * rng.uniform(0.28, 0.42)
        cx = (cell % 3 + 0.5) * cw + rng.uniform(-1, 1) * (cw / 2 - r - 1)
        cy = (cell // 3 + 0.5) * ch + rng.uniform(-1, 1) * (ch / 2 - r - 1)
        shape, colour = rng.choice(shapes), rng.choice(colours)
        draw_shape(draw, shape, cx, cy, r, COLOURS[colour])
        objects.append(
            {
                "shape": shape,
                "colour": colour,
                "position": POSITIONS[cell],
                "box": norm_box((cx - r, cy - r, cx + r, cy + r), w, h),
            }
        )
    return img, objects


def describe(objects: list[dict]) -> str:
    """The caption: 'A red circle at the top left, a blue square in the centre and a green star on the right.'"""
    items = [f"{_article(o['colour'])} {o['colour']} {o['shape']} {place_phrase(o['position'])}" for o in objects]
    text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return text[0].upper() + text[1:] + "."


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _unique(objects: list[dict], *keys: str) -> list[dict]:
    """The objects whose values at ``keys`` no other object shares."""
    seen = [tuple(o[k] for k in keys) for o in objects]
    return [o for o, s in zip(objects, seen) if seen.count(s) == 1]


def _question(rng: random.Random, objects: list[dict]) -> tuple[str, str, object]:
    """(kind, question, gold) for one of the question templates the scene supports."""
    kinds = ["describe", "count_all", "count", "count_colour", "shape_at"]
    kinds += ["colour"] * bool(_unique(objects, "shape")) + ["position"] * bool(_unique(objects, "colour", "shape"))
    kind = rng.choice(kinds)
    if kind == "describe":
        return kind, rng.choice(("Describe the image.", "What is in the picture?")), describe(objects)
    if kind == "count_all":
        return kind, "How many shapes are there?", len(objects)
    if kind == "count":
        o = rng.choice(objects)
        colour, shape = o["colour"], o["shape"]
        if rng.random() < 0.2:  # any pair, often absent (answer 0)
            colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        n = sum(p["colour"] == colour and p["shape"] == shape for p in objects)
        return kind, f"How many {colour} {shape}s are there?", n
    if kind == "count_colour":
        colour = rng.choice(objects)["colour"]
        return kind, f"How many {colour} shapes are there?", sum(p["colour"] == colour for p in objects)
    if kind == "shape_at":
        o = rng.choice(objects)
        return kind, f"What shape is {place_phrase(o['position'])}?", o["shape"]
    if kind == "colour":
        o = rng.choice(_unique(objects, "shape"))
        return kind, f"What colour is the {o['shape']}?", o["colour"]
    o = rng.choice(_unique(objects, "colour", "shape"))
    return kind, f"Where is the {o['colour']} {o['shape']}?", o["position"]


def make_caption(rng: random.Random, difficulty: str | None = None) -> Sample:
    """A shapes scene with a caption or counting / colour / shape / position question."""
    difficulty = pick_difficulty(rng, difficulty)
    img, objects = make_scene(rng, rng.randint(*N_OBJECTS[difficulty]))
    kind, question, gold = _question(rng, objects)
    return Sample(
        [img, question],
        str(gold),
        {"task": "caption", "kind": kind, "difficulty": difficulty, "gold": gold, "objects": objects},
    )
