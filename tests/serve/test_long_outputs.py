"""A long output costs the server time in its length, not its square: the streamed reasoning split (on the event loop,
where every connection waits for it), the engine's stop-string check and text (in the decode worker) and the
non-streamed reply. Each runs a pathological output in a subprocess with a limit of 120 s, 20 to 100 times what it
takes (the code before took 5 to 20 minutes for each), so that going quadratic again fails the test instead of hanging
the suite."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 120  # seconds; each takes one to five, and its imports

ENGINE = """
from kimivl.inference.sampling import SamplingParams
from kimivl.serve.engine import Request, _Choice

class Run:  # every token is the same text
    def __init__(self, text):
        self.bytes = text.encode()

    def is_special(self, token):
        return False

    def token_bytes(self, token):
        return self.bytes

def sent(text, n, stop):
    \"\"\"The text a choice sends for n tokens of ``text`` with these stop strings (it must end by length).\"\"\"
    events = []
    request = Request([1], None, None, SamplingParams(max_new_tokens=n), events.append, stop=stop)
    choice = _Choice(request, 0, Run(text), "cpu", context=n + 1)
    for _ in range(n):
        choice.add(1, set())
    assert choice.finish == "length"
    return "".join(e[2] for e in events if e[0] == "text")
"""


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


def test_a_token_does_not_search_the_length_of_the_stop_strings():
    """Four stop strings of 131,072 characters (the engine's cost must not rest on the request's bound on them), their
    last characters found at every token but never the whole string, and 98,304 tokens: each token searched about
    twice their length of text for the whole string (3 to 25 ms a token: 5 minutes); now it looks for their last
    characters in its own text, and compares the whole string only where they are."""
    _finishes(
        """
        stop = ["a" * 2**16 + "b" + "a" * (2**16 - 1)] * 4
        assert sent("aaaa", 3 * 2**15, stop) == "aaaa" * 3 * 2**15
        """,
        ENGINE,
    )


def test_the_engine_keeps_a_long_text_in_linear_time():
    """16M characters in 256-character tokens: each token copied the whole text so far (``self.text += ...``; 4M
    characters took 166 s of the decode worker)."""
    _finishes('assert sent("abcdefgh" * 32, 2**16, ["\\n"]) == "abcdefgh" * 32 * 2**16', ENGINE)


def test_a_long_reply_that_is_not_streamed_is_joined_in_linear_time():
    """16M characters in 256-character pieces: each piece copied the reply so far (``reply.texts[i] += piece``; 4M
    characters took 142 s of the event loop)."""
    _finishes("""
        import asyncio
        import json
        from types import SimpleNamespace

        from kimivl.serve.app import _collect, _Reply

        async def reply(pieces):
            queue = asyncio.Queue()
            for piece in pieces:
                queue.put_nowait(("text", 0, piece))
            queue.put_nowait(("done", 0, "length", len(pieces)))
            chat = SimpleNamespace(n=1, logprobs=False, stream=False)
            return await _collect(None, queue, _Reply("kimivl-tiny", chat, 1, None))

        body = json.loads(asyncio.run(reply(["abcdefgh" * 32] * 2**16)).body)
        assert body["choices"][0]["message"]["content"] == "abcdefgh" * 32 * 2**16
    """)
