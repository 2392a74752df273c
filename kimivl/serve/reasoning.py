"""Splitting a thinking model's output into reasoning and answer, streamed or whole, as the server returns them.

Reasoning is the text between a ``◁think▷`` that opens the output (after optional whitespace) and the next
``◁/think▷`` (or the end), stripped; the answer is what follows the close, its leading whitespace dropped. Output that
does not open with ``◁think▷`` is all answer, unchanged (markers elsewhere are plain text). Streamed pieces join to
``split_reasoning`` of the whole text: whitespace that may end the reasoning and a possible partial marker are held
back until later text decides.
"""

from __future__ import annotations

from kimivl.processing.chat_template import THINK_CLOSE, THINK_OPEN


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ThinkSplitter:
    """Each piece costs time in its own length (and a marker's), whatever came before: only the text not sent yet is
    kept, the whitespace that may end the reasoning as its pieces, joined once when later text sends it."""

    def __init__(self):
        self.mode = "start"  # start, think, after (the close), answer
        self.thought = False  # whether the output opened with a thought
        self.pieces: list[str] = []  # start: the pieces so far (all answer if no thought opens them)
        self.head = ""  # start: the text so far without its leading whitespace (a partial marker)
        self.space: list[str] = []  # think: whitespace held back after the reasoning sent
        self.partial = ""  # think: a partial close marker held back after that whitespace
        self.sent = False  # think: whether any reasoning was sent (leading whitespace is dropped until then)

    def feed(self, piece: str) -> tuple[str, str]:
        """(reasoning, answer) text that ``piece`` makes safe to send."""
        reasoning = ""
        if self.mode == "start":
            self.head = (self.head + piece).lstrip()
            if self.head.startswith(THINK_OPEN):
                self.mode, self.thought, piece = "think", True, self.head[len(THINK_OPEN) :]
            elif THINK_OPEN.startswith(self.head):  # whitespace or a partial marker so far
                self.pieces.append(piece)
                return "", ""
            else:
                self.mode, piece = "answer", "".join(self.pieces) + piece
        if self.mode == "think":
            text = self.partial + piece  # no close marker starts before the held partial one
            text = text if self.sent else text.lstrip()
            at = text.find(THINK_CLOSE)
            self.partial = text[len(text) - _partial_suffix(text, THINK_CLOSE) :] if at < 0 else ""
            body = text[: len(text) - len(self.partial)] if at < 0 else text[:at]
            said = body.rstrip()
            if said:  # the whitespace held before it is reasoning too
                reasoning, self.space, self.sent = "".join(self.space) + said, [body[len(said) :]], True
            else:
                self.space.append(body)
            if at < 0:
                return reasoning, ""
            self.mode, piece = "after", text[at + len(THINK_CLOSE) :]
        if self.mode == "after":
            piece = piece.lstrip()
            if not piece:
                return reasoning, ""
            self.mode = "answer"
        return reasoning, piece

    def close(self) -> tuple[str, str]:
        """What is left at the end: an unclosed thought is all reasoning."""
        if self.mode == "start":
            return "", "".join(self.pieces)
        if self.mode == "think" and self.partial:  # held whitespace without a marker after it ends the reasoning
            return "".join(self.space) + self.partial, ""
        return "", ""


def split_reasoning(text: str) -> tuple[str | None, str]:
    """``(reasoning, answer)`` of a whole output, as streaming gives them; reasoning is None without a thought."""
    splitter = ThinkSplitter()
    reasoning, answer = splitter.feed(text)
    rest_r, rest_a = splitter.close()
    return (reasoning + rest_r if splitter.thought else None), answer + rest_a
