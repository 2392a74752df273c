"""The in-memory sample every synthetic generator returns, and the long-CoT target format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from kimivl.processing.chat_template import THINK_CLOSE, THINK_OPEN

DIFFICULTIES = ("easy", "medium", "hard")


@dataclass
class Clip:
    """A short video as sampled frames and their times in seconds."""

    frames: list[Image.Image]
    timestamps: list[float]


Part = str | Image.Image | Clip


@dataclass
class Sample:
    """One synthetic question: the user turn (text, images and clips in order) and its gold answer.

    ``meta`` always holds ``task``, ``kind`` (the question template), ``difficulty`` and ``gold`` (the answer
    in a scorer-friendly form: int, str, list of str, a normalised ``[x, y]`` point or ``[x1, y1, x2, y2]`` box),
    plus what was drawn, in normalised coordinates where it has a place.
    """

    content: list[Part]
    answer: str
    meta: dict[str, Any]
    solution: str | None = None

    @property
    def images(self) -> list[Image.Image]:
        """Every image of the user turn in order, clip frames included."""
        return [im for p in self.content if not isinstance(p, str) for im in (p.frames if isinstance(p, Clip) else [p])]

    @property
    def question(self) -> str:
        return next(p for p in reversed(self.content) if isinstance(p, str))

    def target(self, thinking: bool = False) -> str:
        """The assistant turn: the answer, or with ``thinking`` the solution wrapped as a long-CoT target."""
        if thinking and self.solution is not None:
            return thinking_target(self.solution, self.answer)
        return self.answer


def thinking_target(solution: str, answer: str) -> str:
    """``◁think▷{solution}◁/think▷{answer}``: the Kimi-VL-Thinking output layout (spec section 9)."""
    return f"{THINK_OPEN}{solution}{THINK_CLOSE}{answer}"
