"""Generated images and videos: random and mutated bytes, arrays of every shape and type, broken timestamps. Each is
an ImageError/VideoError or finite model inputs."""

import io

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from kimivl.processing.image import ImageError, ImageProcessor, source_size
from kimivl.processing.video import VideoError, frames_to_parts, load_video
from tests.fuzz.common import case, expect, fuzz
from tests.processing.test_video_frames import make_video

PROCESSOR = ImageProcessor(in_token_limit=64, max_pixels=1 << 16, max_bytes=1 << 16)


def _encoded(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


SAMPLES = {
    fmt: _encoded(fmt, mode)
    for fmt, mode in [("PNG", "RGBA"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"), ("TIFF", "RGB"), ("WEBP", "RGB")]
}


def _process(image):
    out = PROCESSOR([image])
    assert torch.isfinite(out["pixel_values"]).all()
    assert out["pixel_values"].shape[0] == int(out["image_grid_hws"].prod(-1).sum())
    return out


def _mutate(data: bytes, edits) -> bytes:
    data = bytearray(data)
    for at, value in edits:
        data[at % len(data)] = value
    return bytes(data)


@fuzz(150)
@given(
    st.sampled_from(sorted(SAMPLES)),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    st.integers(1, 10**6),
)
def test_mutated_image_files(fmt, edits, cut):
    data = _mutate(SAMPLES[fmt], edits)
    data = data[: max(1, cut % (len(data) + 1))]
    with case("image: mutated files"):
        expect(lambda: _process(data), ImageError)


@fuzz(60)
@given(st.binary(max_size=300))
def test_random_image_bytes(data):
    with case("image: random bytes"):
        expect(lambda: _process(data), ImageError)


@fuzz(100)
@given(
    hnp.arrays(
        st.sampled_from([np.uint8, np.float32, np.float64, np.int16, np.bool_, np.uint16]),
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=40),
        elements=None,
    )
)
def test_arrays_of_any_shape_and_type(array):
    with case("image: arrays"):
        expect(lambda: _process(array), ImageError)


@fuzz(30)
@given(
    st.one_of(
        st.none(),
        st.integers(),
        st.text(max_size=20),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    )
)
def test_things_that_are_not_images(value):
    with case("image: other values"):
        expect(lambda: _process(value), ImageError)


@pytest.fixture(scope="module")
def video():
    return make_video(n=6, rate=4)


def _frames(source):
    frames, times = load_video(source, fps=2.0, max_frames=4, image_processor=PROCESSOR)
    assert len(frames) == len(times) <= 4 and all(f.size == PROCESSOR.resized_size(*source_size(f)) for f in frames)
    assert all(t >= 0 for t in times)
    return frames


@fuzz(60)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8), st.integers(1, 10**6))
def test_mutated_videos(video, edits, cut):
    data = _mutate(video, edits)
    data = data[: max(1, cut % (len(data) + 1))]
    with case("video: mutated files"):
        expect(lambda: _frames(data), VideoError)


@fuzz(30)
@given(st.binary(max_size=400))
def test_random_video_bytes(data):
    with case("video: random bytes"):
        expect(lambda: _frames(data), VideoError)


@fuzz(100)
@given(
    st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.integers(-5, 10**6),
            st.none(),
            st.booleans(),
            st.text(max_size=3),
        ),
        max_size=4,
    ),
    st.integers(0, 4),
)
def test_frame_timestamps(times, n_frames):
    frames = [np.zeros((4, 4, 3), np.uint8)] * n_frames
    with case("video: frame timestamps"):
        parts = expect(lambda: frames_to_parts(frames, times), VideoError)
    if parts is not None:
        assert len(parts) == 2 * n_frames and all(t >= 0 for t in times)
