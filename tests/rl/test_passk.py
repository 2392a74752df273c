import itertools
import json
import os
import random
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

import kimivl.rl.rollouts
from kimivl.data.formats import write_records
from kimivl.inference.sampling import SamplingParams
from kimivl.rl.passk import count_correct, format_table, main, model_generator, pass_at_k, summarise


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_the_estimator_matches_brute_force_enumeration(n):
    for c in range(n + 1):
        samples = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            exact = Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))
            assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)
    assert pass_at_k(8, 1, 1) == 0.125 and pass_at_k(8, 1, 8) == 1.0 and pass_at_k(8, 0, 8) == 0.0
    for c, k in ((1, 5), (1, 0), (5, 1), (-1, 1)):
        with pytest.raises(ValueError, match="pass@k needs 0 <= c <= n and 1 <= k <= n"):
            pass_at_k(4, c, k)


def toy_policy(records, samples, seed):
    """Right (the gold after the reasoning) with probability meta['p'], else off by one."""
    rng = random.Random(seed)
    answers = [r["meta"]["gold"] + (rng.random() >= r["meta"]["p"]) for r in records for _ in range(samples)]
    return [f"◁think▷...◁/think▷{a}" for a in answers]


def test_pass_at_k_of_a_toy_policy_follows_its_formula():
    chances = {"zero": 0.0, "rare": 0.1, "even": 0.5, "sure": 1.0}
    problems = [
        {"meta": {"task": "reasoning", "gold": i, "p": p, "difficulty": name}}
        for name, p in chances.items()
        for i in range(1000)
    ]
    n, ks = 8, [1, 2, 4, 8]
    counts = count_correct(toy_policy, problems, n, chunk=50, seed=3)
    table = summarise([p["meta"]["difficulty"] for p in problems], counts, n, ks)
    assert list(table) == ["even", "rare", "sure", "zero", "all"]
    for name, p in chances.items():
        assert table[name]["problems"] == 1000
        for k in ks:  # a problem solved with chance p per sample: pass@k = 1 - (1 - p)^k
            assert table[name][f"pass@{k}"] == pytest.approx(1 - (1 - p) ** k, abs=0.02), (name, k)
    assert table["zero"]["never"] == 1 and table["sure"]["always"] == 1
    assert table["zero"]["pass@8"] == 0 and table["sure"]["pass@1"] == 1
    assert table["even"]["never"] == pytest.approx(0.5**8, abs=0.01) and table["rare"]["never"] == pytest.approx(
        0.9**8, abs=0.03
    )
    assert table["all"]["pass@1"] == pytest.approx(sum(counts) / (n * len(problems)))
    assert table["all"]["pass@4"] == pytest.approx(sum(table[d]["pass@4"] for d in chances) / 4)


def test_count_correct_seeds_each_chunk(capsys):
    """By default 8 problems a chunk from seed 0, and no progress bar."""
    seen = []

    def generate(records, samples, seed):
        seen.append((len(records), seed))
        return ["◁think▷◁/think▷1"] * (len(records) * samples)

    problems = [{"meta": {"task": "reasoning", "gold": i % 2}} for i in range(5)]
    assert count_correct(generate, problems, 3, chunk=2, seed=10) == [0, 3, 0, 3, 0]
    assert seen == [(2, 10), (2, 11), (1, 12)]
    seen.clear()
    assert count_correct(generate, problems * 2, 1) == [0, 1, 0, 1, 0] * 2
    assert seen == [(8, 0), (2, 1)] and capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="gave 1 answers for 2 problems x 3 samples"):
        count_correct(lambda r, s, seed: ["x"], problems, 3, chunk=2)


def test_count_correct_checks_every_gold_before_it_samples():
    """A gold the default reward cannot read stopped count_correct only when its chunk was scored, after every
    answer before it was sampled; a custom reward reads what it likes."""
    calls = []

    def generate(records, samples, seed):
        calls.append(seed)
        return ["◁think▷◁/think▷1"] * (len(records) * samples)

    problems = [{"meta": {"task": "reasoning", "gold": 1}}] * 3 + [{"meta": {"task": "reasoning", "gold": "seven"}}]
    with pytest.raises(ValueError, match=r"problem 4 has a meta.gold the reasoning reward cannot check \(ValueError"):
        count_correct(generate, problems, 2, chunk=1)
    assert calls == []
    assert count_correct(generate, problems, 2, reward_fn=lambda t, meta: 1.0, chunk=1) == [2, 2, 2, 2]


def test_the_command_on_a_checkpoint(checkpoint, small_model, small_processor, tmp_path, capsys):
    problems = [
        {
            "messages": [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": "x"}],
            "meta": {"task": "reasoning", "gold": 2 * i, "difficulty": ["easy", "hard"][i % 2]},
        }
        for i in range(4)
    ]
    write_records(tmp_path / "p.jsonl", problems)
    out = tmp_path / "passk.json"
    argv = ["--model", str(checkpoint), "--data", str(tmp_path / "p.jsonl"), "--samples", "3", "--k", "1,3"]
    argv += ["--limit", "3", "--max-new-tokens", "4", "--out", str(out), "--device", "cpu", "--batch", "4"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["samples"] == 3 and len(result["correct"]) == 3
    assert {k: v["problems"] for k, v in result["table"].items()} == {"easy": 2, "hard": 1, "all": 3}
    assert result["table"]["all"]["pass@1"] == pytest.approx(sum(result["correct"]) / 9)
    printed = capsys.readouterr().out
    assert "| difficulty | problems | pass@1 | pass@3 | never solved | always solved |" in printed
    # the same answers as the generator gives on its own: 4 rows per batch -> one problem (3 samples) per chunk
    params = SamplingParams(4, 0.8, seed=0)
    generate = model_generator(small_model, small_processor, params, ["<|im_end|>", "[EOS]"], 4)
    texts = generate(problems[:1], 3, 0)
    assert len(texts) == 3 and texts == generate(problems[:1], 3, 0)
    for bad, match in ((["--k", "1,5"], "--k values must lie in 1..--samples"), (["--k", "a"], "comma-separated")):
        with pytest.raises(SystemExit) as e:
            main(argv + bad)
        assert e.value.code == 2 and match in capsys.readouterr().err


def test_a_difficulty_is_printed_as_one_cell_and_none_takes_the_total_rows_name():
    """A difficulty's escapes (clearing the screen), ``|`` and newline went into the table as they were: cells and
    rows that no problem made. Each is one cell now, written as its escapes; and 'all' would be the total row."""
    name = "easy\x1b[2J | fake | 100.0% |\n| hard"
    table = summarise([name, "hard"], [1, 0], n=1, ks=[1])
    lines = format_table(table, [1]).splitlines()
    assert len(lines) == 5 and "\x1b" not in "".join(lines)
    assert lines[3] == "| easy\\x1b[2J \\| fake \\| 100.0% \\|\\n\\| hard | 1 | 100.0% | 0.0% | 100.0% |"
    assert [len(re.findall(r"(?<!\\)\|", line)) for line in lines] == [6] * 5
    with pytest.raises(ValueError, match="a difficulty is named 'all', as the table's row over every problem is"):
        summarise(["all", "easy"], [1, 0], n=1, ks=[1])


def test_summarise_needs_one_count_per_problem():
    for difficulties, counts in ((["easy", "hard"], [1]), ([], [])):
        with pytest.raises(
            ValueError, match=f"one count per problem and at least one problem, got {len(counts)} counts"
        ):
            summarise(difficulties, counts, n=1, ks=[1])


def test_difficulties_go_easy_medium_hard_as_elsewhere():
    """They were sorted by name (easy, hard, medium), unlike docs/rl.md and the comparison tables."""
    table = summarise(["hard", "odd", "easy", "medium", "hard"], [1, 2, 3, 4, 0], n=4, ks=[1])
    assert list(table) == ["easy", "medium", "hard", "odd", "all"]


def test_a_reward_of_one_half_counts_as_correct():
    """The module's rule is reward >= 0.5: a partial-credit reward of exactly 0.5 is a correct answer."""
    rewards = {"a": 0.0, "b": 0.49, "c": 0.5, "d": 1.0}
    problems = [{"meta": {"gold": 0}}, {"meta": {"gold": 1}}]
    texts = ["a", "c", "d", "b", "b", "c"]  # problem 0: 0, 0.5, 1; problem 1: 0.49, 0.49, 0.5
    counts = count_correct(lambda r, s, seed: texts, problems, 3, reward_fn=lambda t, meta: rewards[t])
    assert counts == [2, 1]


@pytest.mark.parametrize(
    "extra, why",
    [
        (["--k", "0"], "--k takes integers >= 1"),
        (["--k", "0,4"], "--k takes integers >= 1"),
        (["--k", ","], "--k takes integers >= 1, got ','"),
        (["--samples", "0"], "--samples must be >= 1, got 0"),
        (["--limit", "0"], "--limit must be >= 1, got 0"),
        (["--batch", "0"], "--batch must be >= 1, got 0"),
    ],
)
def test_bad_settings_are_refused_before_any_model_is_loaded(extra, why, capsys):
    argv = ["--model", "no/such/dir", "--data", "no/such.jsonl", "--samples", "4", *extra]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and why in capsys.readouterr().err


def test_data_without_problems_is_refused_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text("\n")
    with pytest.raises(SystemExit) as e:
        main(["--model", "no/such/dir", "--data", str(tmp_path / "p.jsonl"), "--samples", "1"])
    assert e.value.code == 2 and capsys.readouterr().err.endswith(f"error: {tmp_path / 'p.jsonl'} holds no problems\n")


def test_each_generation_batch_holds_as_many_problems_as_batch_rows_allow(checkpoint, tmp_path, monkeypatch, capsys):
    """--batch 4 with --samples 2: two problems (4 rows) per rollout, the last chunk what is left; --batch 1: one."""
    real, sizes = kimivl.rl.rollouts.rollout, []

    def recording(model, processor, prompts, *args, **kwargs):
        sizes.append(len(prompts))
        return real(model, processor, prompts, *args, **kwargs)

    monkeypatch.setattr(kimivl.rl.rollouts, "rollout", recording)
    argv = ["--model", str(checkpoint), "--samples", "2", "--batch", "4", "--out", str(tmp_path / "pk.json")]
    assert main([*argv, *_problems(tmp_path, n=5)]) == 0
    assert sizes == [2, 2, 1] and "pass@k: 100%" in capsys.readouterr().err  # the command shows its progress
    sizes.clear()  # fewer rows than samples: still one problem a rollout
    argv[4:6] = ["--batch", "1"]
    assert main([*argv, *_problems(tmp_path, n=2)]) == 0
    assert sizes == [1, 1]


@pytest.mark.parametrize(
    "meta, why",
    [
        ({"task": "reasoning"}, "is no RL problem: it needs a user prompt and meta.gold"),
        (
            {"task": "reasoning", "gold": "seven"},
            r"has a meta.gold the reasoning reward cannot check \(ValueError: could not convert",
        ),
        ({"task": "gui", "gold": "OK"}, r"is a gui problem whose meta.box is 'missing'"),
        (
            {"task": "reasoning", "gold": 4, "difficulty": ["a"]},
            'has a meta.difficulty of type list: .* string such as "easy"',
        ),
        (
            {"task": "reasoning", "gold": 4, "difficulty": 3},
            "has a meta.difficulty of type int: a difficulty is a label",
        ),
        (
            {"task": "reasoning", "gold": 4, "difficulty": "all"},
            "has meta.difficulty 'all', the name of the table's row",
        ),
    ],
)
def test_a_problem_its_reward_cannot_check_is_refused_before_the_model_loads(tmp_path, capsys, meta, why):
    """A gold the reward cannot read failed after all the sampling, naming no record (or a KeyError escaped), as
    did a difficulty that is a list ('unhashable type') or an int among strings ('<' not supported), while one named
    'all' was silently replaced by the total row; passk now checks each problem as the rl stage does, naming the
    file and line."""
    argv = ["--model", "no/such/dir", "--samples", "2", "--out", str(tmp_path / "pk.json"), *_problems(tmp_path)]
    with (tmp_path / "p.jsonl").open("a") as f:
        f.write("\n" + json.dumps({"messages": [{"role": "user", "content": "?"}], "meta": meta}) + "\n")
    with pytest.raises(SystemExit) as e:
        main(argv)
    error = capsys.readouterr().err
    assert e.value.code == 2 and re.search(rf"p.jsonl:4 \(problem 3\) {why}", error), error
    assert "no/such/dir" not in error


def _problems(tmp_path, n=2):
    problems = [
        {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}], "meta": {"task": "reasoning", "gold": 2 * i}}
        for i in range(n)
    ]
    write_records(tmp_path / "p.jsonl", problems)
    return ["--data", str(tmp_path / "p.jsonl"), "--max-new-tokens", "2", "--device", "cpu"]


def test_out_in_a_new_directory_is_created_and_default_k_is_capped_at_samples(checkpoint, tmp_path, capsys):
    """--out nodir/pk.json raised FileNotFoundError after all the sampling, the table unprinted; --samples 2 without
    --k was refused for the default k=8 that the user never gave."""
    out = tmp_path / "nodir" / "deeper" / "pk.json"
    assert main(["--model", str(checkpoint), "--samples", "2", "--out", str(out), *_problems(tmp_path)]) == 0
    assert list(json.loads(out.read_text())["table"]["all"]) == ["problems", "pass@1", "pass@2", "never", "always"]
    assert "| pass@1 | pass@2 |" in capsys.readouterr().out


def test_an_out_that_is_a_link_to_a_file_writes_the_file(checkpoint, tmp_path):
    """As a shell's ``>`` does: the link stays, its target gets the table."""
    target, link = tmp_path / "results" / "pk.json", tmp_path / "latest.json"
    target.parent.mkdir()
    target.write_text("old")
    link.symlink_to(target)
    assert main(["--model", str(checkpoint), "--samples", "1", "--out", str(link), *_problems(tmp_path)]) == 0
    assert link.is_symlink() and json.loads(target.read_text())["settings"]["samples"] == 1


def test_an_out_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    argv = ["--model", "no/such/dir", "--samples", "2", *_problems(tmp_path)]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "d")])
    assert e.value.code == 2 and f"--out {tmp_path / 'd'} is a directory" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "file" / "pk.json")])
    error = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and error.endswith(f"{tmp_path / 'file'} is not a directory; choose another --out")


def test_a_run_that_fails_after_the_checks_leaves_no_out_directory(tmp_path, capsys):
    """The --out directory was made before sampling and left empty when a later step (here the model) failed."""
    out = tmp_path / "new" / "pk.json"
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "no-model"), "--samples", "1", "--out", str(out), *_problems(tmp_path)])
    assert e.value.code == 2 and "no-model" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_failed_write_prints_the_table_first_and_one_error_line(checkpoint, tmp_path, capsys, monkeypatch):
    def fail(path, text, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("kimivl.rl.passk.write_text_atomic", fail)
    argv = ["--model", str(checkpoint), "--samples", "1", "--out", str(tmp_path / "pk.json"), *_problems(tmp_path)]
    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    assert e.value.code == 2 and "| difficulty | problems | pass@1 |" in captured.out
    assert captured.err.strip().splitlines()[-1].endswith("error: [Errno 28] No space left on device")


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, capsys, monkeypatch):
    def interrupt(path, text):
        raise KeyboardInterrupt

    monkeypatch.setattr("kimivl.data.formats.iter_lines", interrupt)
    argv = ["--model", "m", "--samples", "1", "--out", str(tmp_path / "pk.json"), *_problems(tmp_path)]
    assert main(argv) == 130
    assert capsys.readouterr().err == "\npython -m kimivl.rl.passk: interrupted\n"


def test_a_reader_gone_from_stdout_exits_141_quietly_with_out_written(checkpoint, tmp_path):
    """``passk ... | head -1``: printing the table (before --out was written) raised BrokenPipeError, a traceback
    after all the sampling, and --out was never written. --out is written first now, and the command ends quietly
    with 141, as ``kimivl`` does."""
    out = tmp_path / "pk.json"
    argv = ["--model", str(checkpoint), "--samples", "1", "--out", str(out), *_problems(tmp_path)]
    read, write = os.pipe()
    os.close(read)  # the reader has gone
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as a shell runs it
    env["PYTHONPATH"] = str(Path(__file__).parents[2])
    cmd = [sys.executable, "-m", "kimivl.rl.passk", *argv]
    done = subprocess.run(cmd, stdout=write, stderr=subprocess.PIPE, env=env, text=True, timeout=300)
    os.close(write)
    assert done.returncode == 141 and "Error" not in done.stderr, done.stderr[-2000:]
    assert json.loads(out.read_text())["correct"] in ([0, 0], [0, 1], [1, 0], [1, 1])


def test_an_out_that_is_a_link_to_stdout_gets_the_json_and_stays_a_link(checkpoint, tmp_path):
    """``--out /dev/stdout`` (a link to /proc/self/fd/1) replaced the link by a regular file (``--out /dev/null`` as
    root: the system's /dev/null), and the check before it refused /dev/stdout as its folder /dev is not writable to
    a user. A link of the test's own to /proc/self/fd/1 stands in for /dev/stdout: the JSON goes down stdout's pipe."""
    out = tmp_path / "stdout"
    out.symlink_to("/proc/self/fd/1")
    argv = ["--model", str(checkpoint), "--samples", "1", "--out", str(out), *_problems(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, "-m", "kimivl.rl.passk", *argv]
    done = subprocess.run(cmd, capture_output=True, env=env, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    written, end = json.JSONDecoder().raw_decode(done.stdout)
    assert written["correct"] in ([0, 0], [0, 1], [1, 0], [1, 1]) and written["settings"]["samples"] == 1
    assert done.stdout[end:].startswith("\n| difficulty | problems | pass@1 |") and out.is_symlink()  # own line
