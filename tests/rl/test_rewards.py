import pytest

from kimivl.eval.answers import parse_option
from kimivl.rl.rewards import REWARDS, answer_of, correctness, numbers, option, point_in_box, register, string
from kimivl.rl.trainer import problem_error

THINK = "◁think▷ 3 + 4 = 7 ◁/think▷"


def test_answer_needs_a_closed_reasoning():
    assert answer_of(f"{THINK} 7") == "7"
    assert answer_of("◁think▷ 3 + 4 = 7, so 7") is None  # never closes: no answer
    assert answer_of("7") is None  # no thinking format at all
    assert answer_of("◁think▷a◁/think▷b◁/think▷ 9 ") == "b◁/think▷ 9"  # the first close counts, as eval scores it
    meta = {"task": "reasoning", "gold": 7}
    assert correctness("◁think▷ the answer is 7", meta) == 0.0
    assert correctness("7", meta) == 0.0
    assert correctness(f"{THINK}7", meta) == 1.0
    assert correctness(f"{THINK}", meta) == 0.0  # closed, but the answer is empty


@pytest.mark.parametrize(
    "answer, gold, expected",
    [
        ("7", 7, 1.0),
        ("7.0", 7, 1.0),
        ("7.00001", 7, 1.0),
        ("7.1", 7, 0.0),
        ("-3", -3, 1.0),
        ("1,234", 1234, 1.0),
        ("1,234,567", 1234567, 1.0),
        ("3 + 4 = 7", 7, 1.0),  # several numbers: the last one is the answer
        ("7, or maybe 8", 7, 0.0),
        ("12 cm", 12, 1.0),
        ("12cm²", 12, 1.0),
        ("12 cm^2", 12, 1.0),
        ("12 cm ^ 2", 12, 1.0),
        ("4 unit^2", 4, 1.0),
        ("12 m2", 12, 1.0),
        ("12 sq units", 12, 1.0),
        ("The area is 12 square cm.", 12, 1.0),
        ("2.5", 2.5, 1.0),
        ("-1000.05", -1000, 1.0),  # within rel_tol 1e-4 of |gold|, a negative gold's too
        ("1000.5", 1000, 0.0),
        ("0.000001", 0, 1.0),  # within abs_tol 1e-6 of 0, the bound included
        ("0.00001", 0, 0.0),
        ("no idea", 7, 0.0),
    ],
)
def test_numeric(answer, gold, expected):
    assert correctness(f"{THINK}{answer}", {"task": "reasoning", "gold": gold}) == expected


@pytest.mark.parametrize("gold", [float("inf"), "inf", "-1e999", float("nan"), "nan", 10**400])
def test_a_gold_that_is_no_finite_number_is_refused_before_training(gold):
    """An infinite gold rewarded every answer holding a number (|x - inf| <= 1e-4 * inf), a NaN one none, and an int
    of 400 digits raised OverflowError out of the record check: each is now a problem the check names."""
    meta = {"task": "reasoning", "gold": gold}
    record = {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "meta": meta}
    assert "is not a finite number" in problem_error(record)
    with pytest.raises(ValueError, match="is not a finite number"):
        correctness(f"{THINK}-7", meta)
    assert problem_error({**record, "meta": {**meta, "gold": "1e300"}}) is None


def test_numbers_strip_units_not_digits():
    assert numbers("area 12 cm² and 3 m^3, total 15") == [12.0, 3.0, 15.0]
    assert numbers("3cm4cm") == [3.0, 4.0]  # a unit between numbers keeps them apart
    assert numbers("1,234 and 1,5") == [1234.0, 1.0, 5.0]  # thousands take three digits
    assert numbers("a 5m20s run") == [5.0, 20.0]  # no exponent: "2" starts "20"
    assert numbers("Item3 costs 7") == [3.0, 7.0]  # a word ending in "m" is no unit


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", 1.0),
        ("(B)", 1.0),
        ("B. blue", 1.0),
        ("B) blue", 1.0),
        ("B because it is blue", 1.0),
        ("(B", 1.0),  # cut short
        ("  B  ", 1.0),
        ("The answer is B", 1.0),
        ("the answer is (b)", 1.0),
        ("THE ANSWER IS B", 1.0),  # the cue in any case
        ("The answer is: B", 1.0),
        ("the answer is (based on the figure) C", 0.0),  # a bracketed word is no lower-case letter
        ("A", 0.0),
        ("(A) or (B)", 0.0),
        ("Blue", 0.0),
        ("", 0.0),
        ("A triangle has three sides, so the answer is B", 1.0),  # a leading "A" or "I" word was read as the letter
        ("I think the answer is (B)", 1.0),
        ("I think (B)", 1.0),
        ("(A) is a trap; the answer is B", 1.0),  # the letter said outranks a parenthesised one before it
        ("(B) is tempting, but the answer is A", 0.0),
        ("B。", 1.0),  # Chinese and full-width punctuation after the letter, full-width letters
        ("B，因为", 1.0),
        ("（Ｂ）", 1.0),
        ("Ｂ：上海", 1.0),
        ("A。", 0.0),
        ("因为点A在圆上，所以答案是B", 1.0),  # Chinese, Japanese and Korean answer cues: the letter said
        ("答案是B因为", 1.0),
        ("故选B", 1.0),
        ("AさんよりBさん。答えはB", 1.0),
        ("정답은 B", 1.0),
        ("答案是A", 0.0),
        ("the answer is Bob", 0.0),
        ("B、因为", 1.0),
        ("the answer is B3", 0.0),  # a letter before a digit is no option
        ("A不对，答案应该是B", 1.0),
        ("A不對，答案為B", 1.0),
        ("A不对，答案为B", 1.0),
        ("A不對，答案應該是B", 1.0),
        ("A不对，应选B", 1.0),
        ("A不對，故選B", 1.0),  # traditional 選 was no cue
        ("A不對，應選B", 1.0),
        ("Aではなく、正解はB", 1.0),
        ("A는 틀렸고 정답은 B", 1.0),
        ("The answer is a right triangle (B)", 1.0),  # the article "a" was read as the letter A
        ("the answer is b", 0.0),  # a lower-case letter counts bracketed only, as in eval's parse_option
        ("I pick (b)", 1.0),  # bracketed, with no cue, too (eval reads B; RL read nothing)
        ("(a) is wrong, so (b)", 0.0),  # the first bracketed letter, as for capitals
    ],
)
def test_option(answer, expected):
    assert option(answer, {"gold": "B"}) == expected


def test_option_gold_in_any_case_and_spacing():
    assert option("(B)", {"gold": " b "}) == 1.0


def test_string_match():
    meta = {"task": "ocr", "gold": "Hello, World"}
    assert string("hello world", meta) == 1.0
    assert string("  HELLO   world! ", meta) == 1.0
    assert string("hello world again", meta) == 0.0  # no credit for a superset
    assert string("hello", meta) == 0.0  # nor for a part
    assert string("", {"gold": ""}) == 0.0
    assert string("red circle", {"gold": ["red", "circle"]}) == 1.0
    assert string("को", {"gold": "कि"}) == 0.0  # vowel signs count: "ko" is not "ki"
    assert string("cafe\u0301", {"gold": "caf\u00e9"}) == 1.0  # NFD and NFC spellings agree


def test_point_in_box():
    meta = {"task": "gui", "box": [0.2, 0.3, 0.4, 0.5], "gold": [0.3, 0.4]}
    assert point_in_box("(0.30, 0.40)", meta) == 1.0
    assert point_in_box("[0.25, 0.35, 0.35, 0.45]", meta) == 1.0  # a box scores by its centre
    assert point_in_box("(0.5, 0.4)", meta) == 0.0
    assert point_in_box("0.3", meta) == 0.0
    edges = {"box": [0.2, 0.4, 0.6, 0.8]}  # the box's edges are inside, as the ScreenSpot scorer counts them
    for point in ("(0.2, 0.5)", "(0.6, 0.5)", "(0.3, 0.4)", "(0.3, 0.8)", "(0.6, 0.8)"):
        assert point_in_box(point, edges) == 1.0, point
    assert point_in_box("(0.61, 0.5)", edges) == 0.0
    assert correctness("◁think▷ the button ◁/think▷(0.3, 0.4)", meta) == 1.0


def test_registry_and_default():
    assert REWARDS["reasoning"].__name__ == "numeric"
    # tasks without a checker use held-out scoring: captions here, an integer gold read as the first integer
    assert correctness(f"{THINK} 3 circles", {"task": "caption", "gold": 3}) == 1.0
    assert correctness(f"{THINK} Red", {"task": "caption", "gold": "red"}) == 1.0
    assert correctness(f"{THINK} 2024 sales", {"task": "ocr", "gold": 2024}) == 0.0  # OCR reads the whole text
    register("toy-task", lambda answer, meta: float(answer == "yes"))
    register("toy-task", lambda answer, meta: float(answer == "no"))  # replaces
    try:
        assert correctness(f"{THINK}no", {"task": "toy-task"}) == 1.0
    finally:
        del REWARDS["toy-task"]


@pytest.mark.parametrize(
    "answer, gold",
    [
        ("the answer is A right triangle", "A"),  # "A" as a word after the cue was read as the letter (eval: none)
        ("The answer is A right triangle (B)", "B"),
        ("The answer is I guess (B)", "B"),
        ("A right triangle", "A"),  # and a leading one, with no cue
        ("I see it now", "I"),
        ("A  right triangle", "A"),  # more than one space before the word
        ("a) red, b) blue", "A"),  # a letter closed but not opened is no option
        ("the answer is b) blue", "B"),
        ("the answer is BC", "B"),
        ("C. no, (B)", "B"),  # a bracketed letter outranks a leading one
        ("the answer is A", "A"),  # a letter standing alone is still the letter
        ("the answer is A.", "A"),
        ("the answer is (A)", "A"),
        ("(A) right triangle", "A"),
        ("the answer is A Right triangle", "A"),
        ("I pick (b)", "B"),
        ("A", "A"),
    ],
)
def test_option_reads_a_or_i_as_a_word_as_eval_does(answer, gold):
    options = {k: f"shape number {n}" for n, k in enumerate("ABCDEFGHI")}
    assert option(answer, {"gold": gold}) == float(parse_option(answer, options) == gold)
