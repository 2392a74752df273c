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
    def __init__(self):
        self.buf, self.mode, self.sent = "", "start", 0  # modes: start, think, after (the close), answer
        self.thought = False  # whether the output opened with a thought

    def feed(self, piece: str) -> tuple[str, str]:
        """(reasoning, answer) text that ``piece`` makes safe to send."""
        self.buf += piece
        reasoning = ""
        if self.mode == "start":
            s = self.buf.lstrip()
            if s.startswith(THINK_OPEN):
                self.mode, self.buf, self.thought = "think", s[len(THINK_OPEN) :].lstrip(), True
            elif THINK_OPEN.startswith(s):  # whitespace or a partial marker so far
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
        """What is left at the end: an unclosed thought is all reasoning."""
        if self.mode == "start":
            return "", self.buf
        if self.mode == "think":
            return self.buf.rstrip()[self.sent :], ""
        return "", ""


def split_reasoning(text: str) -> tuple[str | None, str]:
    """``(reasoning, answer)`` of a whole output, as streaming gives them; reasoning is None without a thought."""
    splitter = ThinkSplitter()
    reasoning, answer = splitter.feed(text)
    rest_r, rest_a = splitter.close()
    return (reasoning + rest_r if splitter.thought else None), answer + rest_a
