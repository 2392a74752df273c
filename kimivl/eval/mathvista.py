"""MathVista: math questions on images, scored by rule-based answer extraction (no model judge); accuracy.

Formats: the hub's parquet (``pid``, ``query``, ``question``, ``decoded_image`` struct, ``choices`` list or
null, ``answer``, ``question_type`` multi_choice/free_form, ``answer_type`` integer/float/text/list,
``precision``) and VLMEvalKit TSV (``index``, ``image`` base64, ``question``, ``choices`` as a list string,
``answer``, ``answer_option``, the same type columns). The prompt is ``query`` when the file has it, else the
question with a hint for its answer type and its choices (unless the question already carries them).

Extraction by type: multi_choice -> an option letter (parsed as for MMMU, or the option text); integer -> the
answer's number truncated to an int; float -> the number rounded to ``precision`` decimals, compared with the
gold answer rounded the same way; list -> the numbers of a bracketed list, element by element; text -> the
normalised string. The number is the first after an "answer is" cue, else the last in the text.
"""

from __future__ import annotations

import re
from pathlib import Path

from kimivl.eval.answers import (
    OPTION_LETTERS,
    after_cue,
    answer_number,
    final_answer,
    normalize_text,
    numbers,
    parse_option,
)
from kimivl.eval.tables import (
    RowError,
    Sample,
    image_bytes,
    literal_list,
    load_samples,
    present,
    user_turn,
)

HINTS = {"multi_choice": "Answer the question with the correct option letter, e.g., A, B, C, D, at the end.",
         "integer": "Answer the question requiring an integer answer.",
         "float": "Answer the question requiring a floating-point number with {p} decimal places.",
         "list": "Answer the question requiring a Python list as an answer.",
         "text": "Answer the question with a single word or phrase."}


def parse_row(row: dict, index, file: Path) -> Sample:
    qtype, atype = str(row.get("question_type") or ""), str(row.get("answer_type") or "")
    if qtype not in ("multi_choice", "free_form"):
        raise RowError(f"unknown question_type {qtype!r} (expected multi_choice or free_form)")
    if qtype == "free_form" and atype not in ("integer", "float", "text", "list"):
        raise RowError(f"unknown answer_type {atype!r}")
    cell = next((row[k] for k in ("decoded_image", "image") if present(row.get(k))), None)
    image = image_bytes(cell, file.parent)
    answer = str(row["answer"]).strip()
    precision = int(float(row["precision"])) if present(row.get("precision")) else 2
    metadata = row["metadata"] if isinstance(row.get("metadata"), dict) else {}
    meta = {"question_type": qtype, "answer_type": atype, "precision": precision, "answer": answer,
            "group": str(row.get("task") or metadata.get("task") or "")}
    hint = HINTS[qtype if qtype == "multi_choice" else atype].format(p=precision)
    text = str(row["question"])
    if qtype == "multi_choice":
        choices = [str(c) for c in literal_list(row.get("choices"))]
        if len(choices) < 2:
            raise RowError("a multi_choice question without choices")
        options = dict(zip(OPTION_LETTERS, choices))
        gold = str(row.get("answer_option") or "").strip() or next((k for k, v in options.items() if v == answer), "")
        if gold not in options:
            raise RowError(f"answer {answer!r} is not one of the choices")
        meta.update(options=options, answer=gold)
        if "Choices:" not in text:
            text += "\nChoices:\n" + "\n".join(f"({k}) {v}" for k, v in options.items())
    if present(row.get("query")):
        prompt = str(row["query"])
    else:
        prompt = text if text.startswith("Hint:") else f"Hint: {hint}\nQuestion: {text}"
    return Sample(index, user_turn([image], prompt), meta)


def load(data, **_):
    return load_samples(data, parse_row, ("index", "pid"))


def _list(text: str) -> list[float] | None:
    bracket = re.findall(r"\[([^\[\]]*)\]", text)
    return numbers(bracket[-1]) if bracket else (numbers(text) or None)


def extract(answer: str, meta: dict):
    """The comparable value in ``answer`` for the row's type, or ``None``."""
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
    return int(value) if kind == "integer" else round(value, meta["precision"])


def score(prediction: str, meta: dict) -> dict:
    answer = final_answer(prediction)
    value = None if answer is None else extract(answer, meta)
    gold = meta["answer"]
    if value is None:
        ok = False
    elif meta["question_type"] == "multi_choice":
        ok = value == gold
    elif meta["answer_type"] == "integer":
        ok = numbers(gold)[:1] == [value]
    elif meta["answer_type"] == "float":
        ok = [round(g, meta["precision"]) for g in numbers(gold)[:1]] == [value]
    elif meta["answer_type"] == "list":
        ok = _list(gold) == value
    else:
        ok = value == normalize_text(gold)
    return {"score": float(ok), "extracted": value}
