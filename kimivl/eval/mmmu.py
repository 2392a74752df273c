"""MMMU: multiple choice and open questions over one or more images; accuracy.

Formats: VLMEvalKit TSV (``index``, ``question``, option columns ``A``..``I``, ``answer``, ``image`` holding one
base64 image or a list of them, ``category``; of its ``split`` column, the validation rows are read) and the hub's
parquet (``id``, ``question``, ``options`` as a list string, ``answer``, ``question_type``, ``image_1``..``image_7``
structs; of a directory holding the dev, validation and test files, the validation rows are read, known by the
``validation_`` prefix of their ``id`` or, without one, by the file's name). The images come first, then the
question (its ``<image k>`` references left in the text), then the options.

Scoring, ``mode="official"`` (the default): the rules of MMMU's own ``mmmu/utils/eval_utils.py``
(github:MMMU-Benchmark/MMMU, commit bb0b95a945998d91dfef37e969e07d49d1139438, file last changed in aa9b70d),
reproduced rule for rule:
- multiple choice (``parse_multi_choice_response``): the answer is stripped of , . ! ? ; : ' at both ends (one
  character kind after the other) and padded with a space on each side; candidates are the letters written "(B)";
  failing those, the letters standing between spaces (" B "); failing those, and only when the answer has more
  than 5 words, the options whose text occurs in it (case-insensitive substring). Several candidates: the one
  whose last occurrence is latest wins (first candidate on a tie). None: a random letter from
  ``random.Random(42)``, the seed the official module sets at import. ``score_rows`` draws these in the order of
  the official script run with ``--subject ALL``: subjects in the order of its ``CAT_SHORT2LONG`` table
  (Accounting, Agriculture, Architecture_and_Engineering, Art, ...; other subjects last), rows within a subject
  in data order, one shared stream; ``score`` alone draws the first number of a fresh stream (the official result
  for that row scored alone). An unclosed reasoning is the empty answer, so it draws too.
- open (``parse_open_response`` + ``eval_open``): the answer, lower-cased, is split into lines; from each line the
  shortest tail after one of "could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result " (and
  "=" on the last line) is a key response (the whole answer when there is none); the numbers in them (with
  thousands commas, scientific, or plain) join them; numbers compare rounded to 2 decimals, strings by the gold
  (lower-cased; a one-character gold padded with a space) being a substring. Accuracy counts every row.
- an ``extracted`` answer (parsed elsewhere) is scored as ``main_eval_only.py`` does: a letter compared as it is,
  an open answer through ``parse_open_response``.

``mode="lenient"`` (kimivl's own): an option letter from "(B)", "B.", "B" (never inside a word, nor "I"/"A" as
words) or an option's text, after any "answer is" cue; nothing parsed: a random option seeded by the row index.
Open answers: numbers at 2 decimals, normalised strings (the gold string contained in the answer).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from kimivl.eval.answers import (
    OPTION_LETTERS,
    after_cue,
    check_mode,
    final_answer,
    holds_phrase,
    numbers,
    official_text,
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
    text_cell,
    user_turn,
)

MC_PROMPT = "Answer with the option's letter from the given choices directly."
OPEN_PROMPT = "Answer the question using a single word or phrase."


def _options(row: dict) -> list[str]:
    if "options" in row:
        return [str(o) for o in literal_list(row["options"])]
    return [str(row[k]) for k in OPTION_LETTERS[:9] if present(row.get(k))]


def _images(row: dict, root: Path) -> list:
    cells = [
        row[k]
        for k in sorted((k for k in row if k.startswith("image_") and k[6:].isdigit()), key=lambda k: int(k[6:]))
        if present(row[k])
    ]
    if present(row.get("image")):
        cells = [row["image"]]
    return [img for cell in cells for img in image_list(cell, root)]


def parse_row(row: dict, index, file: Path) -> Sample:
    question = text_cell(row, "question")
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


SPLITS = ("dev", "validation", "test")


def row_split(row: dict, file: Path) -> str | None:
    """The MMMU split a row belongs to: its ``split`` column (VLMEvalKit's TSV), else the prefix of its ``id``
    (the hub's ``validation_Art_1``), else the start of its file's name (the hub's ``dev-00000-of-00001.parquet``);
    ``None`` when none of them names a split."""
    if present(row.get("split")):
        return str(row["split"]).strip()
    prefix = str(row.get("id") or "").partition("_")[0]
    if prefix in SPLITS:
        return prefix
    named = re.match(r"(dev|validation|test)(?![a-z])", file.name.lower())
    return named[1] if named else None


def load(data, **_):
    """The validation rows of ``data``: MMMU's reported number is over those, and VLMEvalKit's ``MMMU_DEV_VAL.tsv``
    holds the 150 dev rows beside the 900 validation ones, as a hub directory holds dev, validation and test files
    (``row_split`` says how a row's split is known; a row whose split is not named is read)."""
    return load_samples(data, parse_row, ("index", "id"), keep=_validation)


def _validation(row: dict, file: Path) -> bool:
    return row_split(row, file) in (None, "validation")


# The subject order of the official script's CAT_SHORT2LONG table (what --subject ALL walks through).
SUBJECTS = (
    "Accounting",
    "Agriculture",
    "Architecture_and_Engineering",
    "Art",
    "Art_Theory",
    "Basic_Medical_Science",
    "Biology",
    "Chemistry",
    "Clinical_Medicine",
    "Computer_Science",
    "Design",
    "Diagnostics_and_Laboratory_Medicine",
    "Economics",
    "Electronics",
    "Energy_and_Power",
    "Finance",
    "Geography",
    "History",
    "Literature",
    "Manage",
    "Marketing",
    "Materials",
    "Math",
    "Mechanical_Engineering",
    "Music",
    "Pharmacy",
    "Physics",
    "Psychology",
    "Public_Health",
    "Sociology",
)
OFFICIAL_SEED = 42


def _as_number(text: str) -> float | None:
    try:
        return round(float(text.strip().replace(",", "").lstrip("$").rstrip("%")), 2)
    except ValueError:
        return None


def official_choice(response: str, options: dict[str, str]) -> str | None:
    """The letter MMMU's ``parse_multi_choice_response`` picks, or ``None`` where it would pick at random."""
    for char in ",.!?;:'":
        response = response.strip(char)
    response = f" {response} "
    letters = list(options)
    found = {c: response.rfind(f"({c})") for c in letters if f"({c})" in response}
    if not found:
        found = {c: response.rfind(f" {c} ") for c in letters if f" {c} " in response}
    if not found and len(response.split()) > 5:
        lower = response.lower()
        found = {c: lower.rfind(options[c].lower()) for c in letters if options[c].lower() in lower}
    if not found:
        return None
    positions = list(found.values())
    return list(found)[positions.index(max(positions))]


def _official_numbers(text: str) -> list[str]:
    # MMMU's extract_numbers patterns, each ``\d+`` that can begin a match guarded by ``(?<!\d)``: the same matches (a
    # match never starts inside a run of digits: one from there would extend to the run's start, and none ends before a
    # digit), without retrying from each digit of a long run every shorter tail of it (quadratic time).
    with_commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?(?<!\d)\d+(?:\.\d+)?[eE][+-]?\d+", text)
    simple = re.findall(r"-?(?:(?<!\d)\d+\.\d+|\.\d+|(?<!\d)\d+\b)(?![eE][+-]?\d+)(?![,\d])", text)
    return with_commas + scientific + simple


def _official_normal(text: str) -> list:
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [f" {text}", f"{text} "] if len(text) == 1 else [text]


def official_open(response: str) -> list:
    """The normalised candidates (floats and strings) MMMU's ``parse_open_response`` reads from an open answer."""
    response = response.strip().strip(".").lower()
    lines = re.split(r"\.\s(?=[A-Z])|\n", response)  # lower-cased already: splits at newlines only
    cues = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    keys = []
    for i, line in enumerate(lines):
        shortest = None
        for cue in cues + (["="] if i == len(lines) - 1 else []):
            if cue in line:
                tail = line.split(cue)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    keys = keys or [response]
    found = keys + [n for k in keys for n in _official_numbers(k)]
    return list({v: None for f in found for v in _official_normal(f)})


def official_open_correct(golds: list[str], candidates: list) -> bool:
    """MMMU's ``eval_open``: a string candidate holding a (string) gold, or a number candidate equal to one."""
    norm = [v for g in golds for v in _official_normal(g)]
    return any(
        any(isinstance(g, str) and g in c for g in norm) if isinstance(c, str) else c in norm for c in candidates
    )


def _official(prediction: str, meta: dict, rng: random.Random, extracted: str | None) -> dict:
    if meta["type"] == "multiple-choice":
        if extracted is not None:
            return {"score": float(extracted == meta["answer"]), "extracted": extracted}
        letter = official_choice(official_text(prediction), meta["options"])
        guessed = letter is None
        if guessed:
            letter = rng.choice(list(meta["options"]))
        return {"score": float(letter == meta["answer"]), "extracted": letter, "random": guessed}
    candidates = official_open(official_text(prediction) if extracted is None else extracted)
    return {
        "score": float(official_open_correct(meta["answer"], candidates)),
        "extracted": [c for c in candidates if isinstance(c, str)]
        + sorted(c for c in candidates if not isinstance(c, str)),
    }


def _lenient(prediction: str, meta: dict, extracted: str | None) -> dict:
    answer = final_answer(prediction) if extracted is None else extracted
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
    for gold in meta["answer"]:
        value = _as_number(gold)
        if value is not None:
            if value in said_numbers:
                return {"score": 1.0, "extracted": tail}
        elif holds_phrase(tail, gold):
            return {"score": 1.0, "extracted": tail}
    return {"score": 0.0, "extracted": tail}


def score(prediction: str, meta: dict, mode: str = "official", extracted: str | None = None) -> dict:
    """One row's score; ``extracted`` (an answer parsed elsewhere) replaces the parsing of ``prediction``."""
    if check_mode(mode) == "lenient":
        return _lenient(prediction, meta, extracted)
    return _official(prediction, meta, random.Random(OFFICIAL_SEED), extracted)


def _subject_rank(group: str) -> int:
    key = str(group).strip().replace(" ", "_").lower()
    ranks = {s.lower(): i for i, s in enumerate(SUBJECTS)}
    return ranks.get(key, len(SUBJECTS))


def score_rows(items: list[tuple[str, dict, str | None]], mode: str = "official") -> list[dict]:
    """Score (prediction, meta, extracted) rows; in official mode the random picks come from one
    ``random.Random(42)`` stream in the official script's order (subjects as in ``SUBJECTS``, then data order)."""
    if check_mode(mode) == "lenient":
        return [_lenient(p, m, e) for p, m, e in items]
    rng = random.Random(OFFICIAL_SEED)
    order = sorted(range(len(items)), key=lambda i: _subject_rank(items[i][1].get("group", "")))
    out: list[dict] = [{}] * len(items)
    for i in order:
        out[i] = _official(*items[i][:2], rng, items[i][2])
    return out
