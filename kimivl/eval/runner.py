"""Running a task: batched generation with resumable JSONL predictions, scoring, results files.

``OUT/<task>.predictions.jsonl`` gets one ``{"index", "prediction"}`` line per row as batches finish; a rerun
skips the indices already there (a line cut short by a kill is dropped), so every row is generated and scored
once. ``OUT/<task>.scored.jsonl`` holds each row's extracted answer and score; ``OUT/results.json`` and
``OUT/results.md`` the metrics of every task run into ``OUT``. Malformed rows, rows whose generation failed
(e.g. a prompt longer than the context) and rows without a prediction are listed with their reason, never scored.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from kimivl.eval.report import update_results
from kimivl.eval.tables import Sample, Skipped
from kimivl.eval.tasks import Task

log = logging.getLogger(__name__)

GenerateFn = Callable[[list[list[dict]]], list[str]]


def read_predictions(path: str | os.PathLike, repair: bool = False) -> dict[str, str]:
    """``{str(index): prediction}`` from a predictions JSONL (the first line of an index wins). A last line
    without its newline (a write cut short) is ignored, and with ``repair`` also cut from the file."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        log.warning("%s: ignoring an incomplete last line (an interrupted write)", path)
        if repair:
            with open(path, "r+b") as f:
                f.truncate(len(complete))
    out: dict[str, str] = {}
    for lineno, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            key, text = str(obj["index"]), obj["prediction"]
            if not isinstance(text, str):
                raise TypeError
            out.setdefault(key, text)
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{lineno}: expected a JSON object with 'index' and a string 'prediction'") from None
    return out


def _generate(generate_fn: GenerateFn, batch: list[Sample]) -> tuple[list[tuple[Sample, str]], list[Skipped]]:
    """Predictions for a batch; when the batch fails, each row alone, and the rows that still fail are skipped."""
    try:
        return list(zip(batch, generate_fn([s.messages for s in batch]))), []
    except ValueError as e:
        if len(batch) == 1:
            return [], [Skipped(batch[0].index, f"generation failed: {e}")]
    done, failed = [], []
    for sample in batch:
        d, f = _generate(generate_fn, [sample])
        done += d
        failed += f
    return done, failed


def _score(task: Task, metas: dict[str, dict], done: dict[str, str], skipped: list[Skipped]) -> list[dict]:
    """Score every row that has a prediction; the others join ``skipped`` (unless already there)."""
    rows, known = [], {str(s.index) for s in skipped}
    for key, meta in metas.items():
        if key in done:
            rows.append({"index": key, "prediction": done[key], "meta": meta, **task.score(done[key], meta)})
        elif key not in known:
            skipped.append(Skipped(key, "no prediction"))
    return rows


def run_task(task: Task, samples: Iterable[Sample | Skipped], out_dir: str | os.PathLike,
             generate_fn: GenerateFn | None = None, predictions: str | os.PathLike | None = None,
             batch_size: int = 8, limit: int | None = None, progress: bool = True, info: dict | None = None) -> dict:
    """Generate (with ``generate_fn``) or read (``predictions``) the answers to ``samples``, score them, and
    record the task in ``out_dir/results.json``. Returns that task's result."""
    from tqdm.auto import tqdm

    if (generate_fn is None) == (predictions is None):
        raise ValueError("give exactly one of generate_fn (generate answers) or predictions (re-score a file)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / f"{task.name.replace(':', '_')}.predictions.jsonl" if predictions is None else Path(predictions)
    done = read_predictions(pred_path, repair=predictions is None)
    metas: dict[str, dict] = {}
    skipped: list[Skipped] = []
    batch: list[Sample] = []
    bar = tqdm(desc=task.name, unit="row", total=limit, disable=not progress)

    def flush() -> None:
        answered, failed = _generate(generate_fn, batch)
        with open(pred_path, "a", encoding="utf-8") as f:
            for sample, text in answered:
                f.write(json.dumps({"index": sample.index, "prediction": text}, ensure_ascii=False) + "\n")
                done[str(sample.index)] = text
        skipped.extend(failed)
        for s in failed:
            log.warning("%s row %s skipped: %s", task.name, s.index, s.reason)
        bar.update(len(batch))
        batch.clear()

    for item in itertools.islice(samples, limit):
        key = str(item.index)
        if isinstance(item, Skipped) or key in metas:
            item = item if isinstance(item, Skipped) else Skipped(item.index, "duplicate index")
            skipped.append(item)
            log.warning("%s row %s skipped: %s", task.name, item.index, item.reason)
            bar.update(1)
            continue
        metas[key] = item.meta
        if key in done or generate_fn is None:
            bar.update(1)
            continue
        batch.append(item)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    if not metas and not skipped:
        raise ValueError(f"{task.name}: the data holds no rows")

    rows = _score(task, metas, done, skipped)
    scored_path = out_dir / f"{task.name.replace(':', '_')}.scored.jsonl"
    with open(scored_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({k: v for k, v in r.items() if k != "meta"}, ensure_ascii=False, default=str) + "\n"
                     for r in rows)
    result = {"metrics": task.summarize(rows) if rows else {}, "scored": len(rows), "skipped": len(skipped),
              "skipped_rows": [{"index": s.index, "reason": s.reason} for s in skipped],
              "unmatched_predictions": len(done.keys() - metas.keys()), "predictions": str(pred_path),
              "scores": str(scored_path), **(info or {})}
    if task.report and rows:
        result.update(task.report(rows, out_dir))
    update_results(out_dir, task.name, result)
    return result
