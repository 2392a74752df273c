"""Geometry figures with labelled side lengths (rectangle, square, right triangle, L-shape): area and perimeter
questions with step-by-step solutions."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from kimivl.data.synthetic.draw import (
    TOKEN_PX,
    canvas_size,
    light_background,
    pick_difficulty,
    text_centred,
    token_cell_centre,
)
from kimivl.data.synthetic.sample import Sample

FIGURES = {"easy": ("rectangle", "square"), "medium": ("rectangle", "triangle"), "hard": ("l-shape",)}
INK = (30, 30, 30)


def _problem(rng: random.Random, figure: str, difficulty: str) -> tuple[dict, str, int, list[str]]:
    """(side lengths, question, answer, solution lines) for ``figure``."""
    top = 9 if difficulty == "easy" else 20
    if figure == "square":
        s = rng.randint(2, top)
        if rng.random() < 0.5:
            return (
                {"w": s, "h": s},
                "What is the area of the square?",
                s * s,
                ["A square's area is side × side.", f"{s} × {s} = {s * s}."],
            )
        return (
            {"w": s, "h": s},
            "What is the perimeter of the square?",
            4 * s,
            ["A square has four equal sides, so the perimeter is 4 × side.", f"4 × {s} = {4 * s}."],
        )
    if figure == "rectangle":
        a, b = rng.randint(2, top), rng.randint(2, top)
        if rng.random() < 0.5:
            return (
                {"w": a, "h": b},
                "What is the area of the rectangle?",
                a * b,
                [f"The rectangle is {a} wide and {b} tall.", "Area = width × height.", f"{a} × {b} = {a * b}."],
            )
        return (
            {"w": a, "h": b},
            "What is the perimeter of the rectangle?",
            2 * (a + b),
            [
                f"The rectangle is {a} wide and {b} tall.",
                "Perimeter = 2 × (width + height).",
                f"{a} + {b} = {a + b}.",
                f"2 × {a + b} = {2 * (a + b)}.",
            ],
        )
    if figure == "triangle":
        a, b = rng.randint(2, top), 2 * rng.randint(1, top // 2)
        return (
            {"w": a, "h": b},
            "What is the area of the triangle?",
            a * b // 2,
            [
                f"It is a right triangle with legs {a} and {b}.",
                "Area = base × height ÷ 2.",
                f"{a} × {b} = {a * b}.",
                f"{a * b} ÷ 2 = {a * b // 2}.",
            ],
        )
    big_w = rng.randint(6, top)
    big_h = rng.randint(max(6, big_w // 2), min(top, 2 * big_w))
    cut_w, cut_h = rng.randint(-(-2 * big_w // 5), big_w - 2), rng.randint(-(-2 * big_h // 5), big_h - 2)
    sides = {"w": big_w, "h": big_h, "cut_w": cut_w, "cut_h": cut_h}
    if rng.random() < 0.5:
        return (
            sides,
            "What is the area of the shape?",
            big_w * big_h - cut_w * cut_h,
            [
                f"The shape is a {big_w} by {big_h} rectangle with a {cut_w} by {cut_h} corner removed.",
                f"Whole rectangle: {big_w} × {big_h} = {big_w * big_h}.",
                f"Missing corner: {cut_w} × {cut_h} = {cut_w * cut_h}.",
                f"Area = {big_w * big_h} - {cut_w * cut_h} = {big_w * big_h - cut_w * cut_h}.",
            ],
        )
    return (
        sides,
        "What is the perimeter of the shape?",
        2 * (big_w + big_h),
        [
            f"The shape is a {big_w} by {big_h} rectangle with a {cut_w} by {cut_h} corner removed.",
            "Cutting a corner moves two edges inwards without changing their total lengths,",
            "so the perimeter equals that of the whole rectangle: 2 × (width + height).",
            f"{big_w} + {big_h} = {big_w + big_h}.",
            f"2 × {big_w + big_h} = {2 * (big_w + big_h)}.",
        ],
    )


def _draw(rng: random.Random, figure: str, sides: dict, difficulty: str) -> Image.Image:
    easy = difficulty == "easy"  # easy labels in large print, each in its own token cell next to its side
    w, h = canvas_size(
        rng, min_side=196 if easy else 150 if figure == "l-shape" else 112, big_chance=0, aspect=(0.75, 1.8)
    )
    fsize = rng.randint(20, 24) if easy else rng.randint(11, 15)
    m = 2 * TOKEN_PX + 4 if easy else int(1.6 * fsize) + 4
    scale = min((w - 2 * m) / sides["w"], (h - 2 * m) / sides["h"])
    fw, fh = sides["w"] * scale, sides["h"] * scale
    x0, y0 = (w - fw) / 2, (h - fh) / 2
    x1, y1 = x0 + fw, y0 + fh
    img = Image.new("RGB", (w, h), light_background(rng))
    draw = ImageDraw.Draw(img)

    def label(xy: tuple[float, float], value: int) -> None:
        text_centred(draw, xy, str(value), fsize, INK)

    left, bottom = (x0 - fsize, (y0 + y1) / 2), ((x0 + x1) / 2, y1 + fsize)
    if easy:  # the cell left of the one holding the left side, and the one below the bottom side's
        (lx, ly), (bx, by) = token_cell_centre(x0, left[1]), token_cell_centre(bottom[0], y1)
        left, bottom = (lx - TOKEN_PX, ly), (bx, by + TOKEN_PX)
    if figure == "triangle":
        draw.polygon([(x0, y0), (x0, y1), (x1, y1)], outline=INK, width=2)
        draw.rectangle([x0, y1 - 8, x0 + 8, y1], outline=INK)
    elif figure == "l-shape":
        cx, cy = x1 - sides["cut_w"] * scale, y0 + sides["cut_h"] * scale
        draw.polygon([(x0, y0), (cx, y0), (cx, cy), (x1, cy), (x1, y1), (x0, y1)], outline=INK, width=2)
    else:
        draw.rectangle([x0, y0, x1, y1], outline=INK, width=2)
    label(left, sides["h"])
    label(bottom, sides["w"])
    if figure == "l-shape":
        label(((cx + x1) / 2, cy - fsize), sides["cut_w"])
        label((cx + fsize, (y0 + cy) / 2), sides["cut_h"])
    return img


def make_geometry(rng: random.Random, difficulty: str | None = None) -> Sample:
    """A labelled figure and an area or perimeter question; the answer is an integer with a worked solution."""
    difficulty = pick_difficulty(rng, difficulty)
    figure = rng.choice(FIGURES[difficulty])
    sides, question, answer, steps = _problem(rng, figure, difficulty)
    solution = "\n".join(steps + [f"The answer is {answer}."])
    meta = {
        "task": "reasoning",
        "kind": "geometry",
        "difficulty": difficulty,
        "gold": answer,
        "figure": figure,
        "sides": sides,
    }
    return Sample([_draw(rng, figure, sides, difficulty), question], str(answer), meta, solution)
