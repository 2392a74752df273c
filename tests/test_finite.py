"""An int too large for a float (hundreds of digits) is refused as not finite where a number is read, with the
reader's own error, not an ``OverflowError`` from ``math.isfinite`` or ``float``."""

import pytest
from PIL import Image

from kimivl.data.formats import DataError, parse_record
from kimivl.eval.mathvista import _precision
from kimivl.eval.tables import RowError
from kimivl.finite import finite
from kimivl.processing.image import ImageProcessor

HUGE = 10**400


def test_finite_is_false_for_an_int_too_large_for_a_float_and_true_for_a_large_one():
    assert finite(10**300) and finite(-(10**300)) and finite(1.5)
    assert finite(HUGE) is False and finite(-HUGE) is False  # a bool, as math.isfinite gives
    assert not finite(float("inf")) and not finite(float("nan"))


def test_readers_of_numbers_refuse_an_int_too_large_for_a_float(tmp_path):
    with pytest.raises(ValueError, match="image_mean/image_std need 3 finite numbers"):
        ImageProcessor(image_mean=[HUGE, 0.5, 0.5])
    frames = []
    for k in range(2):
        Image.new("RGB", (28, 28)).save(tmp_path / f"{k}.png")
        frames.append(f"{k}.png")
    part = {"type": "video", "frames": frames, "timestamps": [0, HUGE]}
    with pytest.raises(DataError, match="timestamps"):
        parse_record({"messages": [{"role": "user", "content": [part]}]}, tmp_path)
    with pytest.raises(RowError, match="precision must be a whole number of decimal places"):
        _precision(HUGE)
