"""OCR: one-digit sums, short lines and small pages of text rendered in several styles, sizes, colours and rotations."""

from __future__ import annotations

import random

from PIL import Image

from kimivl.data.synthetic.draw import (
    COLOURS,
    FONT_STYLES,
    TOKEN_PX,
    add_noise,
    grid_text,
    light_background,
    norm_box,
    pick_difficulty,
    render_text,
)
from kimivl.data.synthetic.sample import Sample
from kimivl.data.synthetic.vocab import WORDS

DARK_INKS = ("black", "blue", "red", "green", "purple")
# difficulty: (lines, words per line, font sizes, max rotation in degrees, max noise sigma); easy is a one-digit sum
# in large print on the token grid (draw.grid_text)
LEVELS = {
    "easy": ((1, 1), (1, 1), (20, 24), 0, 4),
    "medium": ((1, 1), (2, 3), (13, 26), 8, 10),
    "hard": ((3, 5), (2, 4), (11, 18), 4, 12),
}
QUESTIONS = {
    "line": ("What does the text say?", "Read the text in the image."),
    "page": ("Read all the text in the image.", "Transcribe the text in the image."),
}
QUESTIONS["sum"] = QUESTIONS["line"]


def _colours(rng: random.Random) -> tuple[tuple, tuple]:
    """(ink, background): dark ink on a light background, or light ink on a dark one."""
    if rng.random() < 0.75:
        return COLOURS[rng.choice(DARK_INKS)], light_background(rng)
    light = (rng.randint(230, 255), rng.randint(230, 255), rng.randint(200, 255))
    return light, tuple(rng.randint(10, 70) for _ in range(3))


def _easy(rng: random.Random) -> Sample:
    """A one-digit sum ('3 × 4 = 12'), one character per token cell: its tokens are mostly one per character,
    unlike words and long numbers, which the tokenizer splits into pieces of several characters."""
    a, b, op = rng.randint(1, 9), rng.randint(1, 9), rng.choice("+-×")
    a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
    text = f"{a} {op} {b} = {a + b if op == '+' else a - b if op == '-' else a * b}"
    size = rng.randint(*LEVELS["easy"][2])
    img, (col, row) = grid_text(rng, text, COLOURS[rng.choice(DARK_INKS)], light_background(rng), size)
    img = add_noise(img, rng, rng.uniform(0, LEVELS["easy"][4]))
    n = len(text.replace(" ", ""))
    box = norm_box((col * TOKEN_PX, row * TOKEN_PX, (col + n) * TOKEN_PX, (row + 1) * TOKEN_PX), *img.size)
    meta = {
        "task": "ocr",
        "kind": "sum",
        "difficulty": "easy",
        "gold": text,
        "style": "grid",
        "size": size,
        "angle": 0.0,
        "box": box,
    }
    return Sample([img, rng.choice(QUESTIONS["sum"])], text, meta)


def make_ocr(rng: random.Random, difficulty: str | None = None) -> Sample:
    """Rendered text to read; the answer is the text (lines joined by newlines)."""
    difficulty = pick_difficulty(rng, difficulty)
    if difficulty == "easy":
        return _easy(rng)
    n_lines, n_words, sizes, max_angle, max_noise = LEVELS[difficulty]
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*n_words))) for _ in range(rng.randint(*n_lines))]
    text = "\n".join(lines)
    ink, bg = _colours(rng)
    style = rng.choice(FONT_STYLES)
    size = rng.randint(*sizes)
    angle = rng.uniform(-max_angle, max_angle)
    layer = render_text(text, size, ink, style)
    if max_angle:
        layer = layer.rotate(angle, resample=Image.BICUBIC, expand=True)
        layer = layer.crop(layer.getbbox())
    w = max(layer.width + rng.randint(8, 60), 28)
    h = max(layer.height + rng.randint(8, 60), 28)
    x, y = rng.randint(4, w - layer.width - 4), rng.randint(4, h - layer.height - 4)
    img = Image.new("RGB", (w, h), bg)
    img.paste(layer, (x, y), layer)
    img = add_noise(img, rng, rng.uniform(0, max_noise))
    kind = "page" if len(lines) > 1 else "line"  # a line holds 2 words at least
    meta = {
        "task": "ocr",
        "kind": kind,
        "difficulty": difficulty,
        "gold": text,
        "style": style,
        "size": size,
        "angle": round(angle, 2),
        "box": norm_box((x, y, x + layer.width, y + layer.height), w, h),
    }
    return Sample([img, rng.choice(QUESTIONS[kind])], text, meta)
