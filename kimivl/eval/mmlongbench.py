"""MMLongBench-Doc: questions on long PDF documents; accuracy and generalised F1.

Formats: the official ``samples.json`` or the hub's parquet (``doc_id``, ``question``, ``answer``,
``answer_format`` Int/Float/Str/List/None, ``evidence_pages``) with the PDFs in ``documents/`` beside the file
(or beside it directly), and VLMEvalKit-style TSV whose ``image`` column holds the page images (a list of
base64). A PDF is rendered with PyMuPDF (``pip install pymupdf``) at ``dpi`` (default 72) up to ``max_pages``
(default 120, MMLongBench-Doc's cap), once per load however many questions it has (the last few documents are kept);
a page that would be over the image processor's ``MAX_PIXELS`` (2^26 pixels, e.g. a poster of 14400 x 14400 pt) at
``dpi`` is rendered at the lower resolution that fits. A directory named after the document's stem holding page
images (sorted by name) is used instead when present.

Scoring, ``mode="official"`` (the default): MMLongBench-Doc's ``eval/eval_score.py`` (github:mayubo2333/
MMLongBench-Doc, commit d73f0dc0be7e0a2ff6a403d5fe65fcd96461f384, file last changed in 263f15d), rule for rule:
- extraction: officially GPT-4o reads the answer out of the response (``eval/extract_answer.py`` with
  ``prompt_for_answer_extraction.md``); MMLongBench-Doc's published scores NEED that LLM extraction. Give it as the
  prediction's ``extracted`` field (either the bare answer or the extractor's whole reply "Extracted answer: X
  Answer format: Y", which is cut as ``run_lvlm.py`` cuts it) to score exactly as published. Without it kimivl's
  rule-based extraction stands in: the text after the last "answer is" cue without a final period; "Not
  answerable" when the answer says it is not answerable (unanswerable, cannot be answered/determined, not
  mentioned/provided/found in the document); for Int/Float the first number; for List a bracketed list, or the
  comma/"and"-separated items written as a Python list.
- ``eval_score(gold, extracted, answer_format)``: Int: ``int(gold) == int(float(pred))``; Float: both cleaned and
  ``float``-ed, equal to the gold, the gold / 100 or x 100 within 1% relative (or rounded to the shorter of their
  decimals, at least 2); Str and None (the "Not answerable" gold): both cleaned (lower-cased, stripped, "(...)"
  removed, one leading and one trailing quote removed, a leading "$" and trailing "%" removed); exact equality for
  golds that are URLs, .py/ipynb names, "page...", phone-like digit runs, a.m./p.m. times, YYYY-MM(-DD) dates and
  e-mail addresses, else ANLS (1 - Levenshtein / longer length, 0 at or below 0.5); List: both read as Python lists
  when they start with "[" (kimivl reads literals only, never evaluates; a non-list answer is a list of one), equal
  length required, sorted cleaned items, compared joined by "-" exactly when the first gold is a number or an
  exact-match kind, else the worst pairwise ANLS. A rule that raises (a gold or answer that does not convert)
  scores 0, as ``run_lvlm.py``'s ``except`` does.
- accuracy is the mean score over every row; ``eval_acc_and_f1``'s generalised F1: recall = the score summed over
  the questions whose gold is not "Not answerable" / their number; precision = the same sum / the number of rows
  whose extracted answer is not exactly "Not answerable"; F1 = 2PR/(P+R) (0 when a denominator is 0).

``mode="lenient"`` (kimivl's own), by the gold answer's type, after taking the text after an "answer is" cue:
- None: the gold is "Not answerable"; right when the answer says "not answerable" (or "unanswerable").
- Int: the answer's first number, truncated, equals the gold integer.
- Float: the first number is within 1% of the gold value, or of the gold x 100 or / 100 (percent forms).
- Str: exact match (normalised) for URLs, e-mail addresses, file names, dates, times and numbers; otherwise
  ANLS (1 - normalised edit distance, 0 below 0.5), a partial score.
- List: the same number of items (read from "[a, b]" or a comma/"and" separated answer); sorted, items compare
  pairwise as numbers or by ANLS; the row scores the worst pair.
Accuracy is the mean score. Generalised F1: recall = mean score over answerable questions, precision = mean score
over the questions the model answered (did not say "Not answerable"), F1 = 2PR/(P+R).
"""

from __future__ import annotations

import ast
import math
import re
from functools import lru_cache, partial
from pathlib import Path

from kimivl.eval.answers import (
    after_cue,
    check_mode,
    edit_distance,
    final_answer,
    normalize_text,
    numbers,
    official_text,
)
from kimivl.eval.report import accuracy
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
from kimivl.processing.image import MAX_PIXELS

NOT_ANSWERABLE = "Not answerable"
FORMATS = ("Int", "Float", "Str", "List", "None")
PROMPT = (
    "{question}\nAnswer with the answer only: a number, a short phrase, or a list written as [a, b, ...]. "
    f'If the document does not contain the answer, answer "{NOT_ANSWERABLE}".'
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CACHED_DOCUMENTS = 4  # rendered documents a load keeps (rows of one document usually come together)
_EXACT = re.compile(r"https?://|www\.|@|\.(?:py|pdf|ipynb|txt|csv|docx?)\b|\b\d{1,2}:\d{2}\b|\ba\.m\.|\bp\.m\.")


def _pixmap(pymupdf, page, dpi: int):
    """The page at ``dpi``, or at the lower resolution that keeps it within ``MAX_PIXELS``."""

    def size(zoom: float) -> int:
        box = (page.rect * pymupdf.Matrix(zoom, zoom)).irect
        return box.width * box.height

    if size(dpi / 72) <= MAX_PIXELS:
        return page.get_pixmap(dpi=dpi)
    zoom = math.sqrt(MAX_PIXELS / (page.rect.width * page.rect.height))
    while size(zoom) > MAX_PIXELS:  # the pixel box rounds outwards
        zoom *= 0.999
    return page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom))


def render_pdf(path: Path, max_pages: int, dpi: int) -> tuple[bytes, ...]:
    """The first ``max_pages`` pages of a PDF as PNG bytes (only those are loaded), each within ``MAX_PIXELS``; a
    file PyMuPDF cannot open or render is a ``RowError`` ("unreadable document", with PyMuPDF's reason), so its rows
    are skipped."""
    try:
        import pymupdf
    except ImportError:
        raise ImportError(
            f"rendering {path} needs PyMuPDF: pip install 'kimivl[eval]' (or pip install pymupdf), or "
            f"give page images: a directory {path.with_suffix('')} of them"
        ) from None
    mupdf_error = getattr(getattr(pymupdf, "mupdf", None), "FzErrorBase", RuntimeError)  # MuPDF's own errors
    try:
        with pymupdf.open(path) as doc:
            pages = (doc.load_page(i) for i in range(min(max_pages, doc.page_count)))
            return tuple(_pixmap(pymupdf, page, dpi).tobytes("png") for page in pages)
    except (RuntimeError, ValueError, mupdf_error) as e:  # pymupdf.FileDataError is a RuntimeError
        raise RowError(f"unreadable document {path}: {e}") from None


def _pages(row: dict, file: Path, max_pages: int, dpi: int, render=render_pdf) -> list:
    if present(row.get("image")):
        return image_list(row["image"], file.parent)[:max_pages]
    doc = str(row["doc_id"])
    for root in (file.parent / "documents", file.parent):
        folder = (root / doc).with_suffix("")
        if folder.is_dir():
            # files only: opening a FIFO named like a page would wait for a writer for ever
            pages = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if pages:
                return [str(p) for p in pages[:max_pages]]
        if (root / doc).is_file():
            return list(render(root / doc, max_pages, dpi))
    raise RowError(f"document {doc!r} not found in {file.parent / 'documents'} or {file.parent}")


def parse_row(row: dict, index, file: Path, max_pages: int, dpi: int, render=render_pdf) -> Sample:
    fmt = str(row.get("answer_format") or "")
    if fmt not in FORMATS:
        raise RowError(f"unknown answer_format {fmt!r} (expected one of {', '.join(FORMATS)})")
    answer = row["answer"]
    if not present(answer):
        raise RowError("no answer")
    question = text_cell(row, "question").strip()
    pages = _pages(row, file, max_pages, dpi, render)
    return Sample(
        index,
        user_turn(pages, PROMPT.format(question=question)),
        {"format": fmt, "answer": str(answer), "group": str(row.get("doc_type") or "")},
    )


def load(data, max_pages: int = 120, dpi: int = 72, media: bool = True, **_):
    """The rows of ``data``; ``media=False`` (re-scoring saved answers, which needs no pages) renders no PDF: a row
    holds its question alone."""
    if media:
        render = lru_cache(maxsize=CACHED_DOCUMENTS)(render_pdf)  # each document rendered once, not once per question
    else:
        render = lambda *_: ()  # noqa: E731
    return load_samples(data, partial(parse_row, max_pages=max_pages, dpi=dpi, render=render), ("index",))


def anls(gold: str, said: str, threshold: float = 0.5) -> float:
    """1 - normalised Levenshtein distance of the normalised strings; 0 below ``threshold``."""
    a, b = normalize_text(gold), normalize_text(said)
    if not a and not b:
        return 1.0
    similarity = 1 - edit_distance(a, b) / max(len(a), len(b))
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


_NOT_ANSWERABLE = re.compile(
    r"\b(?:not answerable|unanswerable|can ?not be (?:answered|determined)|"
    r"not (?:mentioned|provided|found|given|stated|specified) "
    r"in the (?:document|pdf|text|report))"
)


def stand_in(answer: str, fmt: str) -> str:
    """kimivl's rule-based extraction where the official pipeline asks an LLM: a string like the LLM's answer."""
    said = after_cue(answer).strip()
    if _NOT_ANSWERABLE.search(normalize_text(said)) or _NOT_ANSWERABLE.search(normalize_text(answer)):
        return NOT_ANSWERABLE
    said = said.removesuffix(".")
    if fmt in ("Int", "Float"):
        found = re.search(r"-?\d[\d,]*(?:\.\d+)?%?", said)
        return found.group().replace(",", "") if found else said
    if fmt == "List" and not said.startswith("["):
        return repr(_items(said))
    return said


def _drop_brackets(text: str) -> str:
    r"""``re.sub(r"\s*\([^)]*\)", "", text)`` in linear time: the same matches, without trying one from each space of
    a run (one from there would extend to the run's start) or from a "(" with no ")" after it."""
    end = text.rfind(")") + 1
    return re.sub(r"(?<!\s)\s*\([^)]*\)", "", text[:end]) + text[end:]


def _clean(value) -> str:
    text = str(value).lower().strip()
    text = _drop_brackets(text).strip()
    text = re.sub(r"^['\"]|['\"]$", "", text).strip()
    return text.strip().lstrip("$").strip().rstrip("%").strip()


def _exact_kind(text: str) -> bool:
    return (
        "https://" in text
        or text.endswith((".py", "ipynb"))
        or text.startswith("page")
        or re.fullmatch(r"\b\d+(-\d+|\s\d+)?\b", text) is not None
        or "a.m." in text
        or "p.m." in text
        or re.fullmatch(r"\b\d{4}[-\s]\d{2}[-\s]\d{2}\b", text) is not None
        or re.fullmatch(r"\b\d{4}[-\s]\d{2}\b", text) is not None
        or re.fullmatch(r"[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+\.[a-zA-Z]{2,}", text) is not None
    )


def official_anls(gold: str, pred: str) -> float:
    length = max(len(gold.upper()), len(pred.upper()))
    value = 1.0 - (edit_distance(gold, pred) / length if length else 0.0)
    return 0.0 if value <= 0.5 else value


def _decimals(value: float) -> int:
    text = str(value)
    return len(text.split(".")[-1]) if "." in text else 3


def _official_float_equal(gold, pred) -> bool:
    gold = float(str(gold).strip().rstrip("%").strip())
    try:
        pred = float(str(pred).strip().rstrip("%").strip())
    except ValueError:
        return False
    for item in (gold / 100, gold, gold * 100):
        if math.isclose(item, pred, rel_tol=0.01):
            return True
        try:
            places = max(min(_decimals(pred), _decimals(item)), 2)
            if round(pred, places) == round(item, places):
                return True
        except (OverflowError, ValueError):
            continue
    return False


def _as_list(value) -> list:
    if isinstance(value, str) and value.startswith("["):
        value = ast.literal_eval(value)  # the official code eval()s; kimivl never evaluates model output
    return value if isinstance(value, list) else [value]


_RAISES = (ValueError, TypeError, SyntaxError, IndexError, MemoryError, RecursionError, OverflowError)


def official_score(gold: str, pred: str, fmt: str) -> float:
    """``eval_score(gold, pred, fmt)``; raises where it raises (a gold or answer that does not convert)."""
    if fmt == "Int":
        try:
            return float(int(gold) == int(float(pred)))
        except (ValueError, TypeError, OverflowError):
            return float(gold == "")
    if fmt == "Float":
        try:
            gold = float(_clean(gold))
            pred = float(_clean(pred))
        except ValueError:
            pred = ""
        return float(_official_float_equal(gold, pred))
    if fmt in ("Str", "None"):
        gold, pred = _clean(gold), _clean(pred)
        return float(gold == pred) if _exact_kind(gold) else official_anls(gold, pred)
    golds, preds = _as_list(gold), _as_list(pred)
    if len(golds) != len(preds):
        return 0.0
    golds, preds = sorted(_clean(a) for a in golds), sorted(_clean(a) for a in preds)
    if _isfloat(golds[0]) or _exact_kind(golds[0]):
        return float("-".join(golds) == "-".join(preds))
    return float(min(official_anls(g, p) for g, p in zip(golds, preds)))


def _isfloat(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _extractor_reply(text: str) -> str:
    """The answer cut out of an extractor's reply ("Extracted answer: X\nAnswer format: Y") as ``run_lvlm.py``
    cuts it."""
    return text.split("Answer format:")[0].split("Extracted answer:")[1].strip()


def score(prediction: str, meta: dict, mode: str = "official", extracted: str | None = None) -> dict:
    """One row's score; ``extracted`` (e.g. an LLM's extraction) replaces the extraction from ``prediction``."""
    if check_mode(mode) == "official":
        if extracted is not None:
            pred = _extractor_reply(extracted) if "Extracted answer:" in extracted else extracted
        else:
            pred = stand_in(official_text(prediction), meta["format"])
        try:
            value = official_score(meta["answer"], pred, meta["format"])
        except _RAISES:  # run_lvlm.py: a failure to score is a score of 0 and a failed extraction
            value, pred = 0.0, "Failed to extract"
        return {"score": value, "extracted": pred, "answered": pred != NOT_ANSWERABLE}
    answer = final_answer(prediction) if extracted is None else extracted
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
        value = 0.0 if len(golds) != len(items) else min((_item_score(g, s) for g, s in zip(golds, items)), default=1.0)
    else:
        value = _str_score(gold, said)
    return {"score": value, "extracted": said, "answered": answered}


def summarize(rows: list[dict], mode: str = "official") -> dict[str, float]:
    """``accuracy`` and generalised ``f1`` (percent), with the recall and precision behind it."""
    if check_mode(mode) == "official":
        answerable = [r["score"] for r in rows if r["meta"]["answer"] != NOT_ANSWERABLE]
        answered = sum(r["extracted"] != NOT_ANSWERABLE for r in rows)
        recall = sum(answerable) / len(answerable) if answerable else 0.0
        precision = sum(answerable) / answered if answered and answerable else 0.0
        f1 = 2 * recall * precision / (recall + precision) if recall + precision > 0 else 0.0
        return {**accuracy(rows), "f1": 100 * f1, "recall": 100 * recall, "precision": 100 * precision}
    answerable = [r["score"] for r in rows if r["meta"]["format"] != "None"]
    answered = [r["score"] for r in rows if r.get("answered")]
    recall = sum(answerable) / len(answerable) if answerable else 0.0
    precision = sum(answered) / len(answered) if answered else 0.0
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    return {**accuracy(rows), "f1": 100 * f1, "recall": 100 * recall, "precision": 100 * precision}
