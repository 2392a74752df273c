"""Video-MME: four-option questions on videos; accuracy, also by duration (short, medium, long).

Formats: the hub's parquet (``question_id``, ``videoID``, ``duration``, ``question``, ``options`` as
``["A. ...", ...]``, ``answer`` letter) and VLMEvalKit TSV (``index``, ``video``, ``question``, ``candidates``,
``answer``). Videos are ``<videoID>.mp4`` (or .mkv/.webm/.avi) next to the file or in ``data/``, ``videos/``
beside it; a row whose video is missing is skipped and reported. Frames are sampled at ``fps`` up to
``max_frames`` (kimivl's video defaults: 1 fps, 64 frames) and fed with their timestamps.

Scoring: lead-ins such as "The best answer is" are stripped and the first letter A-D standing alone (not inside
a word) is the answer.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

from kimivl.eval.answers import final_answer
from kimivl.eval.tables import RowError, Sample, literal_list, load_samples
from kimivl.processing.video import DEFAULT_FPS, DEFAULT_MAX_FRAMES

PROMPT = ("Select the best answer to the following multiple-choice question based on the video. "
          "Respond with only the letter (A, B, C, or D) of the correct option.\n{question}\n{options}\n"
          "The best answer is:")
LEAD_INS = ("the best answer is", "the correct answer is", "the answer is", "the answer", "the best option is",
            "the correct option is", "best answer:", "best option:", "answer:", "option:")
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
    text = PROMPT.format(question=str(row["question"]).strip(), options="\n".join(options))
    return Sample(index, [{"role": "user", "content": [video, {"type": "text", "text": text}]}],
                  {"answer": answer, "group": str(row.get("duration") or "")})


def load(data, fps: float = DEFAULT_FPS, max_frames: int = DEFAULT_MAX_FRAMES, **_):
    return load_samples(data, partial(parse_row, fps=fps, max_frames=max_frames), ("index", "question_id"))


def extract(answer: str) -> str | None:
    """The letter A-D that ``answer`` chooses, after stripping lead-ins; ``None`` when there is none."""
    text = answer.strip()
    for lead in LEAD_INS:
        text = re.sub(re.escape(lead), "", text, flags=re.IGNORECASE)
    found = re.search(r"(?<![A-Za-z])([A-D])(?![A-Za-z])", text)
    return found.group(1) if found else None


def score(prediction: str, meta: dict) -> dict:
    answer = final_answer(prediction)
    letter = None if answer is None else extract(answer)
    return {"score": float(letter == meta["answer"]), "extracted": letter}
