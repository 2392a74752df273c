"""Reading answers out of model text: the final answer of a thinking model, numbers, option letters.

Every scorer starts from ``final_answer``: the text after ``◁/think▷`` (a reasoning block that never closes
yields ``None``, no answer). The helpers are rule-based and deterministic; no model judges anything.
"""

from __future__ import annotations

import random
import re
import string

from kimivl.processing.chat_template import THINK_OPEN, parse_thinking

# "1,234.5", "-3", "0.25", ".5", "1e-3"
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+)")
_CUE = re.compile(r"(?:the\s+)?(?:final\s+|correct\s+|best\s+)?(?:answer|option|choice)\s*(?:is|:)\s*:?",
                  re.IGNORECASE)
OPTION_LETTERS = string.ascii_uppercase


def final_answer(prediction: str) -> str | None:
    """The answer part of a model's output, stripped; ``None`` when a ``◁think▷`` block never closes."""
    reasoning, answer = parse_thinking(prediction)
    if not answer and reasoning is not None and THINK_OPEN in prediction:
        return None
    return answer


def after_cue(text: str) -> str:
    """The text after the last "answer is" / "Answer:" cue, or the whole text when there is none."""
    cues = list(_CUE.finditer(text))
    return text[cues[-1].end():].strip() if cues else text.strip()


def numbers(text: str) -> list[float]:
    """Every number written in ``text``, in order (thousands separators dropped)."""
    return [float(m.group().replace(",", "")) for m in _NUMBER.finditer(text)]


def answer_number(text: str) -> float | None:
    """The number that answers: the first one after an answer cue, else the last one in the text."""
    tail = after_cue(text)
    found = numbers(tail) if tail != text.strip() else []
    if found:
        return found[0]
    found = numbers(text)
    return found[-1] if found else None


def normalize_text(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def parse_option(text: str, options: dict[str, str]) -> str | None:
    """The option letter ``text`` chooses among ``options`` (letter -> option text), or ``None``.

    In order: a bracketed letter "(B)"; a letter standing alone followed by ".", ")" or ":" ("B.", "B)");
    a lone letter word ("B"); the text of an option (the longest one contained). A capital letter inside a word
    ("Because") never counts. Text after an answer cue ("The answer is ...") is searched first.
    """
    letters = "".join(sorted(options))
    if not letters:
        return None
    for region in dict.fromkeys([after_cue(text), text]):
        for pattern, flags in ((rf"\(([{letters}])\)", re.IGNORECASE),
                               (rf"(?<![\w])([{letters}])[.):](?!\w)", 0),
                               (rf"(?<![\w'])([{letters}])(?![\w'])", 0)):
            found = re.search(pattern, region, flags)
            if found:
                return found.group(1).upper()
        norm = f" {normalize_text(region)} "
        hits = [(len(t), k) for k, t in options.items() if normalize_text(t) and f" {normalize_text(t)} " in norm]
        if hits:
            return max(hits)[1]
    return None


def random_option(options: dict[str, str], seed: int | str) -> str:
    """A reproducible random letter for an unparsable answer (seeded per row)."""
    return random.Random(str(seed)).choice(sorted(options))
