"""OCRBench: text recognition and text-centric VQA; a score out of 1000.

Formats: VLMEvalKit TSV (``index``, ``image`` base64, ``question``, ``answer`` as a list string, ``category``)
and the hub's parquet (``question``, ``answer`` list, ``question_type``, ``dataset``, ``image`` struct).

Scoring (OCRBench's rule): right when any gold answer is a substring of the answer, both lower-cased and
stripped; for handwritten mathematical expressions (category "Handwritten Mathematical Expression Recognition",
source dataset HME100k) spaces are removed from both and case is kept. The score is 1000 x the fraction right
(OCRBench has exactly 1000 questions, so it is the number right).
"""

from __future__ import annotations

from pathlib import Path

from kimivl.eval.answers import final_answer
from kimivl.eval.report import accuracy
from kimivl.eval.tables import (
    RowError,
    Sample,
    image_bytes,
    literal_list,
    load_samples,
    user_turn,
)

HME = "Handwritten Mathematical Expression Recognition"


def parse_row(row: dict, index, file: Path) -> Sample:
    answers = [str(a) for a in literal_list(row["answer"]) if str(a).strip()]
    if not answers:
        raise RowError("no answer")
    category = str(row.get("category") or row.get("question_type") or "")
    hme = category == HME or str(row.get("dataset") or "") == "HME100k"
    image = image_bytes(row["image"], file.parent)
    return Sample(index, user_turn([image], str(row["question"])),
                  {"answers": answers, "hme": hme, "group": category})


def load(data, **_):
    return load_samples(data, parse_row, ("index",))


def score(prediction: str, meta: dict) -> dict:
    answer = final_answer(prediction)
    if answer is None:
        return {"score": 0.0, "extracted": None}
    if meta["hme"]:
        said = answer.replace("\n", " ").replace(" ", "")
        ok = any(g.strip().replace("\n", " ").replace(" ", "") in said for g in meta["answers"])
    else:
        said = answer.lower().replace("\n", " ").strip()
        ok = any(g.lower().replace("\n", " ").strip() in said for g in meta["answers"])
    return {"score": float(ok), "extracted": answer}


def summarize(rows: list[dict]) -> dict[str, float]:
    """``score``: 1000 x the fraction right; ``accuracy/<category>`` per category (percent)."""
    out = {"score": 1000 * sum(r["score"] for r in rows) / max(1, len(rows))}
    out.update({k: v for k, v in accuracy(rows).items() if k != "accuracy"})
    return out
