"""The fuzz harness itself: a hanging case is stopped, and errors outside the allowed ones fail the test."""

import time

import pytest

from tests.fuzz.common import CASES, CaseTimeout, case, expect


def test_a_hang_is_stopped_and_counted():
    before = CASES["harness"]
    start = time.perf_counter()
    with pytest.raises(CaseTimeout, match="ran past 0.2 s"), case("harness", seconds=0.2):
        try:
            time.sleep(5)
        except Exception:  # noqa: BLE001, S110 - a broad except in the code under test cannot swallow the timeout
            pass
    assert time.perf_counter() - start < 2 and CASES["harness"] == before + 1
    del CASES["harness"]


def test_expect_lets_only_the_allowed_errors_through():
    assert expect(lambda: 3, ValueError) == 3
    assert expect(lambda: int("x"), ValueError) is None
    with pytest.raises(KeyError):
        expect(lambda: {}["x"], ValueError)
