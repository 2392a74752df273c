"""MMLongBench-Doc: questions on long PDF documents; accuracy and generalised F1.

Formats: the official ``samples.json`` or the hub's parquet (``doc_id``, ``question``, ``answer``,
``answer_format`` Int/Float/Str/List/None, ``evidence_pages``) with the PDFs in ``documents/`` beside the file
(or beside it directly), and VLMEvalKit-style TSV whose ``image`` column holds the page images (a list of
base64). A PDF is rendered with PyMuPDF (``pip install pymupdf``) at ``dpi`` (default 72) up to ``max_pages``
(default 120, MMLongBench-Doc's cap); a directory named after the document's stem holding page images
(sorted by name) is used instead when present.

Scoring, by the gold answer's type, after taking the text after an "answer is" cue:
- None: the gold is "Not answerable"; right when the answer says "not answerable" (or "unanswerable").
- Int: the answer's first number, truncated, equals the gold integer.
- Float: the first number is within 1% of the gold value, or of the gold x 100 or / 100 (percent forms).
- Str: exact match (normalised) for URLs, e-mail addresses, file names, dates, times and numbers; otherwise
  ANLS (1 - normalised edit distance, 0 below 0.5), a partial score.
- List: the same number of items (read from "[a, b]" or a comma/"and" separated answer); sorted, items compare
  pairwise as numbers or by ANLS; the row scores the worst pair.
Accuracy is the mean score. Generalised F1 (MMLongBench-Doc's): recall = mean score over answerable questions,
precision = mean score over the questions the model answered (did not say "Not answerable"), F1 = 2PR/(P+R).
"""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path

from kimivl.eval.answers import after_cue, final_answer, normalize_text, numbers
from kimivl.eval.report import accuracy
from kimivl.eval.tables import (
    RowError,
    Sample,
    image_list,
    literal_list,
    load_samples,
    present,
    user_turn,
)

NOT_ANSWERABLE = "Not answerable"
FORMATS = ("Int", "Float", "Str", "List", "None")
PROMPT = ("{question}\nAnswer with the answer only: a number, a short phrase, or a list written as [a, b, ...]. "
          f'If the document does not contain the answer, answer "{NOT_ANSWERABLE}".')
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_EXACT = re.compile(r"https?://|www\.|@|\.(?:py|pdf|ipynb|txt|csv|docx?)\b|\b\d{1,2}:\d{2}\b|\ba\.m\.|\bp\.m\.")


def render_pdf(path: Path, max_pages: int, dpi: int) -> list[bytes]:
    """The first ``max_pages`` pages of a PDF as PNG bytes."""
    try:
        import pymupdf
    except ImportError:
        raise ImportError(f"rendering {path} needs PyMuPDF: pip install 'kimivl[eval]' (or pip install pymupdf), or "
                          f"give page images: a directory {path.with_suffix('')} of them") from None
    with pymupdf.open(path) as doc:
        return [page.get_pixmap(dpi=dpi).tobytes("png") for page in list(doc)[:max_pages]]


def _pages(row: dict, file: Path, max_pages: int, dpi: int) -> list:
    if present(row.get("image")):
        return image_list(row["image"], file.parent)[:max_pages]
    doc = str(row["doc_id"])
    for root in (file.parent / "documents", file.parent):
        folder = (root / doc).with_suffix("")
        if folder.is_dir():
            pages = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if pages:
                return [str(p) for p in pages[:max_pages]]
        if (root / doc).is_file():
            return render_pdf(root / doc, max_pages, dpi)
    raise RowError(f"document {doc!r} not found in {file.parent / 'documents'} or {file.parent}")


def parse_row(row: dict, index, file: Path, max_pages: int, dpi: int) -> Sample:
    fmt = str(row.get("answer_format") or "")
    if fmt not in FORMATS:
        raise RowError(f"unknown answer_format {fmt!r} (expected one of {', '.join(FORMATS)})")
    answer = row["answer"]
    if not present(answer):
        raise RowError("no answer")
    pages = _pages(row, file, max_pages, dpi)
    return Sample(index, user_turn(pages, PROMPT.format(question=str(row["question"]).strip())),
                  {"format": fmt, "answer": str(answer), "group": str(row.get("doc_type") or "")})


def load(data, max_pages: int = 120, dpi: int = 72, **_):
    return load_samples(data, partial(parse_row, max_pages=max_pages, dpi=dpi), ("index",))


def anls(gold: str, said: str, threshold: float = 0.5) -> float:
    """1 - normalised Levenshtein distance of the normalised strings; 0 below ``threshold``."""
    a, b = normalize_text(gold), normalize_text(said)
    if not a and not b:
        return 1.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    similarity = 1 - prev[-1] / max(len(a), len(b))
    return similarity if similarity >= threshold else 0.0


def _float_equal(gold: float, said: float) -> bool:
    return any(math.isclose(said, g, rel_tol=0.01, abs_tol=1e-9) for g in (gold, gold * 100, gold / 100))


def _str_score(gold: str, said: str) -> float:
    if _EXACT.search(gold) or re.fullmatch(r"[\d\s.,:/%$-]+", gold.strip()):
        return float(normalize_text(gold) == normalize_text(said))
    return anls(gold, said)


def _items(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        try:
            return [str(x).strip() for x in literal_list(text)]
        except ValueError:
            text = text.strip("[]")
    return [p.strip(" '\"") for p in re.split(r",|;|\band\b", text) if p.strip(" '\"")]


def _item_score(gold: str, said: str) -> float:
    g, s = numbers(gold), numbers(said)
    if len(g) == 1 and re.fullmatch(r"[\d\s.,%$-]+", gold.strip()):
        return float(len(s) >= 1 and _float_equal(g[0], s[0]))
    return _str_score(gold, said)


def says_not_answerable(answer: str) -> bool:
    text = normalize_text(answer)
    return "not answerable" in text or "unanswerable" in text


def score(prediction: str, meta: dict) -> dict:
    answer = final_answer(prediction)
    if answer is None:
        return {"score": 0.0, "extracted": None, "answered": False}
    said = after_cue(answer)
    answered = not says_not_answerable(said)
    fmt, gold = meta["format"], meta["answer"]
    if fmt == "None" or gold.strip().lower() == NOT_ANSWERABLE.lower():
        value = 0.0 if answered else 1.0
    elif not answered:
        value = 0.0
    elif fmt in ("Int", "Float"):
        found, target = numbers(said), numbers(gold)
        if not found or not target:
            value = 0.0
        elif fmt == "Int":
            value = float(int(found[0]) == int(target[0]))
        else:
            value = float(_float_equal(target[0], found[0]))
    elif fmt == "List":
        golds, items = sorted(_items(gold)), sorted(_items(said))
        value = 0.0 if len(golds) != len(items) else min(_item_score(g, s) for g, s in zip(golds, items))
    else:
        value = _str_score(gold, said)
    return {"score": value, "extracted": said, "answered": answered}


def summarize(rows: list[dict]) -> dict[str, float]:
    """``accuracy`` and generalised ``f1`` (percent), with the recall and precision behind it."""
    answerable = [r["score"] for r in rows if r["meta"]["format"] != "None"]
    answered = [r["score"] for r in rows if r.get("answered")]
    recall = sum(answerable) / len(answerable) if answerable else 0.0
    precision = sum(answered) / len(answered) if answered else 0.0
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    return {**accuracy(rows), "f1": 100 * f1, "recall": 100 * recall, "precision": 100 * precision}
