"""Video-MME: four-option questions on videos; accuracy, also by duration (short, medium, long).

Formats: the hub's parquet (``question_id``, ``videoID``, ``duration``, ``question``, ``options`` as
``["A. ...", ...]``, ``answer`` letter) and VLMEvalKit TSV (``index``, ``video``, ``question``, ``candidates``,
``answer``). Videos are ``<videoID>.mp4`` (or .mkv/.webm/.avi) next to the file or in ``data/``, ``videos/``
beside it; a row whose video is missing is skipped and reported. Frames are sampled at ``fps`` up to
``max_frames`` (kimivl's video defaults: 1 fps, 64 frames) and fed with their timestamps.

Scoring, ``mode="official"`` (the default): Video-MME's ``extract_characters_regex`` and accuracy rule
(``evaluation/eval_your_results.py`` of github:MME-Benchmarks/Video-MME, = github:BradyFU/Video-MME, at commit
4e7566d36f63121fc72f040654d6f38f83f30125; the file was removed from the repository in 49a2e67): the answer is
stripped, the lead-ins "The best answer is", "The correct answer is", "The answer is", "The answer", "The best
option isThe correct option is", "Best answer:Best option:" (the official list misses two commas, so the last four
are two glued strings) are deleted where they occur (case-sensitive); an answer of more than 10 words without any
capital A-D is unanswered; otherwise the first capital A, B, C or D anywhere is the answer, inside a word too
("Based on ..." answers B). Unanswered rows (no letter) are left out of the accuracy, which is right / answered, as
the official script counts it (``accuracy_all`` gives right / all rows, ``parsed`` the percent of rows with a
letter). An ``extracted`` answer goes through the same rule.

``mode="lenient"`` (kimivl's own): lead-ins (any case, "answer:" and "option:" too) are stripped and the first
letter A-D standing alone (not inside a word) is the answer; accuracy over every row.
"""

from __future__ import annotations

import re
from collections import defaultdict
from functools import partial
from pathlib import Path

from kimivl.eval.answers import check_mode, final_answer, official_text
from kimivl.eval.tables import RowError, Sample, literal_list, load_samples, text_cell
from kimivl.processing.video import DEFAULT_FPS, DEFAULT_MAX_FRAMES

PROMPT = (
    "Select the best answer to the following multiple-choice question based on the video. "
    "Respond with only the letter (A, B, C, or D) of the correct option.\n{question}\n{options}\n"
    "The best answer is:"
)
LEAD_INS = (
    "the best answer is",
    "the correct answer is",
    "the answer is",
    "the answer",
    "the best option is",
    "the correct option is",
    "best answer:",
    "best option:",
    "answer:",
    "option:",
)
OFFICIAL_LEAD_INS = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option isThe correct option is",
    "Best answer:Best option:",
)
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


def _video(name: str, file: Path) -> Path:
    for root in (file.parent, file.parent / "data", file.parent / "videos"):
        for suffix in ("", *VIDEO_SUFFIXES):
            if (root / f"{name}{suffix}").is_file():
                return root / f"{name}{suffix}"
    raise RowError(f"video {name!r} not found next to {file} or in data/ or videos/")


def parse_row(row: dict, index, file: Path, fps: float, max_frames: int) -> Sample:
    options = [str(o).strip() for o in literal_list(row.get("options") or row.get("candidates"))]
    if len(options) != 4:
        raise RowError(f"expected 4 options, got {len(options)}")
    options = [o if re.match(r"[A-D][.)]", o) else f"{'ABCD'[i]}. {o}" for i, o in enumerate(options)]
    answer = str(row["answer"]).strip()
    if answer not in ("A", "B", "C", "D"):
        raise RowError(f"answer {answer!r} is not a letter A-D")
    name = str(row.get("videoID") or row.get("video") or row.get("video_path") or "")
    if not name:
        raise RowError("no video")
    video = {"type": "video", "video": str(_video(name, file)), "fps": fps, "max_frames": max_frames}
    text = PROMPT.format(question=text_cell(row, "question").strip(), options="\n".join(options))
    return Sample(
        index,
        [{"role": "user", "content": [video, {"type": "text", "text": text}]}],
        {"answer": answer, "group": str(row.get("duration") or "")},
    )


def load(data, fps: float = DEFAULT_FPS, max_frames: int = DEFAULT_MAX_FRAMES, **_):
    return load_samples(data, partial(parse_row, fps=fps, max_frames=max_frames), ("index", "question_id"))


def extract(answer: str) -> str | None:
    """The letter A-D that ``answer`` chooses, after stripping lead-ins (lenient); ``None`` when there is none."""
    text = answer.strip()
    for lead in LEAD_INS:
        text = re.sub(re.escape(lead), "", text, flags=re.IGNORECASE)
    found = re.search(r"(?<![A-Za-z])([A-D])(?![A-Za-z])", text)
    return found.group(1) if found else None


def official_extract(answer: str) -> str:
    """``extract_characters_regex``: the letter the official script reads, "" when unanswered."""
    text = answer.strip()
    for lead in OFFICIAL_LEAD_INS:
        text = text.replace(lead, "")
    found = re.search(r"[ABCD]", text)
    return found.group() if found else ""  # (the 10-word rule only ever returns "" where no letter is found)


def score(prediction: str, meta: dict, mode: str = "official", extracted: str | None = None) -> dict:
    """One row's score; ``extracted``, when given, is read instead of the prediction."""
    if check_mode(mode) == "lenient":
        answer = final_answer(prediction) if extracted is None else extracted
        letter = None if answer is None else extract(answer)
        return {"score": float(letter == meta["answer"]), "extracted": letter}
    letter = official_extract(official_text(prediction) if extracted is None else extracted)
    return {"score": float(letter == meta["answer"]), "extracted": letter, "answered": letter != ""}


def summarize(rows: list[dict], mode: str = "official") -> dict[str, float]:
    """``accuracy`` (official: right / answered; lenient: right / all) and ``accuracy/<duration>``, in percent;
    official mode adds ``accuracy_all`` (right / all rows) and ``parsed`` (percent of rows with a letter; not the
    results' ``answered``, the count of rows with a prediction)."""
    official = check_mode(mode) == "official"
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[""].append(r)
        if r["meta"].get("group"):
            groups[str(r["meta"]["group"])].append(r)
    out = {}
    for name in ["", *sorted(k for k in groups if k)]:
        mine = groups[name]
        counted = [r for r in mine if r.get("answered", True)] if official else mine
        key = f"accuracy/{name}" if name else "accuracy"
        out[key] = 100 * sum(r["score"] for r in counted) / len(counted) if counted else 0.0
    if official:
        out["accuracy_all"] = 100 * sum(r["score"] for r in rows) / max(1, len(rows))
        out["parsed"] = 100 * sum(bool(r.get("answered", True)) for r in rows) / max(1, len(rows))
    return out
