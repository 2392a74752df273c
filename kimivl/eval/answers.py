"""Reading answers out of model text: the final answer of a thinking model, numbers, option letters.

Every scorer starts from ``final_answer`` (lenient scoring) or ``official_text`` (official scoring): the text
after ``◁/think▷``; a reasoning block that never closes yields no answer. The helpers are rule-based and
deterministic; no model judges anything.
"""

from __future__ import annotations

import random
import re
import string
import unicodedata

from kimivl.processing.chat_template import THINK_CLOSE, THINK_OPEN, parse_thinking

MODES = ("official", "lenient")


def _ranges(codes):
    """Consecutive runs of the increasing integers ``codes``, as (first, last) pairs."""
    runs: list[list[int]] = []
    for c in codes:
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return [tuple(r) for r in runs]


# Han, kana, Hangul and Thai, written without spaces between words: Python's \w holds their characters, yet a number
# or letter right after one stands alone ("答案是42", "答案是B")
_SPACELESS = (
    "\u0e00-\u0e7f\u1100-\u11ff\u3005-\u3007\u3040-\u30ff\u3131-\u318e\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
    "\uf900-\ufaff\U00020000-\U0003ffff"
)
# combining marks (vowel signs, accents), which Python's \w leaves out: one joins the letter before it ("कि")
# (the variation selectors U+E0100-E01EF are the only marks past U+20000)
_MARKS = (
    "".join(
        f"{chr(a)}-{chr(b)}" for a, b in _ranges(c for c in range(0x20000) if unicodedata.category(chr(c))[0] == "M")
    )
    + "\U000e0100-\U000e01ef"
)
# what goes on a word: a word character of a script written with spaces, or a mark, which joins the letter before it
# ("ด" does not stand in "ดี")
_WORD = rf"(?:[^\W{_SPACELESS}]|[{_MARKS}])"
# what a word written with spaces ends on: a mark after a character of the spaceless scripts ends none, so a number
# or letter after a Thai vowel sign or tone mark stands alone ("ข้อที่3", "ได้5") while one after "कि" does not
_WORD_END = rf"(?:[^\W{_SPACELESS}]|(?<![{_SPACELESS}])[{_MARKS}])"
# full-width ASCII ("（Ｂ）", "４２") and the ideographic space as ASCII; the full-width comma separates items, never
# thousands ("120，300": two numbers)
_HALF_WIDTH = str.maketrans({chr(c): chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F)} | {"\u3000": " ", "，": ", "})
# what NFKC would fuse with the digits beside it ("2³" as "23", "1½" as "11/2"): kept as written
_SCRIPT_FORMS = ("<super>", "<sub>", "<fraction>")
# "1,234.5", "-3", "0.25", ".5", "1e-3"
_PLAIN = r"[-+]?(?:\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+)"
_NUMBER = re.compile(rf"(?<!{_WORD_END})(?<!\.)(?:[-+]?\d{{1,3}}(?:,\d{{3}})+(?:\.\d+)?(?![\d.])|{_PLAIN})")
_PLAIN_NUMBER = re.compile(rf"(?<!{_WORD_END})(?<!\.){_PLAIN}")
# "(250,250)", "[5,100, 7]": inside brackets, commas separate numbers (never thousands)
_TUPLE = re.compile(rf"[(\[]\s*{_PLAIN}(?:\s*,\s*{_PLAIN})+\s*[)\]]")
_CUE = re.compile(
    r"(?:the\s+)?(?:final\s+|correct\s+|best\s+)?(?:answer|option|choice)\s*(?:is|:)\s*:?"
    r"|答案\s*(?:应该|應該)?(?:是|为|為|[:：])\s*[:：]?|[故应應][选選]|答えは|正解は|정답은",
    re.IGNORECASE,
)
OPTION_LETTERS = string.ascii_uppercase


def final_answer(prediction: str) -> str | None:
    """The answer part of a model's output, stripped; ``None`` when a ``◁think▷`` block never closes."""
    reasoning, answer = parse_thinking(prediction)
    if not answer and reasoning is not None and THINK_OPEN in prediction:
        return None
    return answer


def check_mode(mode: str) -> str:
    """``mode`` if it is a scoring mode, else a ``ValueError`` naming the choices."""
    if mode not in MODES:
        raise ValueError(f"unknown scoring mode {mode!r} (expected one of {', '.join(MODES)})")
    return mode


def official_text(prediction: str) -> str:
    """The answer as an official script would receive it: a thinking model's output cut after ``◁/think▷``
    (stripped), an unclosed reasoning as the empty answer, any other output unchanged (not even stripped)."""
    if THINK_CLOSE not in prediction and THINK_OPEN not in prediction:
        return prediction
    return final_answer(prediction) or ""


def after_cue(text: str) -> str:
    """The text after the last "answer is" / "Answer:" cue, or the whole text when there is none."""
    cues = list(_CUE.finditer(text))
    return text[cues[-1].end() :].strip() if cues else text.strip()


def half_width(text: str) -> str:
    """``text`` with full-width ASCII forms ("（Ｂ）", "４２", "：") and the ideographic space as plain ASCII, and
    "，" as ", " (it separates, "120，300"). Not NFKC, which would also turn "5²" into "52"."""
    return text.translate(_HALF_WIDTH)


def numbers(text: str, thousands: bool = True) -> list[float]:
    """Every number written in ``text`` (full-width digits too), in order; one right after a letter or digit ("v2")
    is none, one right after a Chinese, Japanese, Korean or Thai character ("共有3个") is. With ``thousands`` a comma
    between digit groups of three is a thousands separator ("1,234.5"), except inside a bracketed tuple or list
    ("(250,250)", "[5,100]") where commas separate numbers; without it, commas always separate numbers
    (coordinates)."""
    text = half_width(text)
    if not thousands:
        return [float(m.group()) for m in _PLAIN_NUMBER.finditer(text)]
    found: list[tuple[int, float]] = []
    end = 0
    for tup in _TUPLE.finditer(text):
        found += [
            (end + m.start(), float(m.group().replace(",", ""))) for m in _NUMBER.finditer(text[end : tup.start()])
        ]
        found += [(tup.start() + m.start(), float(m.group())) for m in _PLAIN_NUMBER.finditer(tup.group())]
        end = tup.end()
    found += [(end + m.start(), float(m.group().replace(",", ""))) for m in _NUMBER.finditer(text[end:])]
    return [value for _, value in found]


def click_point(found: list[float]) -> tuple[float, float] | None:
    """The click an answer's numbers ``found`` write: the centre of a box (the first four), else a point (the first
    two); None with fewer than two."""
    if len(found) >= 4:
        return (found[0] + found[2]) / 2, (found[1] + found[3]) / 2
    return (found[0], found[1]) if len(found) >= 2 else None


def answer_number(text: str) -> float | None:
    """The number that answers: the first one after an answer cue, else the last one in the text."""
    tail = after_cue(text)
    found = numbers(tail) if tail != text.strip() else []
    if found:
        return found[0]
    found = numbers(text)
    return found[-1] if found else None


def normalize_text(text: str) -> str:
    """NFKC (superscripts, subscripts and fractions kept: "2³" is not "23"), lower case, punctuation, symbols and
    control characters (Unicode categories P*, S*, C*) to spaces, whitespace collapsed. Letters, digits and combining
    marks stay: "कि" and "को" differ in their vowel signs."""
    pieces, run = [], []
    for c in text:  # NFKC but for superscripts, subscripts and fractions
        if unicodedata.decomposition(c).startswith(_SCRIPT_FORMS):
            pieces += [unicodedata.normalize("NFKC", "".join(run)), c]
            run = []
        else:
            run.append(c)
    text = ("".join(pieces) + unicodedata.normalize("NFKC", "".join(run))).lower()
    return " ".join("".join(" " if unicodedata.category(c)[0] in "PSC" else c for c in text).split())


def holds_phrase(text: str, phrase: str) -> bool:
    """Whether ``phrase``, normalised, stands in ``text``, normalised, as whole words: "cat" is not in "bobcat", while
    "北京" is in "答案是北京" (no spaces between words there)."""
    phrase = normalize_text(phrase)
    return (
        bool(phrase) and re.search(rf"(?<!{_WORD_END}){re.escape(phrase)}(?!{_WORD})", normalize_text(text)) is not None
    )


def parse_option(text: str, options: dict[str, str]) -> str | None:
    """The option letter ``text`` chooses among ``options`` (letter -> option text), or ``None``.

    In order: a bracketed letter "(B)"; a letter standing alone followed by ".", ")" or ":" ("B.", "B)");
    a lone letter word ("B"); the text of an option (the longest one contained). A capital letter inside a word
    ("Because") never counts, nor "I" or "A" used as a word ("I think", "A cat"); one right after a Chinese,
    Japanese, Korean or Thai character stands alone ("答案是B"), and full-width forms are read ("（Ｂ）"). Text after
    an answer cue ("The answer is ...") is searched first.
    """
    letters = "".join(sorted(options))
    if not letters:
        return None
    text = half_width(text)
    for region in dict.fromkeys([after_cue(text), text]):
        for pattern, flags in (
            (rf"\(([{letters}])\)", re.IGNORECASE),
            (rf"(?<!{_WORD_END})([{letters}])[.):](?!{_WORD})", 0),
            (rf"(?<!{_WORD_END})(?<!')([{letters}])(?!{_WORD})(?!')", 0),
        ):
            for found in re.finditer(pattern, region, flags):
                if not (found.group(1) in "AI" and re.match(r"\s+[a-z]", region[found.end() :])):  # "I think"
                    return found.group(1).upper()
        hits = [(len(t), k) for k, t in options.items() if holds_phrase(region, t)]
        if hits:
            return max(hits)[1]
    return None


def random_option(options: dict[str, str], seed: int | str) -> str:
    """A reproducible random letter for an unparsable answer (seeded per row)."""
    return random.Random(str(seed)).choice(sorted(options))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]
