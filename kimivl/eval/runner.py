"""Running a task: batched generation with resumable JSONL predictions, scoring, results files.

``OUT/<task>.predictions.jsonl`` gets one ``{"index", "prediction"}`` line per row as batches finish; a rerun
skips the indices already there (a line cut short by a kill is dropped), so every row is generated and scored
once. ``OUT/<task>.run.json`` records what produced those predictions (model, checkpoint fingerprint, task, data,
generation settings); a rerun with different settings is refused (``overwrite=True`` starts afresh), and so is a
second run into ``OUT`` while one runs there (``OUT/.lock``), so one file never mixes two models' answers. A
predictions line may carry an ``extracted`` answer (parsed elsewhere, e.g. by an LLM), which the scorers use instead
of parsing the prediction; ``mode`` picks the official or lenient rules. A line repeating an earlier line's index is
ignored (the first wins), counted and warned about.
``OUT/<task>.scored.jsonl`` holds each row's extracted answer and score; ``OUT/results.json`` and
``OUT/results.md`` the metrics of every task run into ``OUT``. A row whose generation failed (e.g. a prompt longer
than the context) or that has no prediction is scored as an empty answer and listed among the ``missing_rows`` with
its reason; a malformed row (or one repeating an index) is listed among the ``skipped_rows``, never scored.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from kimivl.data.formats import DataError
from kimivl.eval.answers import check_mode
from kimivl.eval.report import read_results, update_results
from kimivl.eval.tables import Sample, Skipped, index_key, jsonl_objects
from kimivl.eval.tasks import Task
from kimivl.files import path_text, write_error, write_text_atomic, writing
from kimivl.terminal import printable
from kimivl.train.lock import LOCK, run_lock
from kimivl.train.recipe import RecipeError

log = logging.getLogger(__name__)

GenerateFn = Callable[[list[list[dict]]], list[str]]


class EvalError(ValueError):
    """An evaluation that cannot go on as asked (e.g. an output directory holding another run's predictions)."""


class EvalInterrupted(Exception):
    """Ctrl-C during generation: ``kept`` predictions are in ``path``; rerunning the same command resumes."""

    def __init__(self, task: str, path: Path, kept: int):
        super().__init__(f"{task}: interrupted; {kept} predictions kept in {path}")
        self.task, self.path, self.kept = task, path, kept


def read_predictions(path: str | os.PathLike, repair: bool = False) -> dict[str, str]:
    """``{index_key(index): prediction}`` from a predictions JSONL (the first line of an index wins); ``repair`` as for
    ``read_prediction_records``."""
    return {k: v["prediction"] for k, v in read_prediction_records(path, repair).items()}


def read_prediction_records(path: str | os.PathLike, repair: bool = False) -> dict[str, dict]:
    """``{index_key(index): {"prediction", "extracted"}}`` as ``read_predictions`` reads them; ``extracted`` is the
    line's optional extracted answer (a string) or ``None``. With ``repair`` (kimivl's own file, resumed), a last line
    without its newline is an interrupted write and is cut off; otherwise (a file given to re-score) it is read."""
    return _read_records(path, repair)[0]


def _read_records(path: str | os.PathLike, repair: bool) -> tuple[dict[str, dict], int]:
    """``read_prediction_records`` and the number of lines that repeat an index already read (ignored)."""
    path = Path(path)
    if not path.is_file():
        return {}, 0
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1] if repair else data
    if len(complete) < len(data):
        log.warning("%s: ignoring an incomplete last line (an interrupted write)", path)
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    expected = "expected a JSON object with 'index', a string 'prediction' and optionally a string 'extracted'"
    out: dict[str, dict] = {}
    duplicates = 0
    try:
        for lineno, obj in jsonl_objects(path, complete.split(b"\n")):
            text, extracted = obj.get("prediction"), obj.get("extracted")
            if "index" not in obj or not isinstance(text, str) or not (extracted is None or isinstance(extracted, str)):
                raise ValueError(f"{path}:{lineno}: {expected}")
            key = index_key(obj["index"])
            if key in out:
                duplicates += 1
            else:
                out[key] = {"prediction": text, "extracted": extracted}
    except DataError as e:  # not UTF-8, not JSON, not an object
        raise ValueError(f"{e}; {expected}") from None
    return out, duplicates


def rescoring_samples(task: Task, predictions: str | os.PathLike) -> list[Sample]:
    """For a task without data files that rebuilds a row from its index (``task.from_index``, e.g. NIAH): the rows
    of the indices in ``predictions``. An index that is not one of the task's is left out, so ``run_task`` counts
    its line among the ``unmatched_predictions``, as it does for tasks with data."""
    samples, foreign = [], []
    for key in read_predictions(predictions):
        try:
            samples.append(Sample(key, [], task.from_index(key)))
        except ValueError as e:
            foreign.append(str(e))
    if foreign:
        log.warning("%s: %d predictions are not %s rows, e.g. %s", predictions, len(foreign), task.name, foreign[0])
    return samples


FULL_HASH_BYTES = 64 << 20  # weight files up to this size are hashed whole
SAMPLE_BYTES = 4096  # larger ones: their first MiB (a safetensors header), then 4 KiB of every SAMPLE_STRIDE
SAMPLE_STRIDE = 2 << 20


def sampled_ranges(size: int) -> list[tuple[int, int]]:
    """The (offset, length) byte ranges of a weight file of ``size`` bytes that ``checkpoint_fingerprint`` reads."""
    if size <= FULL_HASH_BYTES:
        return [(0, size)]
    head = 1 << 20
    samples = [(at, SAMPLE_BYTES) for at in range(head, size - SAMPLE_BYTES, SAMPLE_STRIDE)]
    return [(0, head), *samples, (size - SAMPLE_BYTES, SAMPLE_BYTES)]


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """An identity of a checkpoint directory's contents: sha256 over its ``config.json``, its weight index (if any)
    and, for each weight file, its name, size and the bytes of ``sampled_ranges``: the whole file up to 64 MiB,
    else its first MiB (the safetensors header: names, dtypes, shapes, offsets) and 4 KiB of every 2 MiB, about
    0.2% of the file (a 16 GB checkpoint reads 32 MB). Training or re-exporting changes nearly every value of each
    tensor it touches, so a checkpoint with the same shapes but other weights gets another fingerprint; a copy of
    the same files (another inode or modification time) gets the same one. An edit confined to the unread bytes of
    a large file (a few values of tensors smaller than 2 MiB) goes unnoticed."""
    path = Path(path)
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        if (path / name).is_file():
            digest.update(name.encode() + b"\0" + (path / name).read_bytes() + b"\0")
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}\0".encode())
        with open(weights, "rb") as f:
            for offset, length in sampled_ranges(size):
                f.seek(offset)
                digest.update(f.read(length))
    return digest.hexdigest()


def _check_run(pred_path: Path, run_path: Path, settings: dict, overwrite: bool) -> None:
    """Start afresh (``overwrite``), or make sure the predictions already in ``pred_path`` come from a run with the
    same ``settings`` (``run_task`` records them in ``run_path`` once the first row is read)."""
    has_predictions = pred_path.is_file() and pred_path.stat().st_size > 0
    if overwrite:
        pred_path.unlink(missing_ok=True)
    elif has_predictions:
        try:
            before = json.loads(run_path.read_text(encoding="utf-8")) if run_path.is_file() else None
        except ValueError:  # not JSON, or not UTF-8: damaged
            before = None
        if not isinstance(before, dict):
            raise EvalError(
                f"{pred_path} holds predictions but no record of the run that made them ({run_path.name}),"
                " so they cannot be resumed safely; pass --overwrite to start afresh or choose another"
                " --out"
            )
        changed = [k for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
        if changed:
            diffs = "; ".join(f"{k}: {before.get(k)!r} before, {settings.get(k)!r} now" for k in changed)
            why = (
                " (the checkpoint's config or weights changed since, or a kimivl before 2026-12-06 made them: it"
                " fingerprinted checkpoints otherwise)"
                if "checkpoint_fingerprint" in changed
                else ""
            )
            raise EvalError(
                f"{pred_path} holds predictions of another run ({diffs}){why}; pass --overwrite to replace "
                "them or choose another --out"
            )


def _write_run(run_path: Path, settings: dict) -> None:
    write_text_atomic(run_path, json.dumps(settings, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def _made_dir(out_dir: Path) -> Iterator[None]:
    """Create ``out_dir``; when it was created here and what runs inside fails leaving nothing there but the lock,
    remove it again, and the parents created with it (a failed start leaves no output directory behind)."""
    made = [d for d in (out_dir, *out_dir.parents) if not d.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only or full disk: the error names the folder, as a write's does
        raise write_error(e, e.filename or out_dir) from None
    try:
        yield
    except BaseException:
        if made and {p.name for p in out_dir.iterdir()} <= {LOCK}:
            with contextlib.suppress(OSError):  # another run may have come in meanwhile: leave it its directory
                (out_dir / LOCK).unlink(missing_ok=True)
                for d in made:
                    d.rmdir()
        raise


def _out_lock(out_dir: Path) -> contextlib.ExitStack:
    """``out_dir``'s run lock (``kimivl.train.lock``: one run at a time, training or eval), held until the returned
    context exits; another run holding it is an ``EvalError`` naming that run."""
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(run_lock(out_dir))
    except RecipeError as e:
        raise EvalError(str(e)) from None
    return stack


def _generate(generate_fn: GenerateFn, batch: list[Sample]) -> tuple[list[tuple[Sample, str]], list[Skipped]]:
    """Predictions for a batch; when the batch fails, each row alone, and the rows that still fail are returned with
    their reason (scored as empty answers)."""
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


def _score(
    task: Task,
    metas: dict[str, dict],
    done: dict[str, str],
    extracted: dict[str, str | None],
    failed: list[Skipped],
    mode: str,
) -> list[dict]:
    """Score every row the data holds (a malformed row has no ``metas`` entry): a row without a prediction (its
    generation ``failed``, or a re-scored file lacks it) as an empty answer, as the official scripts count every row,
    its reason in the row's ``failed``."""
    reasons = {index_key(s.index): s.reason for s in failed}
    keys = list(metas)
    scores = task.score_rows([(done.get(k, ""), metas[k], extracted.get(k)) for k in keys], mode)
    return [
        {
            "index": k,
            "prediction": done.get(k, ""),
            "meta": metas[k],
            **({} if k in done else {"failed": reasons.get(k, "no prediction")}),
            **s,
        }
        for k, s in zip(keys, scores)
    ]


def _extraction(task: Task, rows: list[dict], extracted: dict[str, str]) -> dict:
    """For a task whose official pipeline extracts answers with an LLM: how many of the scored rows had theirs
    extracted elsewhere (the ``extracted`` field) and how many by kimivl's rules, which only approximate it."""
    if not task.llm_extraction:
        return {}
    given = sum(r["index"] in extracted for r in rows)
    return {"extraction": {"given": given, "rules": len(rows) - given}}


def _total(samples: Iterable, total: int | None, limit: int | None) -> int | None:
    """The progress bar's total: the number of rows (``total``, else the samples' own: their ``total`` as ``Rows``
    know it, or their length) capped by ``limit``; ``None`` while that number is not known (``limit`` alone says
    nothing: the data may hold fewer rows)."""
    if total is None:
        total = getattr(samples, "total", None)
    if total is None and hasattr(samples, "__len__"):
        total = len(samples)
    return total if total is None or limit is None else min(total, limit)


def _outside_rate(bar) -> None:
    """Count a row on ``bar`` without counting it into its rate: it moves the bar's start (``initial``, as a resumed
    training run's bar starts at its step), so that the rate and the time left are those of the rows generated."""
    if not bar.disable:
        bar.initial += 1
        bar.n += 1
        bar.last_print_n += 1
        bar.update(0)  # a refresh when one is due


def run_task(
    task: Task,
    samples: Iterable[Sample | Skipped],
    out_dir: str | os.PathLike,
    generate_fn: GenerateFn | None = None,
    predictions: str | os.PathLike | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
    info: dict | None = None,
    mode: str = "official",
    settings: dict | None = None,
    overwrite: bool = False,
    total: int | None = None,
) -> dict:
    """Generate (with ``generate_fn``) or read (``predictions``) the answers to ``samples``, score them (``mode``:
    official or lenient rules), and record the task in ``out_dir/results.json``. Returns that task's result.

    ``settings`` (what makes the predictions: model, checkpoint fingerprint, data, generation settings) guards
    resuming: predictions already in ``out_dir`` made with other settings raise ``EvalError`` unless
    ``overwrite`` (start afresh). ``out_dir`` is locked from that check until the results are written: another
    run into it at the same time (an eval or a training run) raises ``EvalError`` naming it. The progress bar's total
    is ``total``, the row count where it is known, else the samples' own (``_total``), capped by ``limit``; the rows
    not generated (predicted by an earlier run, or malformed) count outside its rate. Ctrl-C (``KeyboardInterrupt``)
    during generation raises ``EvalInterrupted``; every finished batch stays on disk. A predictions line repeating an
    earlier line's index is ignored, counted (``duplicate_predictions``) and warned about. A predictions line whose
    index is no row of the data is counted as ``unmatched_predictions``; when ``limit`` stopped the reading early,
    the lines whose index is not among the rows read are ``beyond_limit_predictions`` instead (rows past the limit,
    or not in the data: only reading the rest could tell). Rows and predictions match by ``index_key`` (``"007"``, 7
    and 7.0 are one row). The settings go to ``out_dir/<task>.run.json`` once the first row is read, and an
    ``out_dir`` this call created is removed again when the run fails before writing anything there but its lock."""
    from kimivl.progress import progress_bar

    if (generate_fn is None) == (predictions is None):
        raise ValueError("give exactly one of generate_fn (generate answers) or predictions (re-score a file)")
    out_dir = Path(out_dir)
    check_mode(mode)
    with _made_dir(out_dir), _out_lock(out_dir):
        read_results(out_dir)  # a damaged results.json stops the run now, not after all the generation and scoring
        stem = task.name.replace(":", "_")
        pred_path = out_dir / f"{stem}.predictions.jsonl" if predictions is None else Path(predictions)
        run_record = None
        if predictions is None and (settings is not None or overwrite):
            run_record = {**(settings or {}), "task": task.name}
            _check_run(pred_path, out_dir / f"{stem}.run.json", run_record, overwrite)
        records, duplicates = _read_records(pred_path, repair=predictions is None)
        if duplicates:
            log.warning(
                "%s: %d lines repeat an index of an earlier line and are ignored (the first line of an index is "
                "scored)",
                pred_path,
                duplicates,
            )
        done = {k: v["prediction"] for k, v in records.items()}
        extracted = {k: v["extracted"] for k, v in records.items() if v["extracted"] is not None}
        metas: dict[str, dict] = {}
        rows_read: set[str] = set()  # the index of every row read, malformed ones included
        skipped: list[Skipped] = []  # malformed rows and repeated indices: not scored
        failed: list[Skipped] = []  # rows whose generation failed: scored as empty answers
        batch: list[Sample] = []
        bar = progress_bar(desc=task.name, unit="row", total=_total(samples, total, limit), disable=not progress)

        def flush() -> None:
            answered, unanswered = _generate(generate_fn, batch)
            with writing(pred_path), open(pred_path, "a", encoding="utf-8") as f:
                for sample, text in answered:
                    f.write(json.dumps({"index": sample.index, "prediction": text}, ensure_ascii=False) + "\n")
                    done[index_key(sample.index)] = text
            failed.extend(unanswered)
            for s in unanswered:
                log.warning(
                    "%s row %s has no prediction, scored as an empty answer: %s",
                    task.name,
                    printable(s.index),
                    printable(s.reason),
                )
            bar.update(len(batch))
            batch.clear()

        def passed() -> None:
            """A row read and not generated (malformed, or predicted by an earlier run): outside the rate while
            generating, which is the generation's."""
            if generate_fn is None:
                bar.update(1)
            else:
                _outside_rate(bar)

        read = 0
        try:
            for item in itertools.islice(samples, limit):
                if run_record is not None:  # the first row is read: the run has started
                    _write_run(out_dir / f"{stem}.run.json", run_record)
                    run_record = None
                read += 1
                if bar.total is None and (known := _total(samples, total, limit)) is not None:
                    bar.total = known  # ``Rows`` learn their count as they are read: shown once learnt
                    bar.refresh()
                key = index_key(item.index)
                rows_read.add(key)
                if isinstance(item, Skipped) or key in metas:
                    item = item if isinstance(item, Skipped) else Skipped(item.index, "duplicate index")
                    skipped.append(item)
                    log.warning("%s row %s skipped: %s", task.name, printable(item.index), printable(item.reason))
                    passed()
                    continue
                metas[key] = item.meta
                if key in done or generate_fn is None:
                    passed()
                    continue
                batch.append(item)
                if len(batch) >= batch_size:
                    flush()
            if batch:
                flush()
        except KeyboardInterrupt:
            bar.close()
            if generate_fn is None:
                raise
            raise EvalInterrupted(task.name, pred_path, len(read_predictions(pred_path, repair=True))) from None
        bar.close()
        if not metas and not skipped:
            raise ValueError(f"{task.name}: the data holds no rows")

        rows = _score(task, metas, done, extracted, failed, mode)
        missing = [{"index": r["index"], "reason": r["failed"]} for r in rows if "failed" in r]
        unread = done.keys() - rows_read
        limited = limit is not None and read >= limit
        scored_path = out_dir / f"{task.name.replace(':', '_')}.scored.jsonl"
        write_text_atomic(
            scored_path,
            "".join(
                json.dumps({k: v for k, v in r.items() if k != "meta"}, ensure_ascii=False, default=str) + "\n"
                for r in rows
            ),
            errors="backslashreplace",  # a reason naming a path under LC_ALL=C: its lone surrogates as their escapes
        )
        result = {
            "metrics": task.summarize(rows, mode=mode) if rows else {},
            "scoring": mode,
            **_extraction(task, rows, extracted),
            "scored": len(rows),
            "answered": len(rows) - len(missing),
            "missing": len(missing),
            "missing_rows": missing,
            "skipped": len(skipped),
            "skipped_rows": [{"index": index_key(s.index), "reason": s.reason} for s in skipped],
            "unmatched_predictions": 0 if limited else len(unread),
            "beyond_limit_predictions": len(unread) if limited else 0,
            "limit": limit,
            "duplicate_predictions": duplicates,
            "predictions": path_text(pred_path.resolve()),  # absolute, as run.json's paths: the same from any cwd
            "scores": path_text(scored_path.resolve()),
            **(info or {}),
        }
        if task.report and rows:
            result.update(task.report(rows, out_dir))
        update_results(out_dir, task.name, result)
        return result
