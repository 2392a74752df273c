"""The server's reasoning/answer split: what it gives for whole outputs, and streamed pieces joining to it."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimivl.processing.chat_template import THINK_CLOSE, THINK_OPEN
from kimivl.serve.reasoning import ThinkSplitter, _partial_suffix, split_reasoning

CASES = [
    ("◁think▷ 6 + 9 = 15.\nThe answer is 15. ◁/think▷ 15 ", ("6 + 9 = 15.\nThe answer is 15.", "15 ")),
    (" plain answer\n", (None, " plain answer\n")),  # no thought: the text unchanged, as generate returns it
    ("◁think▷\nunclosed thought ", ("unclosed thought", "")),
    ("◁thi", (None, "◁thi")),
    ("", (None, "")),
    ("  ◁think▷◁/think▷\n\nx y  z\n", ("", "x y  z\n")),
    ("◁think▷a◁/thi", ("a◁/thi", "")),
    ("◁think▷ ◁ not a marker ◁/think▷◁/think▷", ("◁ not a marker", "◁/think▷")),
    ("2 ◁/think▷ 3", (None, "2 ◁/think▷ 3")),  # a close without an opening thought is answer text
    ("x ◁think▷ y ◁/think▷ z", (None, "x ◁think▷ y ◁/think▷ z")),  # so is a thought that does not open it
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_whole_outputs_split_as_documented(text, expected):
    assert split_reasoning(text) == expected


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_any_split_into_pieces_joins_to_the_whole_split(text, expected):
    rng = random.Random(0)
    reasoning, answer = expected
    for _ in range(200):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        splitter, got_r, got_a = ThinkSplitter(), "", ""
        for piece in pieces + [None]:
            r, a = splitter.feed(piece) if piece is not None else splitter.close()
            got_r, got_a = got_r + r, got_a + a
        assert (got_r, got_a) == (reasoning or "", answer), pieces


class RescanningSplitter:
    """The splitter as it was first written, the reference for the incremental one: it keeps all the text and reads it
    again for each piece (time in the square of the output's length)."""

    def __init__(self):
        self.buf, self.mode, self.sent = "", "start", 0

    def feed(self, piece: str) -> tuple[str, str]:
        self.buf += piece
        reasoning = ""
        if self.mode == "start":
            s = self.buf.lstrip()
            if s.startswith(THINK_OPEN):
                self.mode, self.buf = "think", s[len(THINK_OPEN) :].lstrip()
            elif THINK_OPEN.startswith(s):
                return "", ""
            else:
                self.mode = "answer"
        if self.mode == "think":
            self.buf = self.buf.lstrip() if self.sent == 0 else self.buf
            at = self.buf.find(THINK_CLOSE)
            if at < 0:
                safe = self.buf[: len(self.buf) - _partial_suffix(self.buf, THINK_CLOSE)].rstrip()
                reasoning, self.sent = safe[self.sent :], max(self.sent, len(safe))
                return reasoning, ""
            reasoning = self.buf[:at].rstrip()[self.sent :]
            self.mode, self.buf = "after", self.buf[at + len(THINK_CLOSE) :]
        if self.mode == "after":
            self.buf = self.buf.lstrip()
            if not self.buf:
                return reasoning, ""
            self.mode = "answer"
        answer, self.buf = self.buf, ""
        return reasoning, answer

    def close(self) -> tuple[str, str]:
        if self.mode == "start":
            return "", self.buf
        if self.mode == "think":
            return self.buf.rstrip()[self.sent :], ""
        return "", ""


ATOMS = [
    THINK_OPEN,
    THINK_CLOSE,
    "◁",
    "▷",
    "/",
    "think",
    "◁/th",
    "◁thi",
    "nk▷",
    " ",
    "  ",
    "\n",
    "\t",
    "\u3000",
    "a",
    "b c",
]


@st.composite
def split_outputs(draw) -> list[str]:
    """An output made of markers, pieces of markers, whitespace and text, most often opening with a thought, cut into
    pieces anywhere."""
    opening = draw(st.sampled_from(["", " ", "\n "])) + draw(st.sampled_from([THINK_OPEN] * 3 + ["◁thi", "", "a"]))
    text = opening + "".join(draw(st.lists(st.sampled_from(ATOMS), max_size=14)))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=10)))
    return [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]


@settings(max_examples=400, deadline=None, derandomize=True)
@given(split_outputs())
def test_each_piece_gives_what_the_rescanning_splitter_gave(pieces):
    """The splitter keeps only the text not sent yet (its whitespace as pieces) so that a piece costs its own length;
    piece by piece it gives exactly what the first one, which read all the text again each time, gave."""
    new, old = ThinkSplitter(), RescanningSplitter()
    for piece in pieces:
        assert new.feed(piece) == old.feed(piece), pieces
    assert new.close() == old.close(), pieces
    reasoning, answer = split_reasoning("".join(pieces))
    assert new.thought == (reasoning is not None)


def test_text_is_sent_as_soon_as_it_cannot_be_a_marker():
    splitter = ThinkSplitter()
    assert splitter.feed("◁thi") == ("", "")
    assert splitter.feed("nk▷I reason ◁/") == ("I reason", "")
    assert splitter.feed("think▷ The") == ("", "The")
    assert splitter.feed(" answer ") == ("", " answer ")
    plain = ThinkSplitter()
    assert plain.feed(" ") == ("", "")
    assert plain.feed("4\n") == ("", " 4\n")


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_an_output_that_opens_with_a_thought_splits_as_chat_eval_and_rewards_split_it(text, expected):
    """One rule for outputs that open with a thought (the only ones the server splits): the server's reasoning and
    answer are ``parse_thinking``'s (the answer unstripped), and the RL reward reads that same answer."""
    from kimivl.processing.chat_template import THINK_CLOSE, parse_thinking
    from kimivl.rl.rewards import answer_of

    reasoning, answer = split_reasoning(text)
    if reasoning is None:
        return
    assert (reasoning, answer.strip()) == parse_thinking(text)
    assert answer_of(text) == (answer.strip() if THINK_CLOSE in text else None)


def _replies(text: str) -> tuple[dict, list[dict]]:
    """The plain reply's message and the streamed deltas that the app's reply builders make of an engine's output
    ``text`` (given a character at a time, then finished by max_tokens)."""
    from kimivl.serve.app import _collect, _Reply, _stream
    from kimivl.serve.schema import ChatRequest

    class Job:
        def cancel(self):
            pass

    async def build(stream: bool):
        queue = asyncio.Queue()
        for ch in text:
            queue.put_nowait(("text", 0, ch))
        queue.put_nowait(("done", 0, "length", len(text)))
        reply = _Reply("m", ChatRequest(messages=[], max_tokens=None, stream=stream), 1, tokenizer=None)
        if stream:
            return [json.loads(c[6:]) async for c in _stream(Job(), queue, reply) if c != "data: [DONE]\n\n"]
        return json.loads((await _collect(Job(), queue, reply)).body)

    plain, chunks = asyncio.run(build(False)), asyncio.run(build(True))
    return plain["choices"][0]["message"], [c["choices"][0]["delta"] for c in chunks]


@pytest.mark.parametrize("text", ["◁think▷", "◁think▷ ◁/think▷ x", "◁think▷ a ◁/think▷ b", "x"])
def test_the_streamed_deltas_join_to_the_plain_reply_field_by_field(text):
    """An empty thought (a reply cut by max_tokens just after ``◁think▷``) has no reasoning_content either way."""
    message, deltas = _replies(text)
    joined = {}
    for d in deltas:
        for key, value in d.items():
            joined[key] = value if key == "role" else joined.get(key, "") + value
    assert joined == message
    assert ("reasoning_content" in message) == (split_reasoning(text)[0] not in (None, ""))
