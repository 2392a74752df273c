"""MMMU: multiple choice and open questions over one or more images; accuracy.

Formats: VLMEvalKit TSV (``index``, ``question``, option columns ``A``..``I``, ``answer``, ``image`` holding one
base64 image or a list of them, ``category``) and the hub's parquet (``id``, ``question``, ``options`` as a list
string, ``answer``, ``question_type``, ``image_1``..``image_7`` structs). The images come first, then the
question (its ``<image k>`` references left in the text), then the options.

Scoring: a multiple-choice answer is parsed as an option letter ("(B)", "B.", "B", or an option's text); when
nothing parses, a random option seeded by the row index is taken (as MMMU's own evaluation does). An open answer
is right when one of the gold answers matches: numbers compare after rounding to 2 decimals, strings after
normalisation (the gold string contained in the answer).
"""

from __future__ import annotations

from pathlib import Path

from kimivl.eval.answers import (
    OPTION_LETTERS,
    after_cue,
    final_answer,
    normalize_text,
    numbers,
    parse_option,
    random_option,
)
from kimivl.eval.tables import (
    RowError,
    Sample,
    image_list,
    literal_list,
    load_samples,
    present,
    user_turn,
)

MC_PROMPT = "Answer with the option's letter from the given choices directly."
OPEN_PROMPT = "Answer the question using a single word or phrase."


def _options(row: dict) -> list[str]:
    if "options" in row:
        return [str(o) for o in literal_list(row["options"])]
    return [str(row[k]) for k in OPTION_LETTERS[:9] if present(row.get(k))]


def _images(row: dict, root: Path) -> list:
    cells = [row[k] for k in sorted((k for k in row if k.startswith("image_") and k[6:].isdigit()),
                                    key=lambda k: int(k[6:])) if present(row[k])]
    if present(row.get("image")):
        cells = [row["image"]]
    return [img for cell in cells for img in image_list(cell, root)]


def parse_row(row: dict, index, file: Path) -> Sample:
    question = str(row["question"])
    options = _options(row)
    kind = str(row.get("question_type") or ("multiple-choice" if options else "open"))
    if kind not in ("multiple-choice", "open"):
        raise RowError(f"unknown question_type {kind!r} (expected multiple-choice or open)")
    images = _images(row, file.parent)
    if not images:
        raise RowError("no image")
    answer = row["answer"]
    if not present(answer):
        raise RowError("no answer")
    subject = row.get("category") or "_".join(str(row.get("id", "")).split("_")[1:-1])  # validation_Art_Theory_12
    if kind == "multiple-choice":
        if len(options) < 2:
            raise RowError(f"a multiple-choice question needs options, found {len(options)}")
        letters = dict(zip(OPTION_LETTERS, options))
        if str(answer).strip() not in letters:
            raise RowError(f"answer {answer!r} is not one of the option letters {''.join(letters)}")
        text = f"{question}\n" + "\n".join(f"{k}. {v}" for k, v in letters.items()) + f"\n{MC_PROMPT}"
        meta = {"type": kind, "options": letters, "answer": str(answer).strip()}
    else:
        text = f"{question}\n{OPEN_PROMPT}"
        meta = {"type": "open", "answer": [str(a) for a in literal_list(answer)]}
    return Sample(index, user_turn(images, text), {**meta, "seed": str(index), "group": str(subject)})


def load(data, **_) -> list:
    return load_samples(data, parse_row, ("index", "id"))


def _as_number(text: str) -> float | None:
    try:
        return round(float(text.strip().replace(",", "").lstrip("$").rstrip("%")), 2)
    except ValueError:
        return None


def score(prediction: str, meta: dict) -> dict:
    answer = final_answer(prediction)
    if answer is None:
        return {"score": 0.0, "extracted": None}
    if meta["type"] == "multiple-choice":
        letter = parse_option(answer, meta["options"])
        guessed = letter is None
        if guessed:
            letter = random_option(meta["options"], meta["seed"])
        return {"score": float(letter == meta["answer"]), "extracted": letter, "random": guessed}
    tail = after_cue(answer)
    said_numbers = {round(n, 2) for n in numbers(tail)}
    said = normalize_text(tail)
    for gold in meta["answer"]:
        value = _as_number(gold)
        if value is not None:
            if value in said_numbers:
                return {"score": 1.0, "extracted": tail}
        elif normalize_text(gold) and f" {normalize_text(gold)} " in f" {said} ":
            return {"score": 1.0, "extracted": tail}
    return {"score": 0.0, "extracted": tail}
