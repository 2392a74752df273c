"""``kimivl.rl.compare`` on run directories laid out as the pipeline writes them (``out/eval``)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kimivl.rl.compare import _rows, comparison_table, difficulty_summary, difficulty_table, main, t_quantile, wilson


def write_run(root, before, after, tokens_before, tokens_after, problems=100, other=20):
    """A run's eval files: accuracy and mean answer tokens per task, and the predictions behind them (``problems``
    reasoning rows and ``other`` ocr rows)."""
    out = root / "eval"
    out.mkdir(parents=True)
    for name, acc, tokens in (("base", before, tokens_before), ("rl", after, tokens_after)):
        (out / f"{name}.json").write_text(json.dumps({"ocr": 0.5, "reasoning": acc, "all": 0.4}, indent=1) + "\n")
        (out / f"{name}.lengths.json").write_text(json.dumps({"ocr": 3.0, "reasoning": tokens, "all": 9.0}) + "\n")
        rows = [
            {"id": str(i), "task": "reasoning", "prediction": "7", "gold": 7, "correct": True} for i in range(problems)
        ]
        rows += [{"id": str(i), "task": "ocr", "prediction": "a", "gold": "a", "correct": True} for i in range(other)]
        (out / f"{name}.predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture()
def runs(tmp_path):
    opmd = [
        write_run(tmp_path / f"opmd-s{i}", 0.24, after, 58.4, tokens)
        for i, (after, tokens) in enumerate([(0.26, 34.0), (0.28, 36.0), (0.30, 38.0)])
    ]
    grpo = write_run(tmp_path / "grpo", 0.24, 0.05, 58.4, 8.6)
    return opmd, grpo


def test_t_quantiles_and_wilson_intervals_match_tables():
    # Student's t 97.5% points from the standard tables
    for df, t in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert t_quantile(df) == pytest.approx(t, abs=1e-4), df
    assert t_quantile(1, 0.75) == pytest.approx(1.0)  # Cauchy: tan(π/4)
    _, low, high = wilson(0.24, 100)  # 24 of 100
    assert (low, high) == pytest.approx((0.16691, 0.33232), abs=1e-5)
    assert wilson(0.0, 50)[1:] == pytest.approx((0.0, 0.07135), abs=1e-5)
    for df, p in ((0, 0.975), (3, 0.5), (3, 1.0)):
        with pytest.raises(ValueError, match="need df >= 1 and 1/2 < p < 1"):
            t_quantile(df, p)


def test_seeds_give_t_intervals_and_one_seed_wilson(runs):
    opmd, grpo = runs
    table = comparison_table({"opmd": opmd, "grpo": [grpo]}).splitlines()
    assert table[0] == (
        "| arm | seeds | reasoning accuracy before | after | change (points) | answer tokens before | after |"
    )
    # three seeds: after 26, 28, 30% -> mean 28, sd 2, half-width t(0.975, 2) * 2 / sqrt(3) = 4.97 points;
    # the base model is the same for all three seeds, so its interval has no width
    assert table[2] == (
        "| opmd | 3 | 24.0% [24.0, 24.0] | 28.0% [23.0, 33.0] | +4.0 [-1.0, +9.0] | 58.4 [58.4, 58.4] | "
        "36.0 [31.0, 41.0] (-38%) |"
    )
    # one seed: Wilson intervals from the 100 reasoning problems scored (24/100 and 5/100); no interval elsewhere
    assert table[3] == "| grpo | 1 | 24.0% [16.7, 33.2] | 5.0% [2.2, 11.2] | -19.0 | 58.4 | 8.6 (-85%) |"
    # the old form: each run directory an arm of one seed, named after it
    assert comparison_table([grpo]).splitlines()[2] == table[3]
    assert comparison_table([opmd[0]]).splitlines()[2].startswith("| opmd-s0 | 1 | 24.0% [16.7, 33.2] | 26.0% [")
    # empty answers before RL: no relative change to give (it printed "+nan%")
    silent = write_run(runs[0][0].parent / "silent", 0.0, 0.1, 0.0, 4.0)
    assert comparison_table([silent]).splitlines()[2].endswith("| 0.0 | 4.0 (n/a) |")
    # task "all": its accuracy (0.4) over every prediction (120 problems)
    assert comparison_table({"g": [grpo]}, task="all").splitlines()[2].startswith("| g | 1 | 40.0% [31.7, 48.9] |")


def test_the_command(runs, capsys, tmp_path):
    opmd, grpo = runs
    assert main([str(grpo), "--arm", "opmd=" + ",".join(map(str, opmd))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| grpo", "| opmd"]
    assert lines[3].startswith("| opmd | 3 | 24.0% [24.0, 24.0] | 28.0% [23.0, 33.0] |")
    (grpo / "eval" / "rl.predictions.jsonl").unlink()
    for argv, message in (
        ([str(grpo)], "rl.predictions.jsonl is missing: a single seed's interval needs the number of problems"),
        ([str(tmp_path / "nowhere")], "base.json is missing"),
        (["--arm", "opmd"], "--arm takes NAME=DIR[,DIR...]"),
        (["--arm", f"a={opmd[0]}", "--arm", f"a={opmd[1]}"], "arm 'a' is given twice"),
        # one run hid the other, and one run twice counted as two seeds of no spread
        ([str(opmd[0]), str(tmp_path / "elsewhere" / opmd[0].name)], "two runs are named 'opmd-s0'"),
        (["--arm", f"a={opmd[0]},{opmd[0]}"], "arm 'a' names one run twice"),
        (["--arm", "a=" + ",".join(map(str, opmd)), "--task", "gui"], "no 'gui' in a run's eval files"),
        ([], "give run directories"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv


def test_the_commands_help_and_an_arm_of_runs_whose_paths_hold_an_equals_sign(runs, capsys, tmp_path):
    """The arm's name is what comes before the first '=': a run directory may hold one (``lr=1e-5``)."""
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: python -m kimivl.rl.compare ")
    assert "The README comparison of RL runs: held-out accuracy" in " ".join(out.split())
    opmd, _ = runs
    moved = [opmd[0].rename(tmp_path / "lr=1e-5-s0"), opmd[1].rename(tmp_path / "lr=1e-5-s1")]
    assert main(["--arm", "opmd=" + ",".join(map(str, moved))]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("| opmd | 2 | 24.0% [24.0, 24.0] | 27.0% [")


def test_a_single_seed_without_predictions_of_the_task_is_named_not_a_traceback(tmp_path, capsys):
    """Its Wilson interval needs the number of problems scored: none would divide by zero."""
    run = write_run(tmp_path / "r", 0.2, 0.25, 50.0, 40.0, problems=0)
    with pytest.raises(SystemExit) as e:
        main([str(run)])
    error = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and error.endswith(
        f"{run / 'eval' / 'base.predictions.jsonl'} holds no predictions of task 'reasoning'"
    )


def test_seed_intervals_stay_within_what_accuracy_and_its_change_can_be(tmp_path):
    """After 0, 0, 100% from 0%: 33.3 +- 143.4 points unclamped, for the accuracy and its change alike."""
    wide = [write_run(tmp_path / f"w{i}", 0.0, after, 10.0, 10.0) for i, after in enumerate((0.0, 0.0, 1.0))]
    assert (
        comparison_table({"w": wide})
        .splitlines()[2]
        .startswith("| w | 3 | 0.0% [0.0, 0.0] | 33.3% [0.0, 100.0] | +33.3 [-100.0, +100.0] |")
    )


def test_by_difficulty_without_predictions_of_the_task_is_refused(tmp_path):
    """Predictions holding none of the task gave a table without rows; no predictions file, an OS error alone."""
    run = write_difficulty_run(tmp_path / "r", {"easy": (1, 2)}, {"easy": (1, 2)})
    with pytest.raises(ValueError, match=r"base.predictions.jsonl holds no predictions of task 'gui'"):
        difficulty_table([run], task="gui")
    (run / "eval" / "base.predictions.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="missing: accuracy by difficulty is computed from the predictions"):
        difficulty_table([run])


def test_an_arm_without_runs_is_refused():
    for table in (comparison_table, difficulty_table):
        with pytest.raises(ValueError, match="an arm needs at least one run directory"):
            table({"a": []})


def test_a_run_directorys_escapes_are_printed_as_escapes(tmp_path, capsys):
    """``python -m kimivl.rl.compare runs/*`` with a run directory named with escape sequences printed them raw in its
    error: the terminal was retitled and cleared. Now they print as escapes, as the ``kimivl`` commands do."""
    run = tmp_path / "run\x1b]0;PWNED\x07\x1b[2J"
    with pytest.raises(SystemExit) as e:
        main([str(run)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "\x1b" not in err and "\x07" not in err
    assert f"{tmp_path}/run\\x1b]0;PWNED\\x07\\x1b[2J/eval/base.json is missing" in err


def write_difficulty_run(root, correct_before, correct_after, difficulties=True):
    """A run whose predictions carry a difficulty: ``correct_*`` maps difficulty -> (right, problems)."""
    out = root / "eval"
    out.mkdir(parents=True)
    for name, correct in (("base", correct_before), ("rl", correct_after)):
        rows = [
            {"id": f"{d}{i}", "task": "reasoning", "prediction": "7", "gold": 7, "correct": i < right}
            | ({"difficulty": d} if difficulties else {})
            for d, (right, n) in correct.items()
            for i in range(n)
        ]
        rows.append({"id": "o", "task": "ocr", "prediction": "a", "gold": "a", "correct": True, "difficulty": "easy"})
        (out / f"{name}.predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_accuracy_by_difficulty_with_intervals(tmp_path, capsys):
    before = {"hard": (1, 10), "easy": (4, 10)}  # listed out of order: the table goes easy, medium, hard
    seeds = [
        write_difficulty_run(tmp_path / f"s{i}", before, {"easy": (easy, 10), "hard": (1, 10)})
        for i, easy in enumerate((5, 6, 7))
    ]
    one = write_difficulty_run(tmp_path / "one", before, {"easy": (2, 10), "hard": (0, 10)})
    table = difficulty_table({"opmd": seeds, "grpo": [one]}).splitlines()
    assert table[0] == "| arm | seeds | difficulty | problems | reasoning accuracy before | after | change (points) |"
    # easy after: 50, 60, 70% -> mean 60, sd 10, half-width t(0.975, 2) * 10 / sqrt(3) = 24.8 points; the ocr row
    # (task filter) is not counted, so each difficulty has 10 problems
    assert table[2] == "| opmd | 3 | easy | 10 | 40.0% [40.0, 40.0] | 60.0% [35.2, 84.8] | +20.0 [-4.8, +44.8] |"
    assert table[3] == "| opmd | 3 | hard | 10 | 10.0% [10.0, 10.0] | 10.0% [10.0, 10.0] | +0.0 [+0.0, +0.0] |"
    # one seed: Wilson intervals with n = 10 (4/10: [16.8, 68.7]; 2/10: [5.7, 51.0]); 0/10: [0, 27.8]
    assert table[4] == "| grpo | 1 | easy | 10 | 40.0% [16.8, 68.7] | 20.0% [5.7, 51.0] | -20.0 |"
    assert table[5] == "| grpo | 1 | hard | 10 | 10.0% [1.8, 40.4] | 0.0% [0.0, 27.8] | -10.0 |"
    # hard after 0, 0, 10%: mean 3.3, t-interval 3.3 ± 14.3 points, its accuracy kept within [0, 1]; the change not
    hard = [write_difficulty_run(tmp_path / f"h{i}", before, {"easy": (4, 10), "hard": (h, 10)}) for i, h in
            enumerate((0, 0, 1))]  # fmt: skip
    assert difficulty_table({"h": hard}).splitlines()[3] == (
        "| h | 3 | hard | 10 | 10.0% [10.0, 10.0] | 3.3% [0.0, 17.7] | -6.7 [-21.0, +7.7] |"
    )
    # a change's interval stays within [-100, +100] points (0, 0, 100% after 0%: +33.3 +- 143.4 unclamped)
    wide = [write_difficulty_run(tmp_path / f"w{i}", {"easy": (0, 1)}, {"easy": (r, 1)}) for i, r in
            enumerate((0, 0, 1))]  # fmt: skip
    assert difficulty_table({"w": wide}).splitlines()[2].endswith("| +33.3 [-100.0, +100.0] |")
    summary = difficulty_summary([one], task="all")  # every task: the ocr row counts as an easy problem
    assert summary["easy"]["problems"] == 11 and summary["easy"]["before"][0] == pytest.approx(5 / 11)

    assert main(["--by-difficulty", "--arm", "opmd=" + ",".join(map(str, seeds))]) == 0
    assert capsys.readouterr().out.splitlines()[2] == table[2]
    old = write_difficulty_run(tmp_path / "old", before, before, difficulties=False)
    other = write_difficulty_run(tmp_path / "other", {"easy": (4, 12)}, {"easy": (4, 12)})
    for argv, message in (
        (["--by-difficulty", str(old)], "predictions without a difficulty"),
        (["--by-difficulty", "--arm", f"a={seeds[0]},{other}"], "scored other problems than"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv


def test_difficulties_go_easy_medium_hard_then_others_by_name(tmp_path):
    correct = {"odd": (1, 2), "hard": (0, 2), "medium": (1, 2), "easy": (2, 2)}
    run = write_difficulty_run(tmp_path / "r", correct, correct)
    summary = difficulty_summary([run])
    assert list(summary) == ["easy", "medium", "hard", "odd"]
    assert [summary[d]["before"][0] for d in summary] == [1.0, 0.5, 0.0, 0.5]


def test_arm_and_difficulty_names_are_one_cell_each(tmp_path):
    """A difficulty (from the problems' meta.difficulty) or an arm's name holding escapes, ``|`` or a newline went
    into the table as it was: cells and rows that no run made, and the terminal cleared. Each is one cell now."""
    hostile = "easy\x1b[2J | x |\n| fake"
    run = write_difficulty_run(tmp_path / "r|1", {hostile: (1, 2)}, {hostile: (2, 2)})
    for arms, arm in (({"a|b": [run]}, "a\\|b"), ([run], "r\\|1")):
        table = difficulty_table(arms)
        lines = table.splitlines()
        assert len(lines) == 3 and "\x1b" not in table
        assert lines[2].startswith(f"| {arm} | 1 | easy\\x1b[2J \\| x \\|\\n\\| fake | 2 | 50.0% [")
        assert [len(re.findall(r"(?<!\\)\|", line)) for line in lines] == [8] * 3
    plain = write_run(tmp_path / "p", 0.2, 0.3, 10.0, 9.0)
    assert comparison_table({"a|b\n": [plain]}).splitlines()[2].startswith("| a\\|b\\n | 1 | 20.0% [")


@pytest.mark.parametrize("difficulty", [["easy"], 3])
def test_a_difficulty_that_is_no_string_is_named_not_a_traceback(tmp_path, capsys, difficulty):
    """A list difficulty raised TypeError 'unhashable type', an int among strings "'<' not supported"."""
    run = write_difficulty_run(tmp_path / "r", {"easy": (1, 2)}, {"easy": (1, 2)})
    path = run / "eval" / "base.predictions.jsonl"
    row = {"id": "x", "task": "reasoning", "prediction": "7", "gold": 7, "correct": True, "difficulty": difficulty}
    path.write_text(path.read_text() + json.dumps(row) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["--by-difficulty", str(run)])
    error = capsys.readouterr().err.splitlines()[-1]
    kind = type(difficulty).__name__
    assert e.value.code == 2 and f"{path} has a prediction whose difficulty is of type {kind}: a difficulty" in error


def test_a_reader_gone_from_stdout_ends_the_command_quietly_with_141(runs):
    """``compare ... | head -1`` printed its usage and 'error: [Errno 32] Broken pipe' and exited 2."""
    _, grpo = runs
    read, write = os.pipe()
    os.close(read)  # the reader has gone
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as a shell runs it
    env["PYTHONPATH"] = str(Path(__file__).parents[2])
    cmd = [sys.executable, "-m", "kimivl.rl.compare", str(grpo)]
    done = subprocess.run(cmd, stdout=write, stderr=subprocess.PIPE, env=env, text=True, timeout=60)
    os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


@pytest.mark.parametrize(
    "name, text, holds",
    [
        ("base", "[0.2]\n", "is damaged: it holds [0.2], not an object of one number per task"),
        ("rl", '{"reasoning": "0.2"}\n', 'is damaged: it holds {"reasoning": "0.2"}, not an object of one number'),
        ("base.lengths", '{"reasoning": true}\n', 'is damaged: it holds {"reasoning": true}, not an object'),
        ("rl.lengths", '{"reasoning": 4', "is damaged (Expecting ',' delimiter: line 1 column 16 (char 15))"),
        ("rl.lengths", '{"reasoning": NaN}', 'is damaged: it holds {"reasoning": NaN}, not an object'),
        ("base", b'{"reasoning": "\xff"}', "is damaged ('utf-8' codec can't decode byte 0xff in position 15"),
    ],
)
def test_a_damaged_eval_file_is_named_not_a_traceback(tmp_path, capsys, name, text, holds):
    """``base.json`` holding ``[0.2]`` (or a task's accuracy as the string "0.2") raised TypeError with a traceback
    and exit 1; a file that is not JSON was refused without its name."""
    run = write_run(tmp_path / "r", 0.2, 0.25, 50.0, 40.0)
    (run / "eval" / f"{name}.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SystemExit) as e:
        main([str(run)])
    error = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and f"error: {run / 'eval' / name}.json {holds}" in error, error


@pytest.mark.parametrize(
    "line, why",
    [
        ('{"id": "0", "task": "reas', "invalid JSON (Unterminated string starting at column 21)"),
        ("[1, 2]", "a record must be a JSON object, got list"),
        ('{"task": 3}', "not an object with a task"),
    ],
)
def test_a_damaged_predictions_line_is_named_with_its_file_and_line(tmp_path, capsys, line, why):
    """A truncated ``base.predictions.jsonl`` (a single seed's interval counts its problems) printed the JSON error
    alone, naming no file; a line that is no object raised TypeError."""
    run = write_run(tmp_path / "r", 0.2, 0.25, 50.0, 40.0, problems=2, other=0)
    path = run / "eval" / "base.predictions.jsonl"
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(SystemExit) as e:
        main([str(run)])
    error = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and error.endswith(f"error: {path}:3 is damaged ({why}): evaluate the run again"), error
    assert error.count(str(path)) == 1, error


def test_predictions_holding_a_line_separator_or_a_bom_are_read_as_eval_writes_them(tmp_path):
    """A prediction holding U+2028 (JSON writes it raw) split its line under str.splitlines: the row was called
    damaged. Lines split at newlines only, as eval reads them, and a BOM before the first is passed over."""
    path = tmp_path / "base.predictions.jsonl"
    rows = [{"task": "ocr", "prediction": "a\u2028b"}, {"task": "reasoning", "prediction": "7"}]
    path.write_bytes(("\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)).encode())
    assert _rows(path) == rows
