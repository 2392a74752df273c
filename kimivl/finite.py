"""Whether a number is finite, an int of any size included: ``math.isfinite`` raises ``OverflowError`` on an int too
large for a float (a value of hundreds of digits in a config, a recipe or a request), which is no finite float."""

from __future__ import annotations

import math


def finite(value: float) -> bool:
    """``math.isfinite(value)``, False for an int too large for a float."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
