import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from kimivl.processing.data_url import data_url_bytes
from kimivl.processing.image import (
    CLIP_MEAN,
    CLIP_STD,
    SOURCE_SIZE,
    ImageError,
    ImageProcessor,
    mark_source_size,
    source_size,
    to_rgb,
)

MEAN = np.array(CLIP_MEAN, dtype=np.float32)
STD = np.array(CLIP_STD, dtype=np.float32)


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A photo-like HWC uint8 image: smooth gradients plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 127 + 100 * np.sin((x + y) / 9)], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def encoded(a: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt, **kw)
    return buf.getvalue()


def pixel(out: torch.Tensor, grid_w: int, y: int, x: int, p: int = 14) -> np.ndarray:
    """The normalised RGB value of image pixel (y, x) from row-major patches."""
    return out[(y // p) * grid_w + x // p, :, y % p, x % p].numpy()


def normalised(rgb) -> np.ndarray:
    return (np.asarray(rgb, np.float32) / np.float32(255) - MEAN) / STD


def test_pad_100x50():
    a = photo(100, 50)
    out = ImageProcessor()(a)
    pv, grid = out["pixel_values"], out["image_grid_hws"]
    assert pv.shape == (4 * 8, 3, 14, 14) and pv.dtype == torch.float32
    assert grid.tolist() == [[4, 8]] and grid.dtype == torch.int64  # padded to 112x56
    for y, x in [(0, 0), (20, 30), (49, 99), (13, 14)]:
        np.testing.assert_allclose(pixel(pv, 8, y, x), normalised(a[y, x]), rtol=0, atol=1e-6)
    for y, x in [(50, 0), (55, 111), (0, 100), (30, 105)]:  # padding is zero *before* normalisation
        np.testing.assert_allclose(pixel(pv, 8, y, x), -MEAN / STD, rtol=0, atol=1e-6)
    assert ImageProcessor().num_tokens((4, 8)) == 8


@pytest.mark.parametrize(
    "w, h, limit, resized, grid",
    [
        (300, 200, 64, (139, 93), (4, 5)),  # 294 patches > 64: scale sqrt(64/294), int() truncation
        (1200, 900, 4096, (1041, 780), (28, 38)),
        (1000, 500, 4096, (1000, 500), (18, 36)),  # 2485 patches: no resize, pad to 1008x504
        (28, 28, 4096, (28, 28), (1, 1)),
        (5, 3, 4096, (5, 3), (1, 1)),  # smaller than a patch: one padded 28x28 block
        (1260, 42, 64, (613, 20), (1, 22)),  # padding may exceed the limit, as released
    ],
)
def test_geometry(w, h, limit, resized, grid):
    proc = ImageProcessor(in_token_limit=limit)
    assert proc.resized_size(w, h) == resized
    gh, gw = grid[0] * 2, grid[1] * 2
    assert proc.grid_hw(w, h) == (gh, gw)
    out = proc(Image.fromarray(photo(w, h)))
    assert out["image_grid_hws"].tolist() == [[gh, gw]] and out["pixel_values"].shape[0] == gh * gw
    assert proc.num_tokens((gh, gw)) == grid[0] * grid[1]


def test_default_normalisation_is_clips_mean_and_std():
    """The official defaults, written out (the other tests read them from the module they check): a pixel of
    (255, 0, 128) normalises with CLIP's mean (0.48145466, 0.4578275, 0.40821073) and std (0.26862954, 0.26130258,
    0.27577711)."""
    proc = ImageProcessor()
    assert (proc.patch_size, proc.in_token_limit, proc.merge_kernel_size, proc.pad_input) == (14, 4096, (2, 2), True)
    out = proc(np.full((28, 28, 3), (255, 0, 128), np.uint8))["pixel_values"]
    want = [(1 - 0.48145466) / 0.26862954, (0 - 0.4578275) / 0.26130258, (128 / 255 - 0.40821073) / 0.27577711]
    np.testing.assert_allclose(out[0, :, 5, 5].numpy(), want, rtol=0, atol=1e-5)  # 1.93034, -1.75210, 0.34002


def test_downscale_uses_pil_bicubic():
    a = photo(300, 200, seed=3)
    pv = ImageProcessor(in_token_limit=64)(a)["pixel_values"]
    ref = np.asarray(Image.fromarray(a).resize((139, 93), Image.Resampling.BICUBIC))
    for y, x in [(0, 0), (50, 70), (92, 138)]:
        np.testing.assert_allclose(pixel(pv, 10, y, x), normalised(ref[y, x]), atol=1e-6)
    np.testing.assert_allclose(pixel(pv, 10, 93, 0), -MEAN / STD, atol=1e-6)


def test_center_crop_without_pad():
    """Cropped to whole 2x2 merge blocks (28 pixels), not 14: a crop to 98x42 gave grid (3, 7), which the patch merge
    cannot divide."""
    a = photo(100, 50)
    out = ImageProcessor(pad_input=False)(a)
    assert out["image_grid_hws"].tolist() == [[2, 6]]  # 84x28, offsets left 8, top 11
    np.testing.assert_allclose(pixel(out["pixel_values"], 6, 0, 0), normalised(a[11, 8]), atol=1e-6)
    with pytest.raises(ImageError, match="smaller than one"):
        ImageProcessor(pad_input=False)(photo(20, 40))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_encoded_inputs_bytes_and_path(tmp_path, fmt):
    a = photo(90, 61, seed=1)
    data = encoded(a, fmt)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(data)
    proc = ImageProcessor()
    url = f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode()
    for src in (data, str(path), path, url):
        out = proc(src)
        assert out["image_grid_hws"].tolist() == [[6, 8]]
        np.testing.assert_allclose(pixel(out["pixel_values"], 8, 33, 44), normalised(ref[33, 44]), atol=1e-6)


def test_a_file_named_like_a_data_url_is_a_file(tmp_path, monkeypatch):
    """As a video: a path that exists is read as one, not as a (bad) data: URL."""
    (tmp_path / "data:image.png").write_bytes(encoded(photo(30, 20), "PNG"))
    monkeypatch.chdir(tmp_path)
    want = np.asarray(ImageProcessor().load(str(tmp_path / "data:image.png")))
    np.testing.assert_array_equal(np.asarray(ImageProcessor().load("data:image.png")), want)


def test_a_bad_data_url_is_named():
    proc = ImageProcessor()
    with pytest.raises(ImageError, match=r"<data: URL of 26 characters>: the data: URL's payload is not valid base64"):
        proc("data:image/png;base64,@@@@")
    with pytest.raises(ImageError, match="must be 'data:<mime type>;base64,<data>'"):
        proc("data:image/png,abc")


def test_data_urls_are_read_as_browsers_read_them():
    data = encoded(photo(30, 20), "PNG")
    text = base64.b64encode(data).decode()
    assert len(data) % 3 and "=" in text  # so that leaving the padding out is tested
    safe = base64.urlsafe_b64encode(data).decode()
    assert safe != text  # so that the URL-safe alphabet is tested
    want = np.asarray(ImageProcessor().load(data))
    variants = [
        "data:image/png;base64," + base64.encodebytes(data).decode(),  # wrapped at 76 columns
        "data:image/png;base64," + base64.encodebytes(data).decode().replace("\n", "\r\n"),
        "data:image/png;base64," + text.rstrip("="),
        "data:image/png;base64," + safe,
        "data:image/png;BASE64," + text,
        "data:image/png; base64 ," + text,
        " \nDATA:image/png;base64," + text,
    ]
    for url in variants:
        np.testing.assert_array_equal(np.asarray(ImageProcessor().load(url)), want, err_msg=url[:30])
    for garbage, words in (
        ("data:image/png;base64," + text[:-3] + "!" + text[-2:], "not valid base64"),
        ("data:image/png;base64," + text[:-3] + "é" + text[-2:], "not valid base64$"),  # not ASCII
        ("data:image/png;base64,QUJDR", "not valid base64 \\(its length is one past a whole block\\)"),
        ("data:image/png;base64x," + text, "must be 'data:<mime type>;base64,<data>'"),
        ("data:image/png;base64", "must be 'data:<mime type>;base64,<data>'"),  # no comma: no data, not empty data
    ):
        with pytest.raises(ImageError, match=words):
            ImageProcessor().load(garbage)
    with pytest.raises(ValueError, match="over the limit of 100 bytes"):  # before decoding, whitespace not counted
        data_url_bytes("data:;base64," + base64.encodebytes(data).decode(), max_bytes=100)
    assert data_url_bytes("data:;base64," + base64.encodebytes(data).decode(), max_bytes=len(data)) == data
    for size in range(1, 8):  # a limit within a base64 block: 6 bytes passed a limit of 4 or 5
        url = "data:;base64," + base64.b64encode(bytes(size)).decode()
        assert all(len(data_url_bytes(url, max_bytes=limit)) == size for limit in (size, size + 1))
        with pytest.raises(ValueError, match=f"over the limit of {size - 1} bytes"):
            data_url_bytes(url, max_bytes=size - 1)


def test_messages_name_a_long_input_by_its_start_and_length():
    url = "DATA:image/png;base64," + "A" * 2_000_000  # a data: URL in capitals: read as one, not as a path
    with pytest.raises(ImageError, match=r"^cannot decode image <data: URL of 2000022 characters>: not in") as e:
        ImageProcessor().load(url)
    path = "/no/such/dir/" + "x" * 100_000
    with pytest.raises(ImageError, match=r"^cannot read image file /no/such/dir/x+\.\.\. \(100013 characters\): ") as e:
        ImageProcessor().load(path)
    assert len(str(e.value)) < 400


def test_batch_concatenates_in_order():
    imgs = [photo(100, 50), photo(28, 56, seed=2), photo(60, 60, seed=4)]
    proc = ImageProcessor()
    out = proc(imgs)
    assert out["image_grid_hws"].tolist() == [[4, 8], [4, 2], [6, 6]]
    assert out["pixel_values"].shape == (32 + 8 + 36, 3, 14, 14)
    torch.testing.assert_close(out["pixel_values"][32:40], proc(imgs[1])["pixel_values"])
    empty = proc([])
    assert empty["pixel_values"].shape == (0, 3, 14, 14) and empty["image_grid_hws"].shape == (0, 2)


def test_array_inputs():
    proc = ImageProcessor()
    gray = np.full((30, 20), 77, np.uint8)
    np.testing.assert_allclose(pixel(proc(gray)["pixel_values"], 2, 5, 5), normalised([77] * 3), atol=1e-6)
    np.testing.assert_allclose(pixel(proc(gray[:, :, None])["pixel_values"], 2, 5, 5), normalised([77] * 3), atol=1e-6)
    f = np.full((20, 20, 3), 0.5, np.float32)
    np.testing.assert_allclose(pixel(proc(f)["pixel_values"], 2, 0, 0), normalised([128] * 3), atol=1e-6)
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    np.testing.assert_allclose(pixel(proc(rgba)["pixel_values"], 2, 0, 0), normalised([200, 0, 0]), atol=1e-6)
    with pytest.raises(ImageError, match="HWC"):
        proc(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="uint8"):
        proc(np.zeros((4, 4, 3), np.int64))


@pytest.mark.parametrize(
    "values, words",
    [
        (200.0, "float values from 200 to 200; float images must hold values in \\[0, 1\\] \\(divide 0..255"),
        (-0.5, "float values from -0.5 to -0.5"),
        (1.01, "float values from 1.01 to 1.01"),  # past the rounding tolerance (1e-3) already
        (float("nan"), "NaN or infinite"),
        (float("inf"), "NaN or infinite"),
    ],
)
def test_float_images_outside_zero_one_are_refused_not_clipped(values, words):
    a = np.full((20, 20, 3), values, np.float32)
    with pytest.raises(ImageError, match=r"image <array \(20, 20, 3\) float32>: it holds " + words):
        ImageProcessor()(a)
    with pytest.raises(ImageError, match=r"image <PIL F 20x20>: it holds " + words):  # float grey PIL images too
        ImageProcessor()(Image.fromarray(a[:, :, 0]))
    edge = np.full((20, 20, 3), 1.0005, np.float32)  # rounding just past 1 is kept, as 255
    edge[0, 0] = -0.0005
    out = ImageProcessor()(edge)["pixel_values"]
    np.testing.assert_allclose(pixel(out, 2, 1, 1), normalised([255] * 3), atol=1e-6)
    np.testing.assert_allclose(pixel(out, 2, 0, 0), normalised([0] * 3), atol=1e-6)


def _mode_image(mode: str) -> tuple[Image.Image, tuple, tuple]:
    """(image, expected RGB over black, expected RGB over white) for a uniform 16x16 image."""
    if mode == "P":
        im = Image.new("P", (16, 16), 1)
        im.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
        return im, (10, 20, 30), (10, 20, 30)
    if mode == "P+transparency":
        im = Image.new("P", (16, 16), 1)
        im.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
        im.info["transparency"] = 1
        return im, (0, 0, 0), (255, 255, 255)
    table = {
        "L": (100, (100,) * 3, (100,) * 3),
        "1": (1, (255,) * 3, (255,) * 3),
        "RGBA": ((200, 100, 50, 255), (200, 100, 50), (200, 100, 50)),
        "RGBA-half": ((200, 100, 50, 102), (80, 40, 20), (233, 193, 173)),
        "LA": ((100, 0), (0, 0, 0), (255, 255, 255)),
        "La": ((40, 102), (40,) * 3, (193,) * 3),  # premultiplied: 100 at 40% opacity
        "RGBa": ((80, 40, 20, 102), (80, 40, 20), (233, 193, 173)),
        "CMYK": ((0, 0, 0, 0), (255, 255, 255), (255, 255, 255)),
        "YCbCr": ((128, 128, 128), (128, 128, 128), (128, 128, 128)),
        "I;16": (25700, (100,) * 3, (100,) * 3),
        "I": (51400, (200,) * 3, (200,) * 3),
        "F": (0.25, (64,) * 3, (64,) * 3),
    }
    value, black, white = table[mode]
    return Image.new(mode.split("-")[0], (16, 16), value), black, white


@pytest.mark.parametrize(
    "mode",
    ["L", "1", "P", "P+transparency", "RGBA", "RGBA-half", "LA", "La", "RGBa", "CMYK", "YCbCr", "I;16", "I", "F"],
)
def test_every_mode(mode):
    im, black, white = _mode_image(mode)
    for background, expect in (("black", black), ("white", white)):
        got = pixel(ImageProcessor(background=background)(im)["pixel_values"], 2, 3, 3)
        np.testing.assert_allclose(got, normalised(expect), atol=1.01 / 255 / STD.min())


@pytest.mark.parametrize("mode, key", [("RGB", (255, 255, 255)), ("L", 255), ("I;16", 65535)])
def test_a_colour_key_is_transparency(mode, key):
    im = Image.new(mode, (16, 16), key)  # a dot on a background of the transparent colour (a PNG tRNS chunk)
    im.putpixel((5, 5), {"RGB": (200, 0, 0), "L": 90, "I;16": 90 * 257}[mode])
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=key)
    assert Image.open(io.BytesIO(buf.getvalue())).info["transparency"] == key
    dot = [200, 0, 0] if mode == "RGB" else [90] * 3
    for background, colour in (("black", [0] * 3), ("white", [255] * 3)):
        out = ImageProcessor(background=background).load(buf.getvalue())
        assert list(out.getpixel((0, 0))) == colour and list(out.getpixel((5, 5))) == dot, background
    assert ImageProcessor(background=None).load(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_alpha_dropped_when_background_none():
    im = Image.new("RGBA", (16, 16), (200, 100, 50, 0))
    got = pixel(ImageProcessor(background=None)(im)["pixel_values"], 2, 0, 0)
    np.testing.assert_allclose(got, normalised([200, 100, 50]), atol=1e-6)


def test_sixteen_bit_png_is_rescaled_not_clipped():
    a = np.array([[0, 257 * 50, 65535]], np.uint16).repeat(3, 0)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    pv = ImageProcessor()(buf.getvalue())["pixel_values"]
    got = [pixel(pv, 2, 0, x)[0] for x in range(3)]
    np.testing.assert_allclose(got, normalised([[0] * 3, [50] * 3, [255] * 3])[:, 0], atol=1e-6)


def test_sixteen_bit_values_round_to_the_nearest_eight_bit_value():
    """v / 257 rounded: 128 (0.498) is 0, 255 (0.992) is 1, 385 (1.498) is 1, 386 (1.502) is 2, 65535 is 255."""
    a = np.array([[0, 128, 255, 385, 386, 65535]], np.uint16)
    got = np.asarray(to_rgb(Image.fromarray(a)))
    assert Image.fromarray(a).mode.startswith("I;16")
    assert got[0, :, 0].tolist() == [0, 0, 1, 1, 2, 255] and (got == got[..., :1]).all()


def test_exif_orientation():
    a = np.zeros((20, 40, 3), np.uint8)
    a[:5, :5] = 255  # a white block at the top-left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG", exif=exif)
    proc = ImageProcessor()
    upright = proc.load(buf.getvalue())
    assert upright.size == (20, 40)
    arr = np.asarray(upright)
    assert arr[0, -1].tolist() == [255] * 3 and arr[0, 0].tolist() == [0] * 3  # top-left went to top-right
    assert proc(buf.getvalue())["image_grid_hws"].tolist() == [[4, 2]]  # 20x40 upright -> 28x56


def png_header_only(w: int, h: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_bad_images(tmp_path):
    proc = ImageProcessor()
    jpeg = encoded(photo(64, 64), "JPEG")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    cases = [
        (b"definitely not an image", r"<23 bytes>: not in an accepted format \(PNG, JPEG, GIF, WEBP, BMP, TIFF\)"),
        (jpeg[: len(jpeg) // 2], "cannot decode"),  # truncated JPEG
        (b"", "empty"),
        (str(empty), "empty"),
        (str(tmp_path / "missing.png"), "cannot read image file .*missing.png: No such file"),
        (png_header_only(10_000, 10_000), "over max_pixels"),  # 100 MP: caught from the header alone
        (png_header_only(100_000, 100_000), "decompression bomb"),
        (png_header_only(64, 64), "cannot decode"),  # header fine, pixel data short
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (Image.new("RGB", (0, 5)), "zero size"),
        (12345, "expected a path"),
    ]
    for src, match in cases:
        with pytest.raises(ImageError, match=match):
            proc(src)
    with pytest.raises(ImageError, match=r"<1[0-9]+ bytes>"):  # the message names the input
        proc(b"x" * 100)
    with pytest.raises(ImageError, match="over max_pixels"):
        ImageProcessor(max_pixels=100)(photo(20, 20))
    # Pillow refuses an encoded image over its own ceiling (about 179M pixels) first; the message says max_pixels
    # cannot raise it, and the one for max_pixels says how far it can be raised
    ceiling = 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match=f"raise max_pixels to allow it, up to {ceiling} for an encoded image"):
        ImageProcessor(max_pixels=1 << 26)(png_header_only(9000, 9000))
    assert ceiling < 15000 * 15000 < 1 << 28
    with pytest.raises(ImageError, match="Pillow's ceiling for an encoded image, which max_pixels cannot raise"):
        ImageProcessor(max_pixels=1 << 28)(png_header_only(15000, 15000))
    assert issubclass(ImageError, ValueError)


def test_config_round_trip(tmp_path):
    official = {
        "patch_size": 14,
        "in_token_limit": 16384,
        "merge_kernel_size": [2, 2],
        "pad_input": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "num_pooled_tokens": 1024,
        "image_processor_type": "KimiVLImageProcessor",
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(official))
    proc = ImageProcessor.from_pretrained(tmp_path)
    assert proc.in_token_limit == 16384 and proc.image_mean == (0.5,) * 3 and proc.merge_kernel_size == (2, 2)
    out = proc(np.full((28, 28, 3), 255, np.uint8))["pixel_values"]
    assert torch.allclose(out, torch.ones_like(out))  # (1 - 0.5) / 0.5
    proc.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert {k: saved[k] for k in official} == official
    assert ImageProcessor().image_mean == CLIP_MEAN and ImageProcessor().image_std == CLIP_STD
    with pytest.raises(FileNotFoundError):
        ImageProcessor.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "preprocessor_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not a valid"):
        ImageProcessor.from_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a valid preprocessor_config.json: it holds a JSON list, not an object"):
        ImageProcessor.from_pretrained(tmp_path / "bad")


def test_an_image_too_long_for_moonvits_rope_is_scaled_down_to_fit():
    from kimivl.processing.image import MAX_GRID_SIDE

    proc = ImageProcessor(in_token_limit=10**6)  # the token budget alone would keep all 514 patches of its width
    patches, (h, w) = proc.preprocess(np.zeros((20, 7200, 3), np.uint8))
    assert (h, w) == (2, MAX_GRID_SIDE - 2) and patches.shape[0] == h * w  # 7140 x 19 px, padded to whole merges
    assert proc.resized_size(1000, 800) == (1000, 800)  # ordinary images are untouched


def test_a_short_side_scaled_to_one_pixel_is_kept():
    """Only a side scaled under one pixel is refused: 1400x14 with a budget of 1 patch scales by 0.1 to 140x1."""
    proc = ImageProcessor(in_token_limit=1)
    assert proc.resized_size(1400, 14) == (140, 1) and proc.resized_size(14, 1400) == (1, 140)
    assert proc.preprocess(np.zeros((14, 1400, 3), np.uint8))[1] == (2, 10)


def test_grid_hw_refuses_what_preprocess_refuses_and_names_the_rope_limit():
    proc = ImageProcessor()
    assert proc.grid_hw(7141, 14) == (2, 510)  # scaled to 7140 x 13, padded to 7140 x 28
    assert proc.preprocess(np.zeros((14, 7141, 3), np.uint8))[1] == (2, 510)
    rope = r"too elongated: scaled so its long side stays under 512 patches \(7140 pixels; MoonViT's RoPE table"
    for w, h in ((1, 7167), (7167, 1)):  # 7140/7167 of one pixel is none
        with pytest.raises(ImageError, match=rf"a {w}x{h} image is {rope}"):
            proc.grid_hw(w, h)
        with pytest.raises(ImageError, match=rf"image <array \({h}, {w}, 3\) uint8> \({w}x{h}\) is {rope}"):
            proc.preprocess(np.zeros((h, w, 3), np.uint8))
    with pytest.raises(ImageError, match="no pixels"):
        proc.grid_hw(0, 10)
    crop = ImageProcessor(pad_input=False)
    assert crop.grid_hw(30, 28) == (2, 2)
    with pytest.raises(ImageError, match=r"\(27x30\) is smaller than one 28x28 block of 2x2 merged patches and pad_"):
        crop.grid_hw(27, 30)
    with pytest.raises(ImageError, match="smaller than one 28x28 block"):
        crop.preprocess(np.zeros((30, 27, 3), np.uint8))


@torch.no_grad()
@pytest.mark.parametrize("pad_input", [False, True])
def test_announced_tokens_are_the_encoders_output_at_odd_sizes(tiny_model, pad_input):
    """Without padding, a 70x42 image was cropped to grid (3, 5): announced as 2 tokens, then refused by the patch
    merge ("not divisible by the merge kernel")."""
    proc = ImageProcessor(pad_input=pad_input)
    for i, (w, h) in enumerate([(70, 42), (99, 57), (43, 29), (28, 28), (141, 83), (57, 200)]):
        out = proc(photo(w, h, seed=i))
        assert out["image_grid_hws"].tolist() == [list(proc.grid_hw(w, h))]
        feats = tiny_model.get_image_features(out["pixel_values"], out["image_grid_hws"])
        assert feats.shape[0] == proc.image_tokens(w, h) > 0, (w, h)


def test_an_image_marked_with_its_source_size_is_processed_as_that_source():
    ip = ImageProcessor()
    img = Image.fromarray(photo(1210, 676))
    small = img.resize((1205, 673), Image.Resampling.BICUBIC)  # the size the processor gives img
    assert ip.resized_size(1210, 676) == (1205, 673) and ip.resized_size(1205, 673) == (1200, 670)
    assert ip.preprocess(small)[1] == (48, 86)  # unmarked, it is over the budget again and resized anew
    mark_source_size(small, (1210, 676))  # as a video frame decoded straight to that size is marked
    (got, grid), (want, want_grid) = ip.preprocess(small), ip.preprocess(img)
    assert grid == want_grid == (50, 88) and torch.equal(got, want)
    shrunk = img.resize((605, 338), Image.Resampling.BICUBIC)  # smaller than that: resized up to it
    mark_source_size(shrunk, (1210, 676))
    assert ip.preprocess(shrunk)[1] == (50, 88)
    # Pillow copies info through crop and resize: the results are other images, processed at their own sizes
    assert source_size(small.crop((0, 0, 600, 673))) == (600, 673)
    assert ip.preprocess(small.crop((0, 0, 600, 673)))[1] == ip.grid_hw(600, 673) == (50, 44)
    assert ip.preprocess(small.resize((56, 56)))[1] == (4, 4)


def test_an_image_files_own_metadata_is_not_a_source_size(tmp_path):
    meta = PngImagePlugin.PngInfo()
    meta.add_text(SOURCE_SIZE, "(4000, 4000)")
    Image.fromarray(photo(100, 50)).save(tmp_path / "a.png", pnginfo=meta)
    ip = ImageProcessor()
    assert ip.load(tmp_path / "a.png").info[SOURCE_SIZE] == "(4000, 4000)"
    assert source_size(ip.load(tmp_path / "a.png")) == (100, 50) and ip.preprocess(tmp_path / "a.png")[1] == (4, 8)


def test_two_threads_reading_images_at_once_leave_the_warning_filters_as_they_were(monkeypatch):
    """Each read swapped the process's warning filters (catch_warnings) and put them back on exit: a thread leaving
    after another had entered put back the other's filters, and Pillow's warning stayed silenced for good."""
    import threading
    import warnings

    from kimivl.processing import image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    before, real_open = list(warnings.filters), Image.open
    inside = {"a": threading.Event(), "b": threading.Event()}
    a_left = threading.Event()

    def meeting_open(*args, **kwargs):  # a waits (up to 1 s) for b to be inside too; b waits for a to leave first
        me = threading.current_thread().name
        inside[me].set()
        inside["b"].wait(1) if me == "a" else a_left.wait(5)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(image.Image, "open", meeting_open)

    def read(me):
        image.open_image(io.BytesIO(buffer.getvalue()), me)
        if me == "a":
            a_left.set()

    threads = [threading.Thread(target=read, args=(me,), name=me) for me in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert warnings.filters == before
