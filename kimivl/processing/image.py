"""MoonViT image preprocessing (spec section 3): resize to a patch budget, pad, normalise, patchify.

Per image (a path, a ``data:...;base64,`` URL, bytes, a PIL image or an array; encoded images only in ``FORMATS``):
decode (a file's size checked against ``max_bytes`` before it is read, its header against ``max_pixels`` before the
pixels are decoded; a pipe or device must start like an image and is read up to ``max_bytes``), apply the EXIF
orientation, convert to RGB, then
1. if (w//p)*(h//p) > in_token_limit: resize by sqrt(limit / ((w//p)*(h//p))) to (int(w*s), int(h*s)), BICUBIC;
2. pad right/bottom with zero pixels to multiples of p*merge (``pad_input``; otherwise centre-crop to multiples of
   p*merge, see below);
3. keep every side under 512 patches (the size of MoonViT's RoPE table): the spec rejects such grids, here an image
   that long is scaled down further until its padded grid fits (see below), and refused only if that leaves a side
   under one pixel;
4. scale to [0, 1] and normalise with image_mean/image_std. Padding happens before normalisation, exactly as in the
   released processor, so padded pixels hold (0 - mean) / std, not 0;
5. patchify row-major into (h*w, 3, p, p) float32 with grid (h, w).

Differences from the released processor, on purpose: the image is made RGB before resizing (the release resizes in
the original mode, so palette images were resized with nearest-neighbour), transparent images are composited over
a background (the release drops alpha, exposing whatever colour transparent pixels store; ``background=None``
restores that), 16-bit images are rescaled instead of being clipped at 255, float images must hold values in [0, 1]
(anything else is refused, not clipped), and an image with a side of 512 patches or more is scaled down to fit
MoonViT's RoPE table instead of being refused (the official model cannot take it either way). Without ``pad_input``
the release centre-crops to multiples of p, which leaves grids that the 2x2 patch merge cannot divide (a 70x42 image:
grid (3, 5)); here it crops to multiples of p*merge, so every grid merges and the announced tokens are the ones made.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import mmap
import os
import re
import stat
import threading
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from kimivl.files import write_text_atomic
from kimivl.finite import finite
from kimivl.processing.data_url import data_url_bytes, is_inline_data

CONFIG_FILE = "preprocessor_config.json"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_GRID_SIDE = 512
MAX_PIXELS = 1 << 26  # decoded-size cap per image (and per video frame) against decompression bombs
# Encoded formats decoded at all: other Pillow plugins (EPS runs Ghostscript, and many are rarely used) never see
# the bytes of an image that may come from an untrusted client. ICO is left out: Pillow decodes an icon's embedded
# PNG, whatever its size, while reading the header, before any pixel limit can be checked.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
# Pillow refuses an encoded image over twice its MAX_IMAGE_PIXELS (about 179M pixels) as a decompression bomb while
# reading the header; max_pixels cannot raise that ceiling (Pillow's limit is a global, shared by every thread).
PILLOW_CEILING = 2 * Image.MAX_IMAGE_PIXELS
MAX_NAME = 200  # characters of a path kept in messages
UNIT_TOLERANCE = 1e-3  # how far outside [0, 1] a float pixel may stray (rounding) before the image is refused
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), None: None}
READ_CHUNK = 1 << 20
_WARNINGS = threading.Lock()  # held while Pillow's warnings are silenced (_no_bomb_warning)
SOURCE_SIZE = "kimivl.source_size"  # PIL info key: the size of the whole image a smaller one was scaled from
# libjpeg decodes every scan of a progressive JPEG over the whole image, so one tiny scan repeated thousands of times
# makes a small file take minutes to decode. Encoders write about 10 scans (libjpeg's progression: 6 for grey, 10 for
# colour, 18 for CMYK); libtiff stops a JPEG in a TIFF past 100 scans by default, and so does this.
JPEG_MAX_SCANS = 100
# The next marker with a length field (or EOI): fill bytes (0xFF runs) lead it; a stuffed zero, TEM, SOI or a restart
# marker is no such marker (libjpeg reads past them), so the search goes on. Only a run's first 0xFF starts a match, so
# a long run of 0xFF is searched once, not once per byte.
JPEG_MARKER = re.compile(rb"(?<!\xff)\xff+([^\x00\x01\xd0-\xd8\xff])")
JPEG_SOS, JPEG_EOI = 0xDA, 0xD9


class ImageError(ValueError):
    """An image that cannot be read or processed."""


def mark_source_size(img: Image.Image, source: tuple[int, int]) -> None:
    """Record in ``img.info[SOURCE_SIZE]`` that ``img`` is the whole image of size ``source`` (w, h) scaled down (a
    video frame decoded straight to the size the image processor gives the whole frame), with ``img``'s own size."""
    img.info[SOURCE_SIZE] = (*source, *img.size)


def source_size(img: Image.Image) -> tuple[int, int]:
    """The (w, h) of the whole image that ``img`` was scaled down from, as ``mark_source_size`` recorded it, else
    ``img``'s own size. Preprocessing uses it in place of ``img``'s size: that size's grid, and ``img`` resized to the
    size it gives (already so for such a frame; resizing that size anew could give a smaller grid). The mark holds
    only while ``img`` keeps the size it was made at (Pillow copies ``info`` through ``crop`` and ``resize``, whose
    results are other images), and only as a tuple: an image file's own metadata (PNG text is a string) never counts."""
    mark = img.info.get(SOURCE_SIZE)
    if isinstance(mark, tuple) and len(mark) == 4 and all(type(n) is int and n >= 1 for n in mark):
        if mark[2:] == img.size:
            return mark[:2]
    return img.size


def short_name(path: str | os.PathLike) -> str:
    """A path as messages name it: in full up to ``MAX_NAME`` characters, else its start and its length."""
    text = str(path)
    return text if len(text) <= MAX_NAME else f"{text[:MAX_NAME]}... ({len(text)} characters)"


def _describe(image: Any) -> str:
    if is_inline_data(image):
        return f"<data: URL of {len(image)} characters>"
    if isinstance(image, (str, os.PathLike)):
        return short_name(image)
    if isinstance(image, (bytes, bytearray)):
        return f"<{len(image)} bytes>"
    if isinstance(image, np.ndarray):
        return f"<array {image.shape} {image.dtype}>"
    if isinstance(image, Image.Image):
        return f"<PIL {image.mode} {image.size[0]}x{image.size[1]}>"
    return f"<{type(image).__name__}>"


def _unit_to_bytes(a: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] -> uint8; NaN, infinities and values outside [0, 1] are an ImageError."""
    if not np.isfinite(a).all():
        raise ImageError("it holds NaN or infinite values; float images must hold values in [0, 1]")
    lo, hi = float(a.min()), float(a.max())
    if lo < -UNIT_TOLERANCE or hi > 1 + UNIT_TOLERANCE:
        raise ImageError(
            f"it holds float values from {lo:g} to {hi:g}; float images must hold values in [0, 1] "
            "(divide 0..255 values by 255, or pass uint8 values)"
        )
    return np.round(np.clip(a, 0.0, 1.0) * 255).astype(np.uint8)


def _accepts(head: bytes, formats) -> str | None:
    """The first of ``formats`` (Pillow format ids) whose signature ``head`` matches, or None."""
    Image.init()
    for fmt in formats:
        accept = Image.OPEN[fmt][1] if fmt in Image.OPEN else None
        try:
            if accept is not None and accept(head):
                return fmt
        except Exception:  # a plugin's check may raise on short or odd input; it just does not match
            continue
    return None


def jpeg_scans(data, stop: int = JPEG_MAX_SCANS) -> int:
    """How many start-of-scan (SOS) markers the JPEG ``data`` (a bytes-like object) holds before its end of image, as
    libjpeg meets them, counting no further than ``stop + 1``. A marker segment is skipped by its length; a scan's
    entropy-coded data runs to the next ``JPEG_MARKER``."""
    view, scans, pos = memoryview(data), 0, 2
    while scans <= stop and (m := JPEG_MARKER.search(view[pos:])):  # a slice: no look behind the segment just skipped
        code, pos = view[pos + m.start(1)], pos + m.end()
        if code == JPEG_EOI:
            break
        scans += code == JPEG_SOS
        pos += int.from_bytes(view[pos : pos + 2], "big")
    return scans


@contextlib.contextmanager
def _no_bomb_warning() -> Iterator[None]:
    """Pillow's DecompressionBombWarning silenced (kimivl names its own pixel limit). ``catch_warnings`` swaps the
    process's warning filters and restores them on exit, which two threads doing so at once would leave broken (a
    filter left behind for good): kimivl's threads take turns."""
    with _WARNINGS, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def open_image(f, name: str) -> Image.Image:
    """Pillow's header read (no pixels yet) of an open image file in one of ``FORMATS``; ImageError otherwise,
    naming a format that Pillow knows but that is not accepted. Pillow's DecompressionBombError (a header far over
    any sensible size) is left to the caller, which names its own pixel limit."""
    try:
        with _no_bomb_warning():
            return Image.open(f, formats=FORMATS)
    except UnidentifiedImageError:  # Pillow's message would name only its in-memory buffer
        f.seek(0)
        other = _accepts(f.read(16), [fmt for fmt in Image.OPEN if fmt not in FORMATS])
        if other is not None:
            raise ImageError(
                f"image {name} looks like {other}, a format not accepted here; send one of {', '.join(FORMATS)}"
            ) from None
        raise ImageError(
            f"cannot decode image {name}: not in an accepted format ({', '.join(FORMATS)}), or damaged"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"cannot decode image {name}: {e}") from None


def _from_array(a: np.ndarray, name: str) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(f"image {name}: arrays must be HW, HWC with C in 1/3/4; got shape {a.shape}")
    if a.dtype.kind == "f":
        try:
            a = _unit_to_bytes(a)
        except ImageError as e:
            raise ImageError(f"image {name}: {e}") from None
    elif a.dtype != np.uint8:
        raise ImageError(f"image {name}: arrays must be uint8 (0..255) or float (0..1), got {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a.astype(np.uint8)))


def to_rgb(img: Image.Image, background: str | None = "black") -> Image.Image:
    """Convert any PIL mode to RGB; alpha is composited over ``background`` ("black", "white", or None to drop it).

    16-bit and 32-bit integer grey ("I;16*", "I") are read as 0..65535; float grey ("F") as 0..1 (other values are
    an ImageError).
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I"):
        a = np.asarray(img.convert("I"), dtype=np.float64) if mode != "I" else np.asarray(img, dtype=np.float64)
        grey = Image.fromarray(np.round(np.clip(a, 0, 65535) / 257).astype(np.uint8))
        key = img.info.get("transparency")
        if not isinstance(key, (int, float)):
            return grey.convert("RGB")
        img = Image.merge("LA", (grey, Image.fromarray(np.where(a == key, 0, 255).astype(np.uint8))))  # the key's alpha
    if mode == "F":
        return Image.fromarray(_unit_to_bytes(np.asarray(img))).convert("RGB")
    if mode in ("RGBa", "La"):  # premultiplied alpha: Pillow converts these only to their plain forms
        img = img.convert(mode.upper())
    # a colour key (a PNG tRNS chunk, a GIF's transparent index: info["transparency"]) is alpha in any mode
    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    if has_alpha and BACKGROUNDS[background] is not None:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, BACKGROUNDS[background] + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


@dataclass
class ImageProcessor:
    """Turns images into MoonViT patches; fields mirror ``preprocessor_config.json``."""

    patch_size: int = 14
    in_token_limit: int = 4096
    merge_kernel_size: tuple[int, int] = (2, 2)
    pad_input: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    max_pixels: int = MAX_PIXELS  # decoded-size cap against decompression bombs (not an official field)
    max_bytes: int = 1 << 28  # encoded-size cap per image, checked before reading (not an official field)
    background: str | None = "black"  # what transparent pixels become (not an official field)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        def numbers(v, n: int) -> bool:
            return (
                isinstance(v, (list, tuple))
                and len(v) == n
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and finite(x) for x in v)
            )

        if not (
            numbers(self.merge_kernel_size, 2) and all(isinstance(k, int) and k >= 1 for k in self.merge_kernel_size)
        ):
            raise ValueError(f"merge_kernel_size must be two positive integers, got {self.merge_kernel_size!r}")
        if not (numbers(self.image_mean, 3) and numbers(self.image_std, 3) and all(s > 0 for s in self.image_std)):
            raise ValueError(
                f"image_mean/image_std need 3 finite numbers (std > 0), got {self.image_mean!r}, {self.image_std!r}"
            )
        self.merge_kernel_size = tuple(self.merge_kernel_size)
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        if not isinstance(self.pad_input, bool):
            raise ValueError(f"pad_input must be true or false, got {self.pad_input!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be 'black', 'white' or None, got {self.background!r}")
        for name in ("patch_size", "in_token_limit", "max_pixels", "max_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

    # ---- config files -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProcessor:
        names = {f for f in cls.__dataclass_fields__} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        return {**extra, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ImageProcessor:
        file = os.path.join(path, CONFIG_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {CONFIG_FILE} at {path}")
        try:
            with open(file, encoding="utf-8") as f:
                d = json.load(f)
            if not isinstance(d, dict):
                raise TypeError(f"it holds a JSON {type(d).__name__}, not an object")
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:  # bad JSON or UTF-8, or a bad value (from_dict): the file is named
            raise ValueError(f"{file} is not a valid {CONFIG_FILE}: {e}") from None

    def save_pretrained(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        write_text_atomic(os.path.join(path, CONFIG_FILE), json.dumps(self.to_dict(), indent=2) + "\n")

    # ---- loading ------------------------------------------------------------------------------------------
    def load(self, image: Any) -> Image.Image:
        """Any supported input -> an upright RGB PIL image; raises ImageError naming the input."""
        name = _describe(image)
        if isinstance(image, np.ndarray):
            if image.size == 0:
                raise ImageError(f"image {name} is empty")
            img = _from_array(image, name)
        elif isinstance(image, Image.Image):
            img = image
        elif is_inline_data(image):
            try:
                data = data_url_bytes(image)
            except ValueError as e:
                raise ImageError(f"image {name}: {e}") from None
            img = self._open(data, name)
        elif isinstance(image, (str, os.PathLike, bytes, bytearray)):
            img = self._open(image, name)
        else:
            raise ImageError(f"image {name}: expected a path, a data: URL, bytes, a PIL image or a numpy array")
        w, h = img.size
        if w == 0 or h == 0:
            raise ImageError(f"image {name} has zero size {w}x{h}")
        if w * h > self.max_pixels:
            raise ImageError(f"image {name} is {w}x{h} = {w * h} pixels, over max_pixels={self.max_pixels}")
        try:
            return to_rgb(ImageOps.exif_transpose(img), self.background)
        except ImageError as e:
            raise ImageError(f"image {name}: {e}") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageError(f"cannot convert image {name} (mode {img.mode}) to RGB: {e}") from None

    def read_stream(self, f, name: str) -> bytes:
        """A pipe or device: it must start like an image, and at most ``max_bytes`` are read."""
        head = f.read(16)
        if not head:
            raise ImageError(f"image {name} is empty")
        if _accepts(head, FORMATS) is None:
            raise ImageError(
                f"image {name} does not start like an image in an accepted format ({', '.join(FORMATS)}; "
                f"read {len(head)} bytes)"
            )
        data = bytearray(head)
        while chunk := f.read(READ_CHUNK):
            data += chunk
            if len(data) > self.max_bytes:
                raise ImageError(
                    f"image {name} is longer than max_bytes={self.max_bytes}; stopped reading it "
                    "(raise max_bytes to allow larger files)"
                )
        return bytes(data)

    def _open(self, source, name: str) -> Image.Image:
        if isinstance(source, (bytes, bytearray)):
            if len(source) > self.max_bytes:
                raise ImageError(f"image {name} is over max_bytes={self.max_bytes} (raise max_bytes to allow it)")
            return self._decode(io.BytesIO(source), name)
        try:
            info = os.stat(source)
            if stat.S_ISDIR(info.st_mode):
                raise ImageError(f"image {name} is a directory, not an image file")
            if stat.S_ISREG(info.st_mode) and info.st_size > self.max_bytes:
                raise ImageError(
                    f"image file {name} is {info.st_size} bytes, over max_bytes={self.max_bytes} "
                    "(raise max_bytes to allow it)"
                )
            with open(source, "rb") as f:
                if not stat.S_ISREG(info.st_mode):
                    return self._decode(io.BytesIO(self.read_stream(f, name)), name)
                return self._decode(f, name)
        except OSError as e:
            raise ImageError(f"cannot read image file {name}: {e.strerror or e}") from None

    def _decode(self, f, name: str) -> Image.Image:
        """Decode an open file: its header first (checked against ``max_pixels``), then its pixels."""
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            raise ImageError(f"image {name} is empty")
        self._check_jpeg_scans(f, name)
        f.seek(0)
        try:
            img = open_image(f, name)
            w, h = img.size
            if w * h > self.max_pixels:
                raise ImageError(
                    f"image {name} is {w}x{h} = {w * h} pixels, over max_pixels={self.max_pixels} "
                    f"(a decompression bomb or a very large scan; raise max_pixels to allow it, up to {PILLOW_CEILING} "
                    "for an encoded image)"
                )
            with _no_bomb_warning() if w * h > (Image.MAX_IMAGE_PIXELS or w * h) else contextlib.nullcontext():
                img.load()  # Pillow warns again while decoding only an image past its warning size
        except ImageError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageError(
                f"image {name} looks like a decompression bomb: {e} (Pillow's ceiling for an encoded image, which "
                "max_pixels cannot raise; send it scaled down, or as an array)"
            ) from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise ImageError(f"cannot decode image {name}: {e}") from None
        return img

    @staticmethod
    def _check_jpeg_scans(f, name: str) -> None:
        """An ImageError for a JPEG of more than ``JPEG_MAX_SCANS`` scans, counted before any is decoded (in memory,
        or through a map of the file: a file is never read whole)."""
        f.seek(0)
        if f.read(2) != b"\xff\xd8":
            return
        data = f.getbuffer() if isinstance(f, io.BytesIO) else mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with data:
            scans = jpeg_scans(data)
        if scans > JPEG_MAX_SCANS:
            raise ImageError(
                f"image {name} is a JPEG of more than {JPEG_MAX_SCANS} scans (start-of-scan markers): each is decoded "
                "over the whole image, so a small file of that many can take minutes; encoders write about 10, "
                "re-encode it"
            )

    # ---- geometry -----------------------------------------------------------------------------------------
    def resized_size(self, width: int, height: int, name: str | None = None) -> tuple[int, int]:
        """(w, h) after step 1 (the patch budget), then, only for an image so elongated that a side would reach
        ``MAX_GRID_SIDE`` patches (which MoonViT's 2D RoPE does not cover, so the official model cannot take it),
        scaled down further until it fits. An ImageError when a side would be left under one pixel."""
        label = f"image {name} ({width}x{height})" if name else f"a {width}x{height} image"
        if width < 1 or height < 1:
            raise ImageError(f"{label} has no pixels")
        p = self.patch_size
        n = (width // p) * (height // p)
        if n > self.in_token_limit:
            scale = math.sqrt(self.in_token_limit / n)
            width, height = int(width * scale), int(height * scale)
            if min(width, height) < 1:
                raise ImageError(
                    f"{label} is too elongated: scaled to in_token_limit={self.in_token_limit} patches, its short "
                    "side would be under one pixel"
                )
        longest = (MAX_GRID_SIDE - max(self.merge_kernel_size)) * p  # a side stays under the limit once padded
        if max(width, height) > longest:
            scale = longest / max(width, height)
            width, height = int(width * scale), int(height * scale)
            if min(width, height) < 1:
                raise ImageError(
                    f"{label} is too elongated: scaled so its long side stays under {MAX_GRID_SIDE} patches "
                    f"({longest} pixels; MoonViT's RoPE table covers no more), its short side would be under one pixel"
                )
        return width, height

    def grid_hw(self, width: int, height: int, name: str | None = None) -> tuple[int, int]:
        """Patch grid (rows, cols) of an upright image of this size; an ImageError for a size ``preprocess`` refuses."""
        w, h = self.resized_size(width, height, name)
        p = self.patch_size
        mh, mw = self.merge_kernel_size
        if self.pad_input:
            return -(-h // (p * mh)) * mh, -(-w // (p * mw)) * mw
        if w < p * mw or h < p * mh:  # cropped to whole merge blocks, so that the patch merge divides the grid
            label = f"image {name}" if name else "an image"
            raise ImageError(
                f"{label} ({w}x{h}) is smaller than one {p * mw}x{p * mh} block of {mw}x{mh} merged patches and "
                "pad_input is off"
            )
        return h // (p * mh) * mh, w // (p * mw) * mw

    def image_tokens(self, width: int, height: int) -> int:
        """LM tokens of an image of this size (EXIF turns do not change the count)."""
        return self.num_tokens(self.grid_hw(width, height))

    def num_tokens(self, grid_hw: tuple[int, int]) -> int:
        """LM tokens of one image: (h/2)*(w/2) for a 2x2 merge."""
        mh, mw = self.merge_kernel_size
        return (grid_hw[0] // mh) * (grid_hw[1] // mw)

    # ---- processing ---------------------------------------------------------------------------------------
    def _rescale(self, img: Image.Image, name: str) -> Image.Image:
        """Steps 1-3: resized, then padded (or centre-cropped) to the patch grid ``grid_hw`` gives."""
        source = source_size(img)  # a video frame decoded straight to its size is not resized again
        gh, gw = self.grid_hw(*source, name)
        size = self.resized_size(*source)
        if size != img.size:
            img = img.resize(size, Image.Resampling.BICUBIC)
        w, h = img.size
        p = self.patch_size
        if self.pad_input:
            if (gw * p, gh * p) != (w, h):
                canvas = Image.new("RGB", (gw * p, gh * p), (0, 0, 0))
                canvas.paste(img, (0, 0))
                img = canvas
        else:
            left, top = int(round((w - gw * p) / 2.0)), int(round((h - gh * p) / 2.0))
            img = img.crop((left, top, left + gw * p, top + gh * p))
        return img

    def preprocess(self, image: Any) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> (patches (h*w, 3, p, p) float32, grid (h, w))."""
        name = _describe(image)
        img = self._rescale(self.load(image), name)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
        x = x.sub(mean).div(std)
        p = self.patch_size
        c, hh, ww = x.shape
        patches = x.reshape(c, hh // p, p, ww // p, p).permute(1, 3, 0, 2, 4).reshape(-1, c, p, p)
        return patches.contiguous(), (hh // p, ww // p)

    def __call__(self, images: Any) -> dict[str, torch.Tensor]:
        """One image or a list -> {"pixel_values": (sum h*w, 3, p, p) float32, "image_grid_hws": (M, 2) int64}."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        p = self.patch_size
        out = [self.preprocess(im) for im in images]
        pixels = torch.cat([o[0] for o in out]) if out else torch.zeros(0, 3, p, p)
        grids = torch.tensor([o[1] for o in out], dtype=torch.int64).reshape(-1, 2)
        return {"pixel_values": pixels, "image_grid_hws": grids}
