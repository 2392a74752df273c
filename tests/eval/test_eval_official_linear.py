"""The official scorers' rewrites of three regexes that took quadratic time give the official results, in linear time.

Each rewrite is checked against the official expression, kept here as the reference, on generated strings made of
the pieces the expression cares about; and on an answer that took the official expression minutes, run in a fresh
interpreter that is stopped if it runs past ``SECONDS`` (a regression fails instead of hanging the suite).
"""

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kimivl.eval import mathvista, mmlongbench, mmmu

SECONDS = 30.0  # each rewrite needs under 0.1 s on these answers; the official expressions take minutes

MMMU_NUMBERS = (  # MMMU's extract_numbers
    r"-?\b\d{1,3}(?:,\d{3})+\b",
    r"-?\d+(?:\.\d+)?[eE][+-]?\d+",
    r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])",
)
MMLONGBENCH_BRACKETS = r"\s*\([^)]*\)"  # MMLongBench-Doc's eval_score: clean_string
MATHVISTA_QUOTED = r'The answer is "(.*)"\.'  # MathVista's extract_answer


def strings(*pieces: str, count: int = 20000):
    """``count`` seeded random strings of up to 24 ``pieces`` (plain random: it finds a wrong rewrite, e.g. the guard
    put before ``-?``, within a few hundred strings, where hypothesis's first 500 examples missed it)."""
    rng = random.Random(0)
    return ["".join(rng.choices(pieces, k=rng.randint(0, 24))) for _ in range(count)]


def test_mmmu_numbers_are_the_official_ones():
    for text in strings("0", "1", "9", "123", "1,234", "٣", ".", "-", "e", "E", "+", ",", " ", "x", "_", "\n"):
        assert mmmu._official_numbers(text) == [n for p in MMMU_NUMBERS for n in re.findall(p, text)], text


def test_mmlongbench_brackets_drop_as_officially():
    for text in strings(" ", "  ", "\t", "\n", "\u3000", "(", ")", "((", "))", "a", "1", "-"):
        assert mmlongbench._drop_brackets(text) == re.sub(MMLONGBENCH_BRACKETS, "", text), text


def test_mathvista_quoted_answer_is_the_official_one():
    cues = ('The answer is "', "The answer is ", "The ", '"', ".", '".', '"".', "\n", "\r", "\u2028", "x", " ")
    for text in strings(*cues):
        official = re.search(MATHVISTA_QUOTED, text)
        assert mathvista._quoted_answer(text) == (official.group(1) if official else None), text


def finishes(work: str) -> str:
    """The output of ``work`` (Python, after the imports of kimivl's scorers) in a fresh interpreter; the test fails
    if ``work`` runs past ``SECONDS`` (the imports are not timed)."""
    script = "from kimivl.eval import mathvista, mmlongbench, mmmu\nprint('imported', flush=True)\n" + work
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    # Unbuffered, so that reading the first line takes nothing of the output that communicate() then reads.
    pipe = subprocess.PIPE
    with subprocess.Popen([sys.executable, "-c", script], stdout=pipe, stderr=pipe, env=env, bufsize=0) as run:
        assert run.stdout.readline() == b"imported\n", run.stderr.read().decode()
        try:
            out, err = run.communicate(timeout=SECONDS)
        except subprocess.TimeoutExpired:
            run.kill()
            pytest.fail(f"still scoring after {SECONDS} s (quadratic time?):\n{work}")
    assert run.returncode == 0, err.decode()
    return out.decode()


def test_mmmu_scores_a_long_run_of_digits_in_linear_time():
    # The official expressions: 7 s for 8000 digits (a shared 2-core machine), some 7 minutes for these 64000.
    work = "print(mmmu.score('1' * 64000 + 'x', {'type': 'open', 'answer': ['42']})['score'])"
    assert finishes(work) == "0.0\n"


def test_mmlongbench_cleans_long_runs_of_spaces_and_brackets_in_linear_time():
    # The official expression: 5 s (spaces) and 2 s ("(") for 32000, some 5 and 2 minutes for these 256000.
    work = (
        "for answer in ('1.5' + ' ' * 256000 + '%(about)', '(' * 256000):\n"
        "    print(mmlongbench.official_score('1.5', answer, 'Float'))"
    )
    assert finishes(work) == "1.0\n0.0\n"


def test_mathvista_reads_a_quoted_answer_after_a_long_line_of_cues_in_linear_time():
    # The official expression: 3 s for a line of 60000 characters, some 4 minutes for this one of 525000.
    meta = {"question_type": "free_form", "answer_type": "integer", "precision": None, "choices": None}
    work = f"print(mathvista.official_extraction('The answer is \"' * 35000 + '\\nThe answer is \"7\".', {meta!r}))"
    assert finishes(work) == "7\n"
