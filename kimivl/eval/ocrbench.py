"""OCRBench: text recognition and text-centric VQA; a score out of 1000.

Formats: VLMEvalKit TSV (``index``, ``image`` base64, ``question``, ``answer`` as a list string, ``category``),
the hub's parquet (``question``, ``answer`` list, ``question_type``, ``dataset``, ``image`` struct) and OCRBench's
own ``OCRBench.json`` (``dataset_name``, ``id``, ``image_path``, ``question``, ``answers`` a list or a string,
``type``; a string is one answer as it stands, even one like ``"[ \\pi ]"`` that looks like a list, as the official
script reads it), its images under ``OCRBench_Images/`` beside the JSON file or its folder (or next to it, or in
``images/``).

Scoring, both modes (there is nothing lenient to add): the rule of OCRBench's example script
(github:Yuliang-Liu/MultimodalOCR, commit 794c36d6423cf1d5764081128bcaeb46b240def6, ``OCRBench/example.py``, last
changed in f5cbec6; VLMEvalKit's OCRBench scorer applies the same rule): right when any gold answer is a substring
of the answer, both lower-cased and stripped with newlines turned into spaces; for handwritten mathematical
expressions (source dataset HME100k, category "Handwritten Mathematical Expression Recognition") case is kept
and every space is removed from both. An empty gold answer matches anything, an empty answer only an empty gold.
An ``extracted`` answer, when given, is matched instead of the prediction. The score is 1000 x the fraction right
(OCRBench has exactly 1000 questions, so it is the number right, as the official script prints it).
"""

from __future__ import annotations

from pathlib import Path

from kimivl.eval.answers import check_mode, final_answer, official_text
from kimivl.eval.report import accuracy
from kimivl.eval.tables import (
    RowError,
    Sample,
    image_bytes,
    literal_list,
    load_samples,
    text_cell,
    user_turn,
)

HME = "Handwritten Mathematical Expression Recognition"
IMAGE_DIRS = ("OCRBench_Images", "images")


def _image(row: dict, file: Path):
    if "image" in row:
        return image_bytes(row["image"], file.parent)
    name = row.get("image_path")
    if not name:
        raise RowError("no image")
    roots = [file.parent, *(base / d for base in (file.parent, file.parent.parent) for d in IMAGE_DIRS)]
    for root in roots:
        if (root / name).is_file():
            return str(root / name)
    raise RowError(f"image {name!r} not found next to {file} or in {' or '.join(IMAGE_DIRS)}/ beside it or its folder")


def parse_row(row: dict, index, file: Path) -> Sample:
    own_json = "answers" in row and "answer" not in row
    cell = row["answers"] if own_json else row["answer"]
    # OCRBench.json's string is one answer as it stands (its script never parses it); the TSV's is a list string
    cells = [cell] if own_json and isinstance(cell, str) else literal_list(cell)
    answers = [a if isinstance(a, str) else str(a) for a in cells]
    if not any(a.strip() for a in answers):
        raise RowError("no answer")
    category = str(row.get("category") or row.get("type") or row.get("question_type") or "")
    hme = category == HME or str(row.get("dataset") or row.get("dataset_name") or "") == "HME100k"
    question, image = text_cell(row, "question"), _image(row, file)
    return Sample(index, user_turn([image], question), {"answers": answers, "hme": hme, "group": category})


def load(data, **_):
    return load_samples(data, parse_row, ("index",))


def _clean(text: str, hme: bool) -> str:
    return text.strip().replace("\n", " ").replace(" ", "") if hme else text.lower().strip().replace("\n", " ")


def score(prediction: str, meta: dict, mode: str = "official", extracted: str | None = None) -> dict:
    """One row's score; ``extracted``, when given, is matched instead of the prediction."""
    if extracted is not None:
        answer = extracted
    elif check_mode(mode) == "official":
        answer = official_text(prediction)
    else:
        answer = final_answer(prediction)
        if answer is None:
            return {"score": 0.0, "extracted": None}
    said = _clean(answer, meta["hme"])
    return {"score": float(any(_clean(g, meta["hme"]) in said for g in meta["answers"])), "extracted": answer}


def summarize(rows: list[dict], mode: str = "official") -> dict[str, float]:
    """``score``: 1000 x the fraction right; ``accuracy/<category>`` per category (percent)."""
    out = {"score": 1000 * sum(r["score"] for r in rows) / max(1, len(rows))}
    out.update({k: v for k, v in accuracy(rows).items() if k != "accuracy"})
    return out
