"""The streamed reasoning/answer split joins to what ``parse_thinking`` gives for the whole text."""

from __future__ import annotations

import random

import pytest

from kimivl.processing.chat_template import parse_thinking
from kimivl.serve.reasoning import ThinkSplitter

TEXTS = [
    "◁think▷ 6 + 9 = 15.\nThe answer is 15. ◁/think▷ 15 ",
    " plain answer\n",
    "◁think▷\nunclosed thought ",
    "◁thi",
    "",
    "  ◁think▷◁/think▷\n\nx y  z\n",
    "◁think▷a◁/thi",
    "◁think▷ ◁ not a marker ◁/think▷◁/think▷",
]


@pytest.mark.parametrize("text", TEXTS)
def test_any_split_into_pieces_joins_to_parse_thinking(text):
    rng = random.Random(0)
    reasoning, answer = parse_thinking(text)
    for _ in range(200):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        splitter, got_r, got_a = ThinkSplitter(), "", ""
        for piece in pieces + [None]:
            r, a = splitter.feed(piece) if piece is not None else splitter.close()
            got_r, got_a = got_r + r, got_a + a
        assert (got_r, got_a) == (reasoning or "", answer), pieces


def test_text_is_sent_as_soon_as_it_cannot_be_a_marker():
    splitter = ThinkSplitter()
    assert splitter.feed("◁thi") == ("", "")
    assert splitter.feed("nk▷I reason ◁/") == ("I reason", "")
    assert splitter.feed("think▷ The") == ("", "The")
    assert splitter.feed(" answer") == ("", " answer")
