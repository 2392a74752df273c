"""Rendered arithmetic expressions with step-by-step solutions (brackets, then x and /, then + and -)."""

from __future__ import annotations

import random
import re

from PIL import Image, ImageDraw

from kimivl.data.synthetic.draw import (
    COLOURS,
    add_noise,
    draw_operator,
    font,
    grid_text,
    light_background,
    pick_difficulty,
    render_text,
)
from kimivl.data.synthetic.sample import Sample

# difficulty: (operations, largest literal drawn for + and -, font sizes; a product's left factor goes to 12 at
# every level, and above 20 a quotient's literal dividend to 81): easy problems are one operation in large print on
# the token grid (draw.grid_text)
LEVELS = {"easy": (1, 9, (20, 24)), "medium": (2, 30, (14, 26)), "hard": (3, 50, (14, 26))}
PREC = {"+": 1, "-": 1, "×": 2, "÷": 2}
INVERSE = {"+": "-", "-": "+", "×": "÷", "÷": "×"}
Node = int | tuple  # a literal, or (op, left, right)


def _value(node: Node) -> int:
    """The value of ``node``; an inexact division gives -1, which ``_ok`` rejects."""
    if isinstance(node, int):
        return node
    op, a, b = node[0], _value(node[1]), _value(node[2])
    return {"+": a + b, "-": a - b, "×": a * b, "÷": a // b if b and a % b == 0 else -1}[op]


def _tree(rng: random.Random, ops: int, top: int) -> Node:
    if ops == 0:
        return rng.randint(1, top)
    k = rng.randint(0, ops - 1)
    op = rng.choice("+-×÷" if ops > 1 or top > 20 else "+-×")
    if op == "÷":
        d = rng.randint(2, 9)
        left = d * rng.randint(1, 9) if k == 0 else _tree(rng, k, top)
        return op, left, d if ops - 1 - k == 0 else _tree(rng, ops - 1 - k, 9)
    if op == "×":
        return op, _tree(rng, k, 12), _tree(rng, ops - 1 - k, 9)
    return op, _tree(rng, k, top), _tree(rng, ops - 1 - k, top)


def _ok(node: Node) -> bool:
    """Every intermediate result is a whole number in 0..999 (so division is exact)."""
    return isinstance(node, int) or (_ok(node[1]) and _ok(node[2]) and 0 <= _value(node) <= 999)


def render(node: Node, parent: str | None = None, right: bool = False) -> str:
    """Infix with the brackets the tree needs (a right operand of equal precedence is bracketed)."""
    if isinstance(node, int):
        return str(node)
    op = node[0]
    text = f"{render(node[1], op)} {op} {render(node[2], op, True)}"
    if parent and (PREC[op] < PREC[parent] or (right and PREC[op] == PREC[parent])):
        return f"({text})"
    return text


def _next_step(node: Node, parent: str | None = None, right: bool = False, path: tuple = ()) -> list[tuple]:
    """(bracketed, precedence, path) of every operation whose operands are both numbers."""
    if isinstance(node, int):
        return []
    op = node[0]
    if isinstance(node[1], int) and isinstance(node[2], int):
        bracketed = bool(parent) and (PREC[op] < PREC[parent] or (right and PREC[op] == PREC[parent]))
        return [(bracketed, PREC[op], path)]
    return _next_step(node[1], op, False, path + (1,)) + _next_step(node[2], op, True, path + (2,))


def _replace(node: Node, path: tuple, value: int) -> Node:
    if not path:
        return value
    parts = list(node)
    parts[path[0]] = _replace(node[path[0]], path[1:], value)
    return tuple(parts)


def _get(node: Node, path: tuple) -> Node:
    return node if not path else _get(node[path[0]], path[1:])


def solve(node: Node) -> tuple[int, str]:
    """The value and a worked solution: one line per operation, a check of the last one, then the answer."""
    several = not (isinstance(node[1], int) and isinstance(node[2], int))
    lines = ["Plan: brackets first, then × and ÷, then + and - from left to right."] if several else []
    while not isinstance(node, int):
        candidates = _next_step(node)
        best = max(c[:2] for c in candidates)
        path = next(c[2] for c in candidates if c[:2] == best)  # leftmost of the highest priority
        op, a, b = _get(node, path)
        v = _value((op, a, b))
        node = _replace(node, path, v)
        then = "." if isinstance(node, int) else f", so we get {render(node)}."
        lines.append(f"{a} {op} {b} = {v}{then}")
    if b:
        lines.append(f"Check: {v} {INVERSE[op]} {b} = {a}, which matches.")
    lines.append(f"The answer is {node}.")
    return node, "\n".join(lines)


def _render_lines(lines: list[str], size: int, colour, style: str) -> Image.Image:
    """Left-aligned lines as a cropped RGBA image; × and ÷ are drawn by hand except in the bitmap font,
    at the position and height of a '+'."""
    if style == "pixel":
        return render_text("\n".join(lines), size, colour, style)
    fnt, stroke, ink = font(size), max(1, size // 14) if style == "bold" else 0, (*colour, 255)
    px0, py0, px1, py1 = fnt.getbbox("+", anchor="ls")
    advance, line_h = fnt.getlength("+"), int(size * 1.3)
    width = max(fnt.getlength(line.replace("×", "+").replace("÷", "+")) for line in lines)
    img = Image.new("RGBA", (int(width) + 2 * stroke + 4, line_h * len(lines) + size), (*colour, 0))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        x, base = 2 + stroke, size + i * line_h
        for piece in re.split("([×÷])", line):
            if piece in ("×", "÷"):
                draw_operator(
                    draw,
                    piece,
                    x + (px0 + px1) / 2,
                    base + (py0 + py1) / 2,
                    0.4 * (px1 - px0),
                    ink,
                    1 + (stroke or size // 22),
                )
                x += advance
            else:
                draw.text((x, base), piece, font=fnt, fill=ink, anchor="ls", stroke_width=stroke, stroke_fill=ink)
                x += fnt.getlength(piece)
    return img.crop(img.getbbox())


def make_arithmetic(rng: random.Random, difficulty: str | None = None) -> Sample:
    """An expression image ('17 + 25 × 2 = ?'); the answer is its value, with a step-by-step solution."""
    difficulty = pick_difficulty(rng, difficulty)
    ops, top, sizes = LEVELS[difficulty]
    node = _tree(rng, ops, top)
    while not _ok(node):
        node = _tree(rng, ops, top)
    value, solution = solve(node)
    expression = render(node)
    ink = COLOURS[rng.choice(("black", "blue"))]
    if difficulty == "easy":
        img, _ = grid_text(rng, f"{expression} = ?", ink, light_background(rng), rng.randint(*sizes))
        img = add_noise(img, rng, rng.uniform(0, 4))
    else:
        lines = [f"{expression} = ?"] if rng.random() < 0.7 else ["Compute:", expression]
        layer = _render_lines(lines, rng.randint(*sizes), ink, rng.choice(("regular", "regular", "bold", "pixel")))
        w, h = layer.width + rng.randint(12, 60), layer.height + rng.randint(12, 60)
        img = Image.new("RGB", (w, h), light_background(rng))
        img.paste(layer, (rng.randint(4, w - layer.width - 4), rng.randint(4, h - layer.height - 4)), layer)
        img = add_noise(img, rng, rng.uniform(0, 6))
    question = rng.choice(("What is the value of the expression in the image?", "Solve the problem in the image."))
    meta = {
        "task": "reasoning",
        "kind": "arithmetic",
        "difficulty": difficulty,
        "gold": value,
        "expression": expression,
        "operations": ops,
    }
    return Sample([img, question], str(value), meta, solution)
