"""Video: short clips of small frames in which one shape moves, or shapes appear one after another."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from kimivl.data.synthetic.draw import COLOURS, SHAPES, canvas_size, draw_shape, light_background, pick_difficulty
from kimivl.data.synthetic.sample import Clip, Sample

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# difficulty: (frames, static distractors, question kinds)
LEVELS = {
    "easy": ((3, 3), (0, 0), ("direction", "first")),
    "medium": ((4, 4), (1, 1), ("direction", "mover", "last")),
    "hard": ((5, 6), (2, 3), ("direction", "mover", "order")),
}
FRAME_SECONDS = 1.0


def _free_spot(rng: random.Random, w: int, h: int, r: float, taken: list[tuple]) -> tuple[float, float] | None:
    """A centre for a radius-``r`` shape whose box misses every box in ``taken`` (None after 50 tries)."""
    for _ in range(50):
        cx, cy = rng.uniform(r + 1, w - r - 2), rng.uniform(r + 1, h - r - 2)
        if all(cx + r + 2 < x1 or cx - r - 2 > x2 or cy + r + 2 < y1 or cy - r - 2 > y2 for x1, y1, x2, y2 in taken):
            return cx, cy
    return None


def _name(o: dict) -> str:
    return f"{o['colour']} {o['shape']}"


def make_video(rng: random.Random, difficulty: str | None = None) -> Sample:
    """A clip with a question about motion direction, which shape moves, or the order shapes appear in."""
    difficulty = pick_difficulty(rng, difficulty)
    frames_range, distractors, kinds = LEVELS[difficulty]
    n = rng.randint(*frames_range)
    kind = rng.choice(kinds)
    w, h = canvas_size(rng, max_patches=64, big_chance=0, min_side=70, aspect=(0.5, 2.0))
    r = min(w, h) * rng.uniform(0.09, 0.14)
    looks = [{"colour": c, "shape": rng.choice(SHAPES)} for c in rng.sample(sorted(COLOURS), 6)]
    objects: list[dict] = []  # each with a per-frame track of centres (None while not yet visible)
    if kind in ("direction", "mover"):
        direction = rng.choice(sorted(DIRECTIONS))
        dx, dy = DIRECTIONS[direction]
        span = (w if dx else h) - 2 * r - 4
        step = span / (n - 1) * rng.uniform(0.6, 1.0)
        start = r + 2 + rng.uniform(0, span - step * (n - 1))
        fixed = rng.uniform(r + 2, (h if dx else w) - r - 2)
        track = [(start + k * step, fixed) if dx else (fixed, start + k * step) for k in range(n)]
        if dx < 0 or dy < 0:
            track = track[::-1]
        objects.append({**looks[0], "track": track})
        taken = [
            (
                min(x for x, _ in track) - r,
                min(y for _, y in track) - r,
                max(x for x, _ in track) + r,
                max(y for _, y in track) + r,
            )
        ]
        for look in looks[1 : 1 + rng.randint(*distractors) + (kind == "mover")]:
            spot = _free_spot(rng, w, h, r, taken)
            if spot:
                objects.append({**look, "track": [spot] * n})
                taken.append((spot[0] - r, spot[1] - r, spot[0] + r, spot[1] + r))
    else:
        taken = []
        for k, look in enumerate(looks[:n]):
            spot = _free_spot(rng, w, h, r, taken)
            if spot is None:
                break
            objects.append({**look, "track": [None] * k + [spot] * (n - k)})
            taken.append((spot[0] - r, spot[1] - r, spot[0] + r, spot[1] + r))
    bg = light_background(rng)
    frames = []
    for k in range(n):
        img = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(img)
        for o in objects:
            if o["track"][k] is not None:
                draw_shape(draw, o["shape"], *o["track"][k], r, COLOURS[o["colour"]])
        frames.append(img)
    if kind == "direction":
        question, gold = f"Which way does the {_name(objects[0])} move?", direction
    elif kind == "mover":
        if len(objects) < 2:  # no room for a still shape: ask the direction instead
            kind, question, gold = "direction", f"Which way does the {_name(objects[0])} move?", direction
        else:
            question, gold = "Which shape moves?", _name(objects[0])
    elif kind == "first":
        question, gold = "Which shape appears first?", _name(objects[0])
    elif kind == "last":
        question, gold = "Which shape appears last?", _name(objects[-1])
    else:
        question, gold = "In what order do the shapes appear?", [_name(o) for o in objects]
    answer = ", ".join(gold) if isinstance(gold, list) else gold
    timestamps = [k * FRAME_SECONDS for k in range(n)]
    meta = {
        "task": "video",
        "kind": kind,
        "difficulty": difficulty,
        "gold": gold,
        "timestamps": timestamps,
        "objects": [
            {
                "colour": o["colour"],
                "shape": o["shape"],
                "track": [None if p is None else [round(p[0] / w, 4), round(p[1] / h, 4)] for p in o["track"]],
            }
            for o in objects
        ],
    }
    return Sample([Clip(frames, timestamps), question], answer, meta)
