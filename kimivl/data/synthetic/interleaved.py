"""Interleaved image-text documents: two figures of shape scenes within text, a question about one or both."""

from __future__ import annotations

import random

from kimivl.data.synthetic.caption import make_scene
from kimivl.data.synthetic.draw import canvas_size, pick_difficulty
from kimivl.data.synthetic.sample import Sample
from kimivl.data.synthetic.text import filler
from kimivl.data.synthetic.vocab import NAMES

N_OBJECTS = {"easy": (1, 3), "medium": (2, 4), "hard": (3, 6)}
KINDS = {"easy": ("count",), "medium": ("count", "colour", "more"), "hard": ("colour", "more", "which", "total")}


def _question(rng: random.Random, kind: str, scenes: list[list[dict]]) -> tuple[str, str, object] | None:
    """(kind, question, gold), or None when the scenes cannot support ``kind``."""
    k = rng.randint(1, 2)
    objects = scenes[k - 1]
    if kind == "count":
        return kind, f"How many shapes are in Figure {k}?", len(objects)
    if kind == "colour":
        single = [o for o in objects if [p["shape"] for p in objects].count(o["shape"]) == 1]
        if not single:
            return None
        o = rng.choice(single)
        return kind, f"What colour is the {o['shape']} in Figure {k}?", o["colour"]
    if kind == "more":
        if len(scenes[0]) == len(scenes[1]):
            return None
        return kind, "Which figure has more shapes?", f"Figure {1 if len(scenes[0]) > len(scenes[1]) else 2}"
    if kind == "which":
        looks = [{(o["colour"], o["shape"]) for o in s} for s in scenes]
        only = sorted(looks[k - 1] - looks[2 - k])
        if not only:
            return None
        colour, shape = rng.choice(only)
        return kind, f"Which figure has a {colour} {shape}?", f"Figure {k}"
    colour = rng.choice(objects)["colour"]
    return (
        kind,
        f"How many {colour} shapes are there in the two figures together?",
        sum(o["colour"] == colour for s in scenes for o in s),
    )


def make_interleaved(rng: random.Random, difficulty: str | None = None) -> Sample:
    """A short document: text, Figure 1, text, Figure 2, then a question that needs the figures."""
    difficulty = pick_difficulty(rng, difficulty)
    while True:
        figures = [
            make_scene(rng, rng.randint(*N_OBJECTS[difficulty]), canvas_size(rng, max_patches=144, big_chance=0))
            for _ in range(2)
        ]
        asked = _question(rng, rng.choice(KINDS[difficulty]), [objects for _, objects in figures])
        if asked:
            break
    kind, question, gold = asked
    name = rng.choice(NAMES)
    content = [
        f"{filler(rng)} Figure 1 shows a drawing by {name}:",
        figures[0][0],
        f"{filler(rng)} Figure 2 shows a second drawing:",
        figures[1][0],
        question,
    ]
    meta = {
        "task": "interleaved",
        "kind": kind,
        "difficulty": difficulty,
        "gold": gold,
        "figures": [objects for _, objects in figures],
    }
    return Sample(content, str(gold), meta)
