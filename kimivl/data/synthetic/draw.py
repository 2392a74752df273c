"""Drawing helpers shared by the generators: named colours, shapes, text rendering, canvas sizes, noise.

Text uses only Pillow's built-in fonts (the scalable default font and the small bitmap one), so the output
does not depend on the fonts a machine has installed. Shapes are drawn without anti-aliasing: every shape
pixel has exactly its named colour.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kimivl.data.synthetic.sample import DIFFICULTIES

PATCH = 14
TOKEN_PX = 2 * PATCH  # the side of one LM token's image area after MoonViT's 2x2 patch merge
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "orange": (245, 135, 20),
    "purple": (140, 60, 180),
    "pink": (240, 120, 190),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
# A 3x3 grid of named places, row-major.
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
FONT_STYLES = ("regular", "bold", "slanted", "pixel")


def light_background(rng: random.Random) -> tuple[int, int, int]:
    """A near-white colour, far from every named colour."""
    return tuple(rng.randint(228, 255) for _ in range(3))


def place_phrase(position: str) -> str:
    """'at the top left', 'in the centre', 'on the left'."""
    if position == "centre":
        return "in the centre"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def canvas_size(
    rng: random.Random,
    max_patches: int = 256,
    big_chance: float = 0.1,
    min_side: int = 56,
    max_side: int = 448,
    aspect: tuple[float, float] = (1 / 3, 3),
) -> tuple[int, int]:
    """A random (width, height): aspect ratio log-uniform in ``aspect``, usually at most ``max_patches`` 14px
    patches, with ``big_chance`` of up to 4x that, sides in [min_side, max_side]. LM tokens are about a quarter of
    the patches, up to half as many more: the processor pads each side to 28 px."""
    limit = max_patches * (4 if rng.random() < big_chance else 1)
    ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    area = rng.uniform(0.25, 1.0) * limit * PATCH * PATCH
    w = min(max(int(math.sqrt(area * ratio)), min_side), max_side)
    h = min(max(int(math.sqrt(area / ratio)), min_side), max_side)
    while (w // PATCH) * (h // PATCH) > limit:
        w, h = (w - PATCH, h) if w >= h else (w, h - PATCH)
    return w, h


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw a filled ``shape`` of radius ``r`` around (cx, cy); the centre pixel is always inside it."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = 0.85 * r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)], fill=fill)
    elif shape == "star":
        pts = [
            (
                cx + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5),
            )
            for k in range(10)
        ]
        draw.polygon(pts, fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r} (expected one of {', '.join(SHAPES)})")


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's scalable default font at ``size`` pixels."""
    return ImageFont.load_default(size=size)


def render_text(text: str, size: int, colour, style: str = "regular") -> Image.Image:
    """``text`` (may hold newlines) as a tightly cropped RGBA image: ink in ``colour``, transparent elsewhere.

    Styles: ``regular``; ``bold`` (stroked); ``slanted`` (sheared 20 degrees); ``pixel`` (the built-in bitmap
    font, scaled up with nearest-neighbour to about ``size``).
    """
    if style not in FONT_STYLES:
        raise ValueError(f"unknown font style {style!r} (expected one of {', '.join(FONT_STYLES)})")
    if style == "pixel":
        small = _draw_text(text, ImageFont.load_default_imagefont(), colour, 0, spacing=2)
        k = max(1, round(size / 11))
        return small.resize((small.width * k, small.height * k), Image.NEAREST)
    stroke = max(1, size // 14) if style == "bold" else 0
    img = _draw_text(text, font(size), colour, stroke, spacing=max(2, size // 4))
    if style == "slanted":
        shear = math.tan(math.radians(20))
        extra = int(img.height * shear) + 1
        img = img.transform(
            (img.width + extra, img.height), Image.AFFINE, (1, shear, -extra, 0, 1, 0), resample=Image.BILINEAR
        )
        img = img.crop(img.getbbox())
    return img


def _draw_text(text: str, fnt, colour, stroke: int, spacing: int) -> Image.Image:
    probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    x0, y0, x1, y1 = probe.multiline_textbbox((0, 0), text, font=fnt, spacing=spacing, stroke_width=stroke)
    img = Image.new("RGBA", (x1 - x0 + 2, y1 - y0 + 2), (*colour, 0))
    ImageDraw.Draw(img).multiline_text(
        (1 - x0, 1 - y0),
        text,
        font=fnt,
        fill=(*colour, 255),
        spacing=spacing,
        stroke_width=stroke,
        stroke_fill=(*colour, 255),
    )
    return img.crop(img.getbbox())


def draw_operator(draw: ImageDraw.ImageDraw, symbol: str, cx: float, cy: float, r: float, ink, width: int) -> None:
    """Draw × or ÷ around (cx, cy) (Pillow's scalable default font has no glyph for them)."""
    if symbol == "×":
        draw.line([(cx - r, cy - r), (cx + r, cy + r)], fill=ink, width=width)
        draw.line([(cx - r, cy + r), (cx + r, cy - r)], fill=ink, width=width)
        return
    draw.line([(cx - r, cy), (cx + r, cy)], fill=ink, width=width)
    dot = max(1.0, r / 4)
    for y in (cy - r * 0.8, cy + r * 0.8):
        draw.ellipse([cx - dot, y - dot, cx + dot, y + dot], fill=ink)


def token_cell_centre(x: float, y: float) -> tuple[int, int]:
    """The centre of the token cell (TOKEN_PX square, from the image's top left) that holds pixel (x, y)."""
    return int(x) // TOKEN_PX * TOKEN_PX + TOKEN_PX // 2, int(y) // TOKEN_PX * TOKEN_PX + TOKEN_PX // 2


def grid_text(rng: random.Random, text: str, ink, background, size: int) -> tuple[Image.Image, tuple[int, int]]:
    """One line in large print on the LM's token grid: every non-space character centred in its own TOKEN_PX
    cell, at a random cell of a canvas 0-3 cells wider and 0-2 taller than the text. Returns the image and the
    text's first cell (column, row). The easy rung of reading: one token, one character."""
    chars = text.replace(" ", "")
    cols, rows = len(chars) + rng.randint(0, 3), 1 + rng.randint(0, 2)
    col, row = rng.randint(0, cols - len(chars)), rng.randrange(rows)
    img = Image.new("RGB", (cols * TOKEN_PX, rows * TOKEN_PX), background)
    draw = ImageDraw.Draw(img)
    for i, ch in enumerate(chars):
        cx, cy = (col + i) * TOKEN_PX + TOKEN_PX // 2, row * TOKEN_PX + TOKEN_PX // 2
        if ch in "×÷":
            draw_operator(draw, ch, cx, cy, size / 4, ink, 2)
        else:
            draw.text((cx, cy), ch, font=font(size), fill=ink, anchor="mm")
    return img, (col, row)


def text_centred(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int, fill) -> None:
    """Draw one line of regular text centred on ``xy``."""
    draw.text(xy, text, font=font(size), fill=fill, anchor="mm")


def add_noise(img: Image.Image, rng: random.Random, sigma: float) -> Image.Image:
    """Add Gaussian pixel noise of standard deviation ``sigma`` (seeded from ``rng``)."""
    if sigma <= 0:
        return img
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0, sigma, (img.height, img.width, 1))
    arr = np.asarray(img, dtype=np.float32) + noise
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def norm_box(box, w: int, h: int) -> list[float]:
    """A pixel box ``[x1, y1, x2, y2]`` as fractions of the image size, 4 decimals."""
    x1, y1, x2, y2 = box
    return [round(x1 / w, 4), round(y1 / h, 4), round(x2 / w, 4), round(y2 / h, 4)]


def pick_difficulty(rng: random.Random, difficulty: str | None) -> str:
    """``difficulty`` if given (checked), else a uniform choice of easy/medium/hard."""
    if difficulty is None:
        return rng.choice(DIFFICULTIES)
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r} (expected one of {', '.join(DIFFICULTIES)})")
    return difficulty
