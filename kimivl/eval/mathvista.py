"""MathVista: math questions on images, scored by rule-based answer extraction (no model judge); accuracy.

Formats: the hub's parquet (``pid``, ``query``, ``question``, ``decoded_image`` struct, ``choices`` list or
null, ``answer``, ``question_type`` multi_choice/free_form, ``answer_type`` integer/float/text/list,
``precision``) and VLMEvalKit TSV (``index``, ``image`` base64, ``question``, ``choices`` as a list string,
``answer``, ``answer_option``, the same type columns). The prompt is ``query`` when the file has it, else the
question with a hint for its answer type and its choices (unless the question already carries them).

Scoring, ``mode="official"`` (the default): MathVista's own pipeline (github:lupantech/MathVista, commit
53d525874bdde205128e6b160b7357a88277d479; ``evaluation/extract_answer.py`` and ``evaluation/calculate_score.py``,
last changed in e999481), rule for rule:
- extraction (``extract_answer`` with ``--quick_extract``): an empty answer is ""; a multi_choice answer that is
  exactly one of the choices is kept; an integer question's answer that ``int()`` reads, a float question's that
  ``float()`` reads, are kept (as ``str``); an answer holding ``The answer is "X".`` gives X. Everything else goes,
  officially, to an LLM (GPT) with a few-shot prompt: MathVista's published scores NEED that LLM extraction.
  kimivl has no model judge: give the LLM's extraction as the prediction's ``extracted`` field to score exactly
  as published; without it kimivl's rule-based extraction stands in for the LLM (the letter of the chosen option,
  the number after an "answer is" cue or the last one, the last bracketed list, the text after a cue).
- normalisation (``normalize_extracted_answer``): multi_choice: a letter "(X)" is read as X; a letter among the
  choices' letters selects that choice, anything else (the empty string too) the choice with the smallest
  Levenshtein distance (the first on a tie, so "" picks the shortest choice); integer: ``str(int(float(x)))``;
  float: ``str(round(float(x), precision))``; list: ``str(x)``; a value that does not convert is ``None``.
- right when the normalised value ``==`` the dataset's ``answer`` string (so "0.6" is not "0.60"); accuracy over
  every row. (free_form ``text`` questions do not occur in MathVista and the official code has no rule for them;
  kimivl compares ``str(x)``.)

``mode="lenient"`` (kimivl's own): multi_choice -> an option letter (parsed as for MMMU, or the option text);
integer -> the answer's number truncated to an int; float -> the number rounded to ``precision`` decimals, compared
with the gold answer rounded the same way; list -> the numbers of a bracketed list, element by element; text ->
the normalised string. The number is the first after an "answer is" cue, else the last in the text.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from kimivl.eval.answers import (
    OPTION_LETTERS,
    after_cue,
    answer_number,
    check_mode,
    edit_distance,
    final_answer,
    normalize_text,
    numbers,
    official_text,
    parse_option,
)
from kimivl.eval.tables import (
    RowError,
    Sample,
    has_text,
    image_bytes,
    literal_list,
    load_samples,
    present,
    text_cell,
    user_turn,
)

HINTS = {
    "multi_choice": "Answer the question with the correct option letter, e.g., A, B, C, D, at the end.",
    "integer": "Answer the question requiring an integer answer.",
    "float": "Answer the question requiring a floating-point number with {p} decimal places.",
    "list": "Answer the question requiring a Python list as an answer.",
    "text": "Answer the question with a single word or phrase.",
}


def _precision(value) -> int | None:
    """A row's ``precision`` (decimal places of a float answer): ``None`` when absent, else a whole number >= 0."""
    if not present(value):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int of hundreds of digits: no number of decimal places
        number = math.inf
    if not math.isfinite(number) or number < 0 or number != int(number):
        raise RowError(f"precision must be a whole number of decimal places, got {value!r}")
    return int(number)


def parse_row(row: dict, index, file: Path) -> Sample:
    qtype, atype = str(row.get("question_type") or ""), str(row.get("answer_type") or "")
    if qtype not in ("multi_choice", "free_form"):
        raise RowError(f"unknown question_type {qtype!r} (expected multi_choice or free_form)")
    if qtype == "free_form" and atype not in ("integer", "float", "text", "list"):
        raise RowError(f"unknown answer_type {atype!r}")
    cell = next((row[k] for k in ("decoded_image", "image") if present(row.get(k))), None)
    image = image_bytes(cell, file.parent)
    raw_answer = text_cell(row, "answer")  # a RowError ("no answer") for a missing, null or blank one
    answer = raw_answer.strip()
    precision = _precision(row.get("precision"))
    metadata = row["metadata"] if isinstance(row.get("metadata"), dict) else {}
    meta = {
        "question_type": qtype,
        "answer_type": atype,
        "precision": precision,
        "answer": answer,
        "answer_text": raw_answer,
        "choices": None,
        "group": str(row.get("task") or metadata.get("task") or ""),
    }
    hint = HINTS[qtype if qtype == "multi_choice" else atype].format(p=2 if precision is None else precision)
    text = text_cell(row, "question", "query")  # no question: the query (the hub's whole prompt) gives the prompt
    if qtype == "multi_choice":
        choices = [str(c) for c in literal_list(row.get("choices"))]
        if len(choices) < 2:
            raise RowError("a multi_choice question without choices")
        options = dict(zip(OPTION_LETTERS, choices))
        gold = str(row.get("answer_option") or "").strip() or next((k for k, v in options.items() if v == answer), "")
        if gold not in options:
            raise RowError(f"answer {answer!r} is not one of the choices")
        meta.update(options=options, answer=gold, choices=choices)
        if "Choices:" not in text:
            text += "\nChoices:\n" + "\n".join(f"({k}) {v}" for k, v in options.items())
    if has_text(row.get("query")):
        prompt = str(row["query"])
    else:
        prompt = text if text.startswith("Hint:") else f"Hint: {hint}\nQuestion: {text}"
    return Sample(index, user_turn([image], prompt), meta)


def load(data, **_):
    return load_samples(data, parse_row, ("index", "pid"))


def _list(text: str) -> list[float] | None:
    """The numbers of the last bracketed list in ``text`` (commas separate them: "[3,250]" is 3 and 250), else of
    the whole text; None when there are none."""
    bracket = re.findall(r"\[([^\[\]]*)\]", text)
    return numbers(bracket[-1], thousands=False) if bracket else (numbers(text) or None)


def extract(answer: str, meta: dict):
    """The comparable value in ``answer`` for the row's type (lenient rules), or ``None``."""
    if meta["question_type"] == "multi_choice":
        return parse_option(answer, meta["options"])
    kind = meta["answer_type"]
    if kind == "text":
        return normalize_text(after_cue(answer)) or None
    if kind == "list":
        return _list(after_cue(answer))
    value = answer_number(answer)
    if value is None:
        return None
    return int(value) if kind == "integer" else round(value, 2 if meta["precision"] is None else meta["precision"])


def _stand_in(answer: str, meta: dict) -> str:
    """kimivl's rule-based extraction where the official pipeline asks an LLM: a string like the LLM's."""
    if meta["question_type"] == "multi_choice":
        return parse_option(answer, meta["options"]) or ""
    kind = meta["answer_type"]
    if kind == "list":
        bracket = re.findall(r"\[[^\[\]]*\]", after_cue(answer))
        return bracket[-1] if bracket else ""
    if kind == "text":
        return after_cue(answer).rstrip(".")
    value = answer_number(answer)
    return "" if value is None else str(int(value) if kind == "integer" and value == int(value) else value)


def official_extraction(response: str, meta: dict) -> str:
    """``extract_answer``'s rule-based steps (quick extraction on); where they decide nothing, ``_stand_in``."""
    if response == "":
        return ""
    if meta["question_type"] == "multi_choice" and response in meta["choices"]:
        return response
    for kind, convert in (("integer", int), ("float", float)):
        if meta["answer_type"] == kind:
            try:
                return str(convert(response))
            except ValueError:
                pass
    quoted = _quoted_answer(response)
    if quoted is not None:
        return quoted
    return _stand_in(response, meta)


def _quoted_answer(response: str) -> str | None:
    r"""``re.search(r'The answer is "(.*)"\.', response)``'s group, or None, in linear time: from after the first cue
    on the first line (``.`` stops at "\n" only) with a '".' after its cue, to that line's last '".'."""
    cue = 'The answer is "'
    for line in response.split("\n"):
        start, end = line.find(cue), line.rfind('".')
        if 0 <= start and start + len(cue) <= end:
            return line[start + len(cue) : end]
    return None


def official_normalize(extraction, meta: dict) -> str | None:
    """``normalize_extracted_answer``: the value the official code compares with the answer string."""
    if meta["question_type"] == "multi_choice":
        extraction = extraction.strip() if isinstance(extraction, str) else str(extraction)
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        choices = meta["choices"]
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in letters:
            return choices[letters.index(extraction)]
        distances = [edit_distance(extraction, c) for c in choices]
        return choices[distances.index(min(distances))]
    try:
        if meta["answer_type"] == "integer":
            return str(int(float(extraction)))
        if meta["answer_type"] == "float":
            return str(round(float(extraction), int(meta["precision"])))
    except (TypeError, ValueError, OverflowError):
        return None
    return str(extraction)


def _lenient(answer: str | None, meta: dict) -> dict:
    value = None if answer is None else extract(answer, meta)
    gold = meta["answer"]
    precision = 2 if meta["precision"] is None else meta["precision"]
    if value is None:
        ok = False
    elif meta["question_type"] == "multi_choice":
        ok = value == gold
    elif meta["answer_type"] == "integer":
        ok = numbers(gold)[:1] == [value]
    elif meta["answer_type"] == "float":
        ok = [round(g, precision) for g in numbers(gold)[:1]] == [value]
    elif meta["answer_type"] == "list":
        ok = _list(gold) == value
    else:
        ok = value == normalize_text(gold)
    return {"score": float(ok), "extracted": value}


def score(prediction: str, meta: dict, mode: str = "official", extracted: str | None = None) -> dict:
    """One row's score; ``extracted`` (e.g. an LLM's extraction) replaces the extraction from ``prediction``."""
    if check_mode(mode) == "lenient":
        return _lenient(final_answer(prediction) if extracted is None else extracted, meta)
    extraction = official_extraction(official_text(prediction), meta) if extracted is None else extracted
    value = official_normalize(extraction, meta)
    return {"score": float(value == meta["answer_text"]), "extracted": extraction, "normalized": value}
