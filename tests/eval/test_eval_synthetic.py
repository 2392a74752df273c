"""Scoring the synthetic world's held-out answers (kimivl.eval.synthetic.score)."""

from pathlib import Path

import pytest

from kimivl.data.synthetic import THINK_CLOSE, THINK_OPEN
from kimivl.eval.synthetic import box_error, score

GUI = {"task": "gui", "gold": [0.5, 0.3], "box": [0.4, 0.2, 0.6, 0.4]}


@pytest.mark.parametrize(
    "prediction, right",
    [
        ("(0.50, 0.30)", True),
        ("(0.40, 0.20)", True),  # the box's edge counts
        ("(0.39, 0.30)", False),
        ("(0.5, 0.41)", False),
        ("[0.42, 0.22, 0.58, 0.38]", True),  # a box scores by its centre
        ("[0.30, 0.10, 0.90, 0.20]", False),  # centre (0.6, 0.15): above the box
        ("(0.5)", False),
        ("the OK button", False),
        (f"{THINK_OPEN}The button is at 0.9, 0.9 in the old layout.{THINK_CLOSE}(0.45, 0.35)", True),
        (f"{THINK_OPEN}It is at (0.45, 0.35)", False),  # a reasoning that never closes has no answer
    ],
)
def test_gui_clicks_and_boxes(prediction, right):
    assert score(prediction, GUI) is right


@pytest.mark.parametrize(
    "prediction, meta, right",
    [
        ("There are 12 circles.", {"task": "caption", "gold": 12}, True),
        ("There are 12 circles.", {"task": "caption", "gold": 2}, False),
        ("-7", {"task": "reasoning", "gold": -7}, True),
        ("7 or maybe 8", {"task": "chart", "gold": 8}, False),  # the first integer is the answer
        ("none", {"task": "chart", "gold": 0}, False),
        ("Hold, DUCK!", {"task": "ocr", "gold": "hold duck"}, True),
        ("hold duck now", {"task": "ocr", "gold": "hold duck"}, False),
        ("को", {"task": "ocr", "gold": "कि"}, False),  # vowel signs count
        ("red circle, blue square", {"task": "video", "gold": ["red circle", "blue square"]}, True),
        ("blue square, red circle", {"task": "video", "gold": ["red circle", "blue square"]}, False),
        (f"{THINK_OPEN}3 + 4 = 7, minus 2.{THINK_CLOSE}5", {"task": "reasoning", "gold": 5}, True),
        (f"{THINK_OPEN}3 + 4 = 7, minus 2.{THINK_CLOSE}", {"task": "reasoning", "gold": 7}, False),
    ],
)
def test_integers_strings_and_orders(prediction, meta, right):
    assert score(prediction, meta) is right


def test_synthetic_sub_task_typo_lists_the_tasks_and_limit_spans_tasks():
    from kimivl.eval.tasks import get_task

    task = get_task("synthetic:captoin")
    with pytest.raises(ValueError, match="unknown synthetic task 'captoin'.*caption, chart, gui"):
        list(task.load(task.default_data, **task.options))
    every = get_task("synthetic")
    rows = list(every.load(every.default_data))
    tasks = {r.meta["task"] for r in rows}
    assert len(tasks) == 7 and {r.meta["task"] for r in rows[:7]} == tasks  # the first 7 rows: one of each
    caption = get_task("synthetic:caption")
    only = list(caption.load(caption.default_data, **caption.options))
    assert only and {r.meta["task"] for r in only} == {"caption"}


def test_evaluate_rows_carry_the_difficulty(monkeypatch):
    import kimivl.inference.chat as chat
    from kimivl.eval.synthetic import evaluate

    answers = iter(["7", "8", "7"])
    monkeypatch.setattr(chat, "generate", lambda model, processor, prompts, **kw: [next(answers) for _ in prompts])
    records = [
        {"id": f"r{i}", "messages": [{"role": "user", "content": "2 + 5?"}], "meta": meta}
        for i, meta in enumerate(
            [
                {"task": "reasoning", "gold": 7, "difficulty": "easy"},
                {"task": "reasoning", "gold": 7, "difficulty": "hard"},
                {"task": "ocr", "gold": "7"},  # no difficulty: None
            ]
        )
    ]
    accuracy, rows = evaluate(None, None, records, batch_size=2)
    assert [(r["id"], r["difficulty"], r["correct"]) for r in rows] == [
        ("r0", "easy", True),
        ("r1", "hard", False),
        ("r2", None, True),
    ]
    assert accuracy == {"ocr": 1.0, "reasoning": 0.5, "all": pytest.approx(2 / 3)}


def test_a_synthetic_sub_task_loads_only_its_rows_from_python(tmp_path):
    from kimivl.eval.runner import run_task
    from kimivl.eval.tasks import get_task

    task = get_task("synthetic:ocr")
    rows = list(task.load(task.default_data))  # no options: the sub-task is bound to the task
    assert len(rows) == 20 and {r.meta["task"] for r in rows} == {"ocr"}
    result = run_task(task, rows, tmp_path, generate_fn=lambda c: ["x"] * len(c), progress=False)
    assert result["scored"] == 20 and set(result["metrics"]) == {"accuracy", "accuracy/ocr"}
    assert len(list(task.load(task.default_data, **task.options))) == 20  # as the CLI calls it


def test_eval_outputs_written_into_the_data_directory_are_not_held_out_records(tmp_path):
    import shutil

    from kimivl.eval.runner import run_task
    from kimivl.eval.synthetic import heldout_records
    from kimivl.eval.tasks import get_task

    data = tmp_path / "heldout"
    shutil.copytree(get_task("synthetic").default_data, data)
    task = get_task("synthetic:ocr")
    for _ in range(2):  # --out equal to --data: the second run reads the first one's outputs there
        result = run_task(task, task.load(data), data, generate_fn=lambda c: ["x"] * len(c), progress=False)
        assert result["scored"] == 20
    assert (data / "synthetic_ocr.scored.jsonl").is_file() and (data / "synthetic_ocr.predictions.jsonl").is_file()
    assert len(heldout_records(data)) == 140


def test_held_out_records_without_an_id_are_rows_of_their_own(tmp_path):
    """Records lacking an id get <file stem>/<line>: three such records are three rows, not one and two
    'duplicate index' skips."""
    import json

    from kimivl.eval.runner import run_task
    from kimivl.eval.tasks import get_task

    data = tmp_path / "heldout"
    data.mkdir()
    source = get_task("synthetic").default_data
    records = [json.loads(x) for x in (Path(source) / "ocr.jsonl").read_text().splitlines()[:3]]
    for r in records:
        del r["id"]
        for part in r["messages"][0]["content"]:
            if part["type"] == "image":
                part["image"] = str(Path(source) / part["image"])
    records[2]["id"] = "kept"
    first, rest = json.dumps(records[0]), "".join(json.dumps(r) + "\n" for r in records[1:])
    (data / "ocr.jsonl").write_text(f"{first}\n\n{rest}")
    task = get_task("synthetic")
    rows = task.load(data)
    assert [s.index for s in rows] == ["ocr/1", "ocr/3", "kept"]  # line numbers count the blank line
    assert rows.total == 3  # the blank line is no row
    golds = [r["meta"]["gold"] for r in records]
    answers = iter(golds)
    result = run_task(task, task.load(data), tmp_path / "out", generate_fn=lambda c: [next(answers) for _ in c])
    assert (result["scored"], result["skipped"], result["metrics"]["accuracy"]) == (3, 0, 100.0)


def test_a_held_out_prompt_keeps_a_final_user_turn_and_an_extracted_answer_is_scored(tmp_path):
    import json

    from kimivl.eval.tasks import get_task

    data = tmp_path / "heldout"
    data.mkdir()
    record = {
        "id": "q1",
        "messages": [{"role": "user", "content": "How many?"}],
        "meta": {"task": "caption", "gold": 3},
    }
    (data / "caption.jsonl").write_text(json.dumps(record) + "\n")
    task = get_task("synthetic")
    [sample] = task.load(data)
    assert sample.messages == record["messages"]  # no answer turn to drop: the question stays
    assert task.score("There are 5.", {"task": "caption", "gold": 3}, extracted="3")["score"] == 1.0


def _small_split(path: Path, sizes: dict[str, tuple[str, int]]) -> Path:
    """Task files (name -> (task, records)) of text-only held-out records whose ids say file and line."""
    import json

    path.mkdir()
    for name, (task, n) in sizes.items():
        lines = [
            {"id": f"{name}{i}", "messages": [{"role": "user", "content": "?"}], "meta": {"task": task, "gold": i}}
            for i in range(n)
        ]
        (path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_synthetic_rows_interleave_tasks_in_the_same_order_as_reading_them_all(tmp_path):
    from kimivl.eval.tasks import get_task

    # tasks of unequal lengths, and task "a" split over two files (a1, a2): a1 then a2 within the task's turn
    data = _small_split(tmp_path / "split", {"a1": ("a", 2), "a2": ("a", 1), "b": ("b", 4), "c": ("c", 1)})
    rows = [s.index for s in get_task("synthetic").load(data)]
    assert rows == ["a10", "b0", "c0", "a11", "b1", "a20", "b2", "b3"]
    assert [s.index for s in get_task("synthetic:a").load(data)] == ["a10", "a11", "a20"]


def test_a_synthetic_limit_reads_about_limit_lines_not_the_whole_split(tmp_path, monkeypatch):
    from kimivl.eval import synthetic
    from kimivl.eval.runner import run_task
    from kimivl.eval.tasks import get_task

    data = _small_split(tmp_path / "split", {"a": ("a", 500), "b": ("b", 500)})
    read = []

    def counted(path, text):
        for item in iter_lines(path, text):
            read.append(item)
            yield item

    iter_lines = synthetic.iter_lines
    monkeypatch.setattr(synthetic, "iter_lines", counted)
    assert len(synthetic.heldout_records(data, limit=5)) == 10 and len(read) == 10  # 5 lines of each file
    read.clear()
    samples = get_task("synthetic").load(data)
    assert not isinstance(samples, list)  # read as asked for
    result = run_task(get_task("synthetic"), samples, tmp_path / "out", generate_fn=lambda c: ["0"] * len(c), limit=6)
    assert result["scored"] == 6 and len(read) <= 8  # 3 of each file, and at most one more each read ahead


@pytest.mark.parametrize(
    "box",
    [
        None,
        [0.4, 0.2, 0.6],
        [0.4, 0.2, 0.6, "0.4"],
        [True, 0, 1, 1],
        [0.4, 0.2, float("nan"), 0.6],
        [0.6, 0.2, 0.4, 0.6],
        [0.4, 0.6, 0.6, 0.2],  # reversed in y
        [0, 0, 1, 1, 3],  # five numbers
        [0, 0, float("inf"), 1],  # Python's json reads Infinity
        [0, 0, 10**400, 1],  # an int no float holds (an OverflowError escaped)
    ],
)
def test_a_gui_record_without_a_box_of_four_numbers_is_refused_when_read(tmp_path, box):
    """Scoring a click needs meta.box: a gui record without one is named when read, not a KeyError after
    generation; a NaN or reversed box, which no click could hit, is named too (it scored every answer wrong)."""
    import json

    from kimivl.data.formats import DataError
    from kimivl.eval.synthetic import iter_heldout

    meta = {"task": "gui", "gold": "OK"} | ({} if box is None else {"box": box})
    good = {"messages": [{"role": "user", "content": "Click OK"}], "meta": {**GUI}}
    bad = {"messages": [{"role": "user", "content": "Click OK"}], "meta": meta}
    (tmp_path / "gui.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(
        DataError, match=r"gui.jsonl: record 2 is a gui task whose meta.box is .*4 finite numbers with x1 <= x2"
    ):
        list(iter_heldout(tmp_path / "gui.jsonl"))


def test_a_gui_box_of_no_width_or_height_is_a_box_to_click():
    assert box_error({"box": [0.5, 0.2, 0.5, 0.2]}) is None
    assert score("(0.5, 0.2)", {"task": "gui", "gold": [0.5, 0.2], "box": [0.5, 0.2, 0.5, 0.2]})
