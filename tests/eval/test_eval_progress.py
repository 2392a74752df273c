"""The eval progress bar: the data's row count as its total (a limit below it caps it), none where the count is not
known, and a resumed run starting at the rows already predicted without counting them into its rate."""

import json
import re
import time

import pytest

import kimivl.progress
from kimivl.cli import main
from kimivl.eval import mmmu, ocrbench
from kimivl.eval.runner import run_task
from kimivl.eval.tasks import get_task
from tests.eval.test_eval_loaders import b64, png, write_parquet, write_tsv
from tests.eval.test_eval_runner import fake_cli, ocr_tsv


@pytest.fixture
def bars(monkeypatch):
    """The bars the runner makes, as made (tqdm instances), refreshed at every update."""
    made, real = [], kimivl.progress.progress_bar

    def recorded(*args, **kwargs):
        made.append(real(*args, mininterval=0, **kwargs))
        return made[-1]

    monkeypatch.setattr(kimivl.progress, "progress_bar", recorded)
    return made


def answer(conversations):
    return ["x"] * len(conversations)


def test_a_fresh_run_counts_its_datas_rows_and_a_limit_caps_them_only_from_below(tmp_path, bars):
    """The bar had no total (``ocrbench: 5row``: no percentage, no ETA); a limit above the row count became the total
    (the bar ended at 5/1000 with an ETA for rows that do not exist)."""
    data = ocr_tsv(tmp_path / "ocr.tsv", n=5)
    task = get_task("ocrbench")
    for limit in (None, 1000, 3):
        run_task(task, task.load(data), tmp_path / f"out{limit}", generate_fn=answer, batch_size=2, limit=limit)
    assert [(b.total, b.n, b.initial) for b in bars] == [(5, 5, 0), (5, 5, 0), (3, 3, 0)]


def test_rows_of_unknown_number_get_no_total_even_under_a_limit(tmp_path, bars):
    task = get_task("ocrbench")
    rows = list(task.load(ocr_tsv(tmp_path / "ocr.tsv", n=5)))
    run_task(task, iter(rows), tmp_path / "a", generate_fn=answer, limit=1000)  # a generator: no count
    run_task(task, rows, tmp_path / "b", generate_fn=answer, limit=3)  # a list: its length, capped
    assert [(b.total, b.n) for b in bars] == [(None, 5), (3, 3)]


def test_a_resumed_run_starts_at_the_rows_already_predicted_and_rates_only_the_rows_it_generates(tmp_path, bars):
    """Each row already predicted was an update of the bar: 28 rows in a few ms, a rate of hundreds or thousands of
    rows a second and no time left for rows generated at 20 a second."""
    data, out = ocr_tsv(tmp_path / "ocr.tsv", n=30), tmp_path / "out"
    task = get_task("ocrbench")
    run_task(task, task.load(data), out, generate_fn=answer, limit=28, progress=False)
    shown = []

    def slow(conversations):
        shown.append(str(bars[-1]))  # the bar as the terminal shows it while this row is generated
        time.sleep(0.05 * len(conversations))
        return answer(conversations)

    run_task(task, task.load(data), out, generate_fn=slow, batch_size=1)
    bar = bars[-1]
    assert (bar.total, bar.n, bar.initial) == (30, 30, 28)
    shown.append(str(bar))  # closed: the rate over the whole run
    assert [re.search(r" (\d+)/30 ", s)[1] for s in shown] == ["28", "29", "30"], shown
    rates = [float(re.search(r"([0-9.]+)row/s", s)[1]) for s in shown[1:]]
    assert all(0 < rate <= 20.5 for rate in rates), shown  # the 2 rows generated, 0.05 s each


def test_rescoring_a_predictions_file_rates_every_row(tmp_path, bars):
    """Nothing is generated: each row read is the work, counted into the rate from a start of 0."""
    data, task = ocr_tsv(tmp_path / "ocr.tsv", n=5), get_task("ocrbench")
    run_task(task, task.load(data), tmp_path / "out", generate_fn=answer, progress=False)
    predictions = tmp_path / "out" / "ocrbench.predictions.jsonl"
    run_task(task, task.load(data), tmp_path / "again", predictions=predictions)
    assert [(b.total, b.n, b.initial) for b in bars[1:]] == [(5, 5, 0)]


def test_the_cli_bar_counts_the_synthetic_rows_and_caps_them_by_a_lower_limit(monkeypatch, tmp_path, bars):
    """``kimivl eval --task synthetic --limit 1000`` on 140 rows ended at 140/1000; without a limit, 140row."""
    ckpt = fake_cli(monkeypatch, tmp_path, answer)
    args = ["eval", "--model", str(ckpt), "--max-new-tokens", "4", "--task"]
    assert main([*args, "synthetic", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "synthetic", "--out", str(tmp_path / "b"), "--limit", "1000"]) == 0
    assert main([*args, "synthetic", "--out", str(tmp_path / "c"), "--limit", "30"]) == 0
    assert main([*args, "synthetic:ocr", "--out", str(tmp_path / "d")]) == 0
    assert [(b.total, b.n) for b in bars] == [(140, 140), (140, 140), (30, 30), (20, 20)]


def ocr_rows(n, start=0):
    return [
        {"index": i, "image": b64(png()), "question": f"Word {i}?", "answer": f"['w{i}']", "category": "Regular"}
        for i in range(start, start + n)
    ]


def test_each_table_format_tells_its_row_count_once_its_file_is_opened(tmp_path):
    """Parquet from its metadata, JSONL from its lines (both before any row is read), TSV from the reader's first pass
    (for images shared between rows), JSON once parsed; a directory's once every file's is known."""
    (tmp_path / "a.json").write_text(json.dumps(ocr_rows(2)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n\n" for r in ocr_rows(3, 2)))  # blank lines: no rows
    write_parquet(tmp_path / "c.parquet", ocr_rows(4, 5))
    write_tsv(tmp_path / "d.tsv", [*ocr_rows(5, 9), {"index": 14, "question": "no image"}])  # skipped: a row still
    for name, count in (("a.json", 2), ("b.jsonl", 3), ("c.parquet", 4), ("d.tsv", 6)):
        rows = ocrbench.load(tmp_path / name)
        assert rows.total is None  # nothing read yet
        next(iter(rows))
        assert rows.total == count, name
    rows = ocrbench.load(tmp_path)
    read = iter(rows)
    next(read)
    assert rows.total is None  # d.tsv not opened yet
    assert len(list(read)) == 14 and rows.total == 15


SPLITS = ["dev", "validation", "validation", "dev", "validation"]


def test_mmmus_count_is_of_its_validation_rows(tmp_path):
    row = {"question": "Which?", "A": "x", "B": "y", "answer": "A", "image": b64(png())}
    tsv = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", [{**row, "index": i, "split": s} for i, s in enumerate(SPLITS)])
    rows = mmmu.load(tsv)
    assert len(list(rows)) == 3 and rows.total == 3
    (tmp_path / "mmmu.json").write_text(json.dumps([{**row, "index": i, "split": s} for i, s in enumerate(SPLITS)]))
    rows = mmmu.load(tmp_path / "mmmu.json")
    read = iter(rows)
    next(read)
    assert rows.total == 3 and len(list(read)) == 2  # counted as parsed: its validation rows too
    lines = [{**row, "index": i, "split": s} for i, s in enumerate(SPLITS)]
    (tmp_path / "mmmu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows = mmmu.load(tmp_path / "mmmu.jsonl")
    read = iter(rows)
    next(read)
    assert rows.total == 3 and len(list(read)) == 2  # a first pass reads each line's split (there was no total)
    hub = tmp_path / "hub"
    hub.mkdir()
    row = {"question": "q", "options": "['a', 'b']", "answer": "A", "question_type": "multiple-choice"}
    for split, n in (("dev", 2), ("validation", 3), ("test", 4)):
        image = {"bytes": png(), "path": None}
        shard = [{**row, "id": f"{split}_Art_{i}", "image_1": image} for i in range(n)]
        write_parquet(hub / f"{split}-00000-of-00001.parquet", shard)
    rows = mmmu.load(hub)
    read = iter(rows)
    next(read)
    assert rows.total == 3 and len(list(read)) == 2
