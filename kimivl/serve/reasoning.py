"""Splitting a thinking model's streamed output into reasoning (inside ``◁think▷ ... ◁/think▷``) and answer.

The pieces, joined, equal ``parse_thinking`` of the whole text: leading and trailing whitespace of both parts is held
back until later text shows it is inside, and a possible partial marker is held until it completes or cannot.
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
        self.buf, self.mode, self.sent = "", "start", 0  # modes: start, think, answer

    def feed(self, piece: str) -> tuple[str, str]:
        """(reasoning, answer) text that ``piece`` makes safe to send."""
        self.buf += piece
        reasoning = answer = ""
        if self.mode == "start":
            s = self.buf.lstrip()
            if s.startswith(THINK_OPEN):
                self.mode, self.buf = "think", s[len(THINK_OPEN) :].lstrip()
            elif THINK_OPEN.startswith(s):
                return "", ""
            else:
                self.mode, self.buf = "answer", s
        if self.mode == "think":
            self.buf = self.buf.lstrip() if self.sent == 0 else self.buf
            at = self.buf.find(THINK_CLOSE)
            if at >= 0:
                reasoning = self.buf[:at].rstrip()[self.sent :]
                self.mode, self.buf, self.sent = "answer", self.buf[at + len(THINK_CLOSE) :].lstrip(), 0
            else:
                safe = self.buf[: len(self.buf) - _partial_suffix(self.buf, THINK_CLOSE)].rstrip()
                reasoning, self.sent = safe[self.sent :], max(self.sent, len(safe))
                return reasoning, ""
        if self.mode == "answer":
            self.buf = self.buf.lstrip() if self.sent == 0 else self.buf
            safe = self.buf.rstrip()
            answer, self.sent = safe[self.sent :], max(self.sent, len(safe))
        return reasoning, answer

    def close(self) -> tuple[str, str]:
        """What is left at the end: an unclosed thought is all reasoning; held whitespace is dropped."""
        if self.mode == "start":
            return "", self.buf.strip()
        if self.mode == "think":
            return self.buf.rstrip()[self.sent :], ""
        return "", ""
