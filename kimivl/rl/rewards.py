"""Rule-based rewards for RL, in [0, 1], read from the answer after ``◁/think▷``.

A response that never closes its reasoning (no ``◁/think▷``) has no answer and gets 0, and so does one without any
think markers: the RL policy is a thinking model and must keep its format. Checkers, each ``(answer, meta) -> float``:

- ``numeric``: the **last** number of the answer (after units such as ``cm``, ``cm²`` or ``m^2`` are stripped, so
  their exponents are not read as numbers; thousands commas allowed) equals ``meta['gold']`` within
  ``max(abs_tol, rel_tol * |gold|)``. The last number because a worked answer ends on its result
  ("3 + 4 = 7"); held-out scoring (``kimivl.eval.synthetic``) reads the first integer, and the two agree on
  answers holding one number, which is what the synthetic tasks ask for.
- ``option``: the option letter, from "B", "(B)", "B." / "B)" / "B。" at the start, or "answer is B" ("答案是B",
  "故选B", "故選B", "答えはB", "정답은 B"), equals the gold letter (full-width forms such as "（Ｂ）" read as ASCII; a
  lower-case letter only bracketed, "answer is (b)", and "A" or "I" before a lower-case word is that word, "the
  answer is A right triangle", as eval's ``parse_option`` reads them).
- ``string``: case-, space-, punctuation- and symbol-insensitive equality (OCR; ``kimivl.eval.answers.normalize_text``:
  accents and vowel signs count); no substring credit, which a policy could farm by writing many words.
- ``point_in_box``: a point "(x, y)" or a box's centre (the first two or four numbers) inside ``meta['box']``
  ``[x1, y1, x2, y2]``, normalised coordinates (GUI grounding).

``REWARDS`` maps a synthetic task name to its checker; other tasks fall back to ``kimivl.eval.synthetic.score``
(binary correctness as held-out evaluation counts it). ``register`` adds or replaces a task's checker.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from kimivl.eval.answers import half_width, normalize_text
from kimivl.eval.synthetic import clicked, score
from kimivl.processing.chat_template import THINK_CLOSE, parse_thinking

Checker = Callable[[str, dict[str, Any]], float]

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_UNIT = re.compile(r"(?<![A-Za-z])(?:mm|cm|km|m|in|ft|units?|sq)(?:\s*\^\s*[23]|[²³]|[23](?!\d))?(?![A-Za-z])|[²³]")
# "A" or "I" before a lower-case word is that word ("A right triangle", "I think"), as eval's parse_option reads it
_WORD_AI = r"(?![AI]\s+[a-z])"
_LEAD_LETTER = re.compile(rf"^\(?{_WORD_AI}([A-Z])(?:[).:,;。、]|$|\s)")
_PAREN_LETTER = re.compile(r"\(([A-Za-z])\)")  # "(b)" too, as eval reads it
# "answer is B", and the Chinese, Japanese and Korean cues ("答案是B", "故选B", "故選B", "答えはB", "정답은 B"); the cue
# in any case, the letter a capital or, as eval's parse_option reads it, a bracketed lower-case one ("answer is (b)"):
# in "the answer is a right triangle (B)" the article is no letter, nor the capital in "the answer is A right triangle"
_SAID_LETTER = re.compile(
    r"(?i:answer is|答案\s*(?:应该|應該)?(?:是|为|為|:)|[故应應][选選]|答えは|正解は|정답은):?\s*"
    rf"\(?((?<=\()[a-z](?=\))|{_WORD_AI}[A-Z](?![A-Za-z0-9]))"
)


def answer_of(response: str) -> str | None:
    """The answer of ``parse_thinking`` (the text after the first ``◁/think▷``, as eval scores it), or None when the
    response never closes its reasoning."""
    return parse_thinking(response)[1] if THINK_CLOSE in response else None


def numbers(text: str) -> list[float]:
    """The numbers in ``text`` in order, after unit words and their exponents are removed."""
    return [float(n.replace(",", "")) for n in _NUMBER.findall(_UNIT.sub(" ", text))]


def numeric(answer: str, meta: dict[str, Any], rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> float:
    found = numbers(answer)
    if not found:
        return 0.0
    gold = _finite_gold(meta["gold"])
    return float(abs(found[-1] - gold) <= max(abs_tol, rel_tol * abs(gold)))


def _finite_gold(gold: Any) -> float:
    """``gold`` as a float; a ``ValueError`` for one that is no finite float (an infinite gold was within tolerance of
    every number, a NaN of none; an int of hundreds of digits raised ``OverflowError``)."""
    try:
        value = float(gold)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"meta.gold {str(gold)[:40]!r} is not a finite number")
    return value


def option(answer: str, meta: dict[str, Any]) -> float:
    answer = half_width(answer).strip()
    # what the answer says is its letter first: a leading "A" or "I" is more often a word than the option
    found = _SAID_LETTER.search(answer) or _PAREN_LETTER.search(answer) or _LEAD_LETTER.match(answer)
    return float(found is not None and found.group(1).upper() == str(meta["gold"]).strip().upper())


def string(answer: str, meta: dict[str, Any]) -> float:
    gold = meta["gold"]
    gold = " ".join(map(str, gold)) if isinstance(gold, list) else str(gold)
    said = normalize_text(answer)
    return float(bool(said) and said == normalize_text(gold))


def point_in_box(answer: str, meta: dict[str, Any]) -> float:
    return float(clicked(answer, meta["box"]))


def binary(answer: str, meta: dict[str, Any]) -> float:
    """Held-out scoring's notion of correct (``kimivl.eval.synthetic.score``)."""
    return float(score(answer, meta))


REWARDS: dict[str, Checker] = {"reasoning": numeric, "ocr": string, "gui": point_in_box}


def register(task: str, checker: Checker) -> None:
    REWARDS[task] = checker


def correctness(response: str, meta: dict[str, Any]) -> float:
    """The reward of ``response`` to the problem whose meta is ``meta`` (its ``task`` picks the checker)."""
    answer = answer_of(response)
    if answer is None:
        return 0.0
    return REWARDS.get(meta.get("task"), binary)(answer, meta)
