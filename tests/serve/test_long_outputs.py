"""A long output costs the server time in its length, not its square: the streamed reasoning split (on the event loop,
where every connection waits for it). Each runs a pathological output in a subprocess with a limit of 120 s, 20 to 100
times what it takes (the code before took 10 to 20 minutes for each), so that going quadratic again fails the test
instead of hanging the suite."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 120  # seconds; each takes one to five, and its imports


def _finishes(script: str, helpers: str = "") -> None:
    """Run ``helpers`` and then ``script`` (indented as in a test) in a fresh Python."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(
            [sys.executable, "-c", helpers + textwrap.dedent(script)],
            capture_output=True,
            text=True,
            env=env,
            timeout=LIMIT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"not done in {LIMIT} s: a long output takes time in the square of its length")
    assert done.returncode == 0, done.stderr


def test_whitespace_before_a_possible_thought_is_held_in_linear_time():
    """4M characters of whitespace in 16-character pieces: each piece re-stripped all the whitespace held so far
    (1M characters took 84 s of the event loop, stalling every connection; this, 20 minutes); now each piece costs its
    own length."""
    _finishes("""
        from kimivl.serve.reasoning import ThinkSplitter

        splitter = ThinkSplitter()
        for _ in range(2**18):
            assert splitter.feed(" \\n" * 8) == ("", "")
        assert splitter.feed("x") == ("", " \\n" * 2**21 + "x")
    """)


def test_a_long_thought_is_split_in_linear_time():
    """A thought of 8M characters in 16-character pieces, every other one whitespace (held until text follows):
    each piece searched, sliced and stripped the whole thought so far (1M characters: 10 s; this, 11 minutes)."""
    _finishes("""
        from kimivl.serve.reasoning import ThinkSplitter

        splitter = ThinkSplitter()
        got = [splitter.feed(p) for p in ["◁think▷"] + ["some reasoning: ", " " * 16] * 2**18 + ["◁/think▷ answer"]]
        assert "".join(r for r, _ in got) == ("some reasoning: " + " " * 16) * (2**18 - 1) + "some reasoning:"
        assert "".join(a for _, a in got) == "answer"
    """)
