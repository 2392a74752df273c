"""Each benchmark scorer's lenient rules (``--scoring lenient``) on hand-made answers, the tricky ones included;
the official rules are checked against the official code's results in test_eval_official.py."""

from functools import partial

import pytest

from kimivl.eval import (
    mathvista,
    mmlongbench,
    mmmu,
    niah,
    ocrbench,
    screenspot,
    videomme,
)
from kimivl.eval.answers import (
    after_cue,
    answer_number,
    final_answer,
    half_width,
    holds_phrase,
    normalize_text,
    numbers,
    official_text,
    parse_option,
)
from kimivl.eval.tables import RowError


def lenient(module):
    return partial(module.score, mode="lenient")


OPTIONS = {"A": "Paris", "B": "London", "C": "Berlin", "D": "New York City"}
MC = {"type": "multiple-choice", "options": OPTIONS, "answer": "C", "seed": "17", "group": "Geo"}


def test_final_answer_after_think_and_unclosed_think():
    assert final_answer("◁think▷ it is C ◁/think▷ (B)") == "(B)"
    assert final_answer("◁think▷ still thinking about (C)") is None
    assert final_answer("plain C") == "plain C"


@pytest.mark.parametrize(
    "text, letter",
    [
        ("(C)", "C"),
        ("The answer is (c).", "C"),
        ("C. Berlin", "C"),
        ("C", "C"),
        ("Answer: C", "C"),
        ("It must be Berlin.", "C"),
        ("I pick new york city", "D"),
        ("Because the capital of Germany is the answer, the correct option is C", "C"),
        ("Both options look wrong but (B) fits", "B"),
    ],
)
def test_parse_option(text, letter):
    assert parse_option(text, OPTIONS) == letter


def test_a_letter_inside_a_word_does_not_count():
    assert parse_option("Because Definitely", OPTIONS) is None
    assert parse_option("ABC", OPTIONS) is None


def test_mmmu_multiple_choice_and_seeded_fallback():
    assert lenient(mmmu)("The answer is (C).", MC)["score"] == 1.0
    assert lenient(mmmu)("◁think▷ maybe (C) ◁/think▷ B.", MC)["score"] == 0.0
    assert lenient(mmmu)("◁think▷ maybe (C)", MC) == {"score": 0.0, "extracted": None}  # unclosed: no answer
    guessed = lenient(mmmu)("I cannot tell", MC)
    assert guessed["random"] and guessed["extracted"] in OPTIONS
    assert lenient(mmmu)("I cannot tell", MC) == guessed  # seeded: the same guess every time
    assert {lenient(mmmu)("???", {**MC, "seed": str(s)})["extracted"] for s in range(40)} == set(OPTIONS)


def test_mmmu_open_numbers_and_strings():
    meta = {"type": "open", "answer": ["3.14159"], "seed": "1"}
    assert lenient(mmmu)("The value is 3.14", meta)["score"] == 1.0  # numbers compare at 2 decimals
    assert lenient(mmmu)("3.2", meta)["score"] == 0.0
    assert lenient(mmmu)("It is 1,200 metres", {"type": "open", "answer": ["1200"], "seed": "1"})["score"] == 1.0
    meta = {"type": "open", "answer": ["photosynthesis", "light reaction"], "seed": "1"}
    assert lenient(mmmu)("The process is Photosynthesis.", meta)["score"] == 1.0
    assert lenient(mmmu)("respiration", meta)["score"] == 0.0


def test_mmmu_score_rows_in_lenient_mode_scores_each_row_as_score_does():
    """What ``kimivl eval --scoring lenient`` runs for MMMU: each row as ``score`` gives it, an answer extracted
    elsewhere in place of the prediction, a guess from the row's own seed (not the official single stream, so the
    rows' order changes nothing)."""
    meta = {"type": "open", "answer": ["3.14159"], "seed": "1", "group": "Math"}
    items = [
        ("◁think▷ maybe (B) ◁/think▷ The answer is (C).", MC, None),
        ("The capital is Berlin", MC, None),  # the option's text: the official rules find no letter and guess
        ("I cannot tell", MC, None),
        ("The value is 3.14", meta, None),
        ("a long rambling answer", meta, "3.14"),
        ("The value is 3.14", meta, "3.2"),  # the extracted answer, not the prediction
    ]
    rows = mmmu.score_rows(items, mode="lenient")
    assert [r["score"] for r in rows] == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert [r["extracted"] for r in rows[:2]] == ["C", "C"] and rows[2]["random"]
    assert rows == [lenient(mmmu)(p, m, extracted=e) for p, m, e in items]
    assert mmmu.score_rows(items[::-1], mode="lenient") == rows[::-1]
    assert mmmu.score_rows(items)[1]["score"] == 0.0  # officially scored, the second row is a wrong guess


def test_numbers():
    assert numbers("x = -3, y = 1,234.5 and .5 or 2e3") == [-3.0, 1234.5, 0.5, 2000.0]
    assert numbers("v2 of 5cm") == [5.0]
    assert answer_number("First 3 apples, then 4; the answer is 7.") == 7.0
    assert answer_number("3 then 4 then 12") == 12.0


def _mv(**kw):
    return {"question_type": "free_form", "answer_type": "integer", "precision": 2, "answer": "7", **kw}


def test_mathvista_by_answer_type():
    assert lenient(mathvista)("The answer is 7.", _mv())["score"] == 1.0
    assert lenient(mathvista)("7.0", _mv())["score"] == 1.0
    assert lenient(mathvista)("8", _mv())["score"] == 0.0
    floats = _mv(answer_type="float", precision=1, answer="1.5")
    assert lenient(mathvista)("about 1.46", floats)["score"] == 1.0  # rounded to 1 decimal: 1.5
    assert lenient(mathvista)("1.44", floats)["score"] == 0.0
    two = _mv(answer_type="float", precision=2, answer="1.45")
    assert lenient(mathvista)("1.449", two)["score"] == 1.0 and lenient(mathvista)("1.5", two)["score"] == 0.0
    lists = _mv(answer_type="list", answer="[2, 3.5, 1]")
    assert lenient(mathvista)("So the list is [2, 3.5, 1].", lists)["score"] == 1.0
    assert lenient(mathvista)("[2, 1, 3.5]", lists)["score"] == 0.0
    pair = _mv(answer_type="list", answer="[3,250]")  # commas in brackets separate items: not 3250, either side
    assert lenient(mathvista)("The answer is [3,250].", pair) == {"score": 1.0, "extracted": [3.0, 250.0]}
    assert lenient(mathvista)("[3, 250]", pair)["score"] == 1.0 and lenient(mathvista)("[3250]", pair)["score"] == 0.0
    text = _mv(answer_type="text", answer="Yes")
    assert lenient(mathvista)("yes.", text)["score"] == 1.0
    mc = {
        "question_type": "multi_choice",
        "answer_type": "text",
        "precision": 2,
        "answer": "B",
        "options": {"A": "1", "B": "2", "C": "3"},
    }
    assert lenient(mathvista)("(B) 2", mc)["score"] == 1.0
    assert lenient(mathvista)("◁think▷ hmm ◁/think▷ The correct option is A", mc)["score"] == 0.0


def test_ocrbench_substring_case_and_handwritten_math():
    meta = {"answers": ["Hello World", "hello"], "hme": False}
    assert lenient(ocrbench)("The sign says: HELLO WORLD!", meta)["score"] == 1.0
    assert lenient(ocrbench)("Helo", meta)["score"] == 0.0
    hme = {"answers": ["x ^ { 2 } + 1"], "hme": True}
    assert lenient(ocrbench)("x^{2}+1", hme)["score"] == 1.0  # spaces removed on both sides
    assert lenient(ocrbench)("X^{2}+1", hme)["score"] == 0.0  # case kept for formulas
    rows = [{"score": s, "meta": {"group": "g"}} for s in (1.0, 1.0, 0.0, 1.0)]
    assert ocrbench.summarize(rows)["score"] == 750.0


def test_screenspot_points_boxes_pixels_and_conventions():
    size = (200, 100)
    box_xywh = screenspot.normalized_box([40, 20, 60, 30], "xywh", size)  # pixels [x, y, w, h]
    box_xyxy = screenspot.normalized_box([40, 20, 100, 50], "xyxy", size)  # pixels [x1, y1, x2, y2]
    assert box_xywh == box_xyxy == [0.2, 0.2, 0.5, 0.5]
    assert screenspot.normalized_box([0.2, 0.2, 0.3, 0.3], "xywh", size) == pytest.approx([0.2, 0.2, 0.5, 0.5])
    # an infinite box was scored (a click at x=123456 counted)
    for box in ([10, 10, float("inf"), 20], [0.1, float("nan"), 0.2, 0.3], [1, 2, 3, 10**400]):
        with pytest.raises(RowError, match="not finite|needs 4 numbers"):
            screenspot.normalized_box(box, "xyxy", size)
    meta = {"box": box_xyxy, "size": list(size)}
    assert lenient(screenspot)("(0.3, 0.4)", meta)["score"] == 1.0  # normalised point
    assert lenient(screenspot)("click(x=70, y=35)", meta)["score"] == 1.0  # pixels: 0.35, 0.35
    assert lenient(screenspot)("(0.3, 0.6)", meta)["score"] == 0.0
    assert lenient(screenspot)("[0.25, 0.25, 0.45, 0.45]", meta)["score"] == 1.0  # a box: its centre
    assert lenient(screenspot)("[0.0, 0.0, 0.2, 0.2]", meta)["score"] == 0.0
    assert lenient(screenspot)("(0.5, 0.5)", meta)["score"] == 1.0  # edges included
    assert lenient(screenspot)("no idea", meta) == {"score": 0.0, "extracted": None}
    assert lenient(screenspot)("◁think▷ (0.3, 0.4)", meta) == {"score": 0.0, "extracted": None}  # never closed
    assert screenspot.normalized_box([40, 20, 0, 30], "xywh", size) == [0.2, 0.2, 0.2, 0.5]  # a line is a box
    assert screenspot.normalized_box([40, 20, 60, 0], "xywh", size) == [0.2, 0.2, 0.5, 0.2]
    for box in ([40, 50, 100, 20], [100, 20, 40, 50]):  # negative height, negative width
        with pytest.raises(RowError, match="negative width or height"):
            screenspot.normalized_box(box, "xyxy", size)


@pytest.mark.parametrize(
    "text, letter",
    [
        ("The best answer is B.", "B"),
        ("(C) The man leaves", "C"),
        ("Answer: D", "D"),
        ("A", "A"),
        ("Based on the video, the answer is C", "C"),
        ("Definitely", None),
        ("The best answer is: (a)", None),
    ],
)
def test_videomme_extraction(text, letter):
    assert videomme.extract(text) == letter


def test_videomme_score():
    assert lenient(videomme)("The best answer is B", {"answer": "B"})["score"] == 1.0
    assert lenient(videomme)("◁think▷ B or C", {"answer": "B"})["score"] == 0.0
    assert lenient(videomme)("no idea", {"answer": "B"}, extracted="B")["score"] == 1.0


def test_videomme_official_lead_ins_are_the_glued_strings():
    """The official prefix list misses two commas: "Best answer:Best option:" is deleted as one string, and "Best
    answer:" alone stays, so its "B" is the first capital A-D."""
    assert videomme.official_extract("Best answer:Best option: C") == "C"
    assert videomme.official_extract("Best answer: C") == "B"


def test_videomme_reports_the_percent_of_rows_with_a_letter_as_parsed():
    meta = {"answer": "B"}
    rows = [{**videomme.score(p, meta), "meta": meta} for p in ("B", "C", "no idea at all", "")]
    metrics = videomme.summarize(rows)
    assert metrics == {"accuracy": 50.0, "accuracy_all": 25.0, "parsed": 50.0}  # "answered" is the results' count
    long = {"answer": "B", "group": "long"}
    unparsed = videomme.summarize([{**videomme.score("no idea", long), "meta": long}])
    assert unparsed == {"accuracy": 0.0, "accuracy/long": 0.0, "accuracy_all": 0.0, "parsed": 0.0}  # no letter, no 0/0
    assert videomme.summarize(rows[:1]) == {"accuracy": 100.0, "accuracy_all": 100.0, "parsed": 100.0}
    assert videomme.summarize([]) == {"accuracy": 0.0, "accuracy_all": 0.0, "parsed": 0.0}


def _doc(fmt, answer):
    return {"format": fmt, "answer": answer}


def test_mmlongbench_typed_answers():
    assert lenient(mmlongbench)("Not answerable", _doc("None", "Not answerable"))["score"] == 1.0
    assert lenient(mmlongbench)("The answer is 12", _doc("None", "Not answerable"))["score"] == 0.0
    assert lenient(mmlongbench)("The answer is not answerable.", _doc("Int", "12"))["score"] == 0.0
    assert lenient(mmlongbench)("There are 12 figures.", _doc("Int", "12"))["score"] == 1.0
    assert lenient(mmlongbench)("13", _doc("Int", "12"))["score"] == 0.0
    assert lenient(mmlongbench)("0.253", _doc("Float", "25.3%"))["score"] == 1.0  # percent forms
    assert lenient(mmlongbench)("25.3", _doc("Float", "25.3"))["score"] == 1.0
    assert lenient(mmlongbench)("26", _doc("Float", "25.3"))["score"] == 0.0
    assert lenient(mmlongbench)("Machine learning", _doc("Str", "machine learning"))["score"] == 1.0
    partial = lenient(mmlongbench)("machine learnin", _doc("Str", "machine learning"))["score"]
    assert 0.9 < partial < 1.0  # ANLS
    assert lenient(mmlongbench)("www.example.org", _doc("Str", "www.example.com"))["score"] == 0.0  # exact
    assert lenient(mmlongbench)("['Tokyo', 'Paris']", _doc("List", "['Paris', 'Tokyo']"))["score"] == 1.0
    assert lenient(mmlongbench)("Paris and Tokyo", _doc("List", "['Paris', 'Tokyo']"))["score"] == 1.0
    assert lenient(mmlongbench)("Paris", _doc("List", "['Paris', 'Tokyo']"))["score"] == 0.0


def test_mmlongbench_accuracy_and_generalised_f1():
    cases = [
        ("12", _doc("Int", "12")),
        ("Not answerable", _doc("Int", "5")),
        ("Not answerable", _doc("None", "Not answerable")),
        ("7", _doc("None", "Not answerable")),
    ]
    rows = [{**lenient(mmlongbench)(p, m), "meta": m} for p, m in cases]
    metrics = mmlongbench.summarize(rows, mode="lenient")
    assert metrics["accuracy"] == 50.0
    assert metrics["recall"] == 50.0  # 1 of the 2 answerable questions
    assert metrics["precision"] == 50.0  # 1 right of the 2 answered
    assert metrics["f1"] == pytest.approx(50.0)
    cases.append(("3", _doc("Int", "3")))  # recall 2 of 3 answerable, precision 2 of 2 answered
    rows = [{**lenient(mmlongbench)(p, m), "meta": m} for p, m in cases if p != "7"]
    metrics = mmlongbench.summarize(rows, mode="lenient")
    assert metrics["accuracy"] == 75.0 and metrics["recall"] == pytest.approx(200 / 3)
    assert metrics["precision"] == 100.0 and metrics["f1"] == pytest.approx(80.0)


def test_mmlongbench_lenient_edges():
    assert lenient(mmlongbench)("The question is unanswerable.", _doc("None", "Not answerable"))["score"] == 1.0
    assert lenient(mmlongbench)("I could not find it", _doc("Int", "12"))["score"] == 0.0  # no number
    assert lenient(mmlongbench)("12", _doc("Int", "twelve"))["score"] == 0.0  # a gold with no number
    assert lenient(mmlongbench)("3.0 and 4", _doc("List", "['3', '4']"))["score"] == 1.0  # items as numbers
    assert lenient(mmlongbench)("3 and 5", _doc("List", "['3', '4']"))["score"] == 0.0
    assert lenient(mmlongbench)("Hall 3, Hall 4", _doc("List", "['Room 3', 'Room 4']"))["score"] == 0.0  # strings
    assert lenient(mmlongbench)("garbled", _doc("Int", "12"), extracted="12")["score"] == 1.0  # extracted is read
    assert mmlongbench.anls("", "") == 1.0 and mmlongbench.anls("abc", "") == 0.0  # nothing left after normalising
    for said, gold in (("51", "50"), ("0.9805", "100"), ("1.0195", "100"), ("101.5", "1"), ("98.5", "1")):
        assert lenient(mmlongbench)(said, _doc("Float", gold))["score"] == 0.0


def test_niah_score_needs_the_whole_secret():
    meta = {"secret": "4821337"}
    assert niah.score("The number is 4821337.", meta)["score"] == 1.0
    assert niah.score("14821337", meta)["score"] == 0.0
    assert niah.score("482133", meta)["score"] == 0.0
    assert niah.score("◁think▷ it is 4821337", meta) == {"score": 0.0, "extracted": None}  # reasoning never closed


def test_numbers_in_brackets_are_separate_not_thousands():
    assert numbers("(250,250)") == [250.0, 250.0]
    assert numbers("[5,100] or [5, 100, 7]") == [5.0, 100.0, 5.0, 100.0, 7.0]
    assert numbers("a box [100,200,300,400]") == [100.0, 200.0, 300.0, 400.0]
    assert numbers("1,200 metres and (1,234)") == [1200.0, 1.0, 234.0]
    assert numbers("250,250 people") == [250250.0]  # outside brackets a comma still groups thousands
    assert numbers("click 250,250", thousands=False) == [250.0, 250.0]
    meta = {"type": "open", "answer": ["250"], "seed": "1"}
    assert lenient(mmmu)("The point is (250,250)", meta)["score"] == 1.0


def test_i_and_a_as_words_are_not_options():
    nine = {k: f"option {k}" for k in "ABCDEFGHI"}
    assert parse_option("I think the answer is B", nine) == "B"
    assert parse_option("I believe (E) is right", nine) == "E"
    assert parse_option("A cat sits on C", nine) == "C"
    assert parse_option("I", nine) == "I" and parse_option("(I)", nine) == "I" and parse_option("I.", nine) == "I"
    assert parse_option("The answer is I", nine) == "I"
    assert parse_option("I don't know", nine) is None
    assert parse_option("B is correct", nine) == "B"


def test_screenspot_lenient_reads_qwen_boxes_and_boxes_without_spaces():
    meta = {"box": [0.2, 0.2, 0.5, 0.5], "size": [200, 100]}
    assert lenient(screenspot)("<box>(250,250),(450,450)</box>", meta)["extracted"] == [0.35, 0.35]
    assert lenient(screenspot)("<box>(250, 250), (450, 450)</box>", meta)["score"] == 1.0
    assert lenient(screenspot)("[50,25,90,45]", meta)["extracted"] == [0.35, 0.35]  # pixels, no spaces
    assert lenient(screenspot)("(70,35)", meta)["score"] == 1.0
    assert screenspot.score("(70,35)", meta)["score"] == 0.0  # official: points are taken as normalised
    wide = {**meta, "size": [1000, 1000]}
    assert lenient(screenspot)("click at 300,400", wide)["extracted"] == [0.3, 0.4]  # a comma separates, not groups


def test_screenspot_official_click_points():
    """SeeClick's reading: a Qwen-VL box's centre / 1000, two numbers as the point, four as a box's centre."""
    meta = {"box": [0.2, 0.2, 0.5, 0.5], "size": [200, 100]}
    assert screenspot.score("<box>(250,300),(450,402)</box>", meta) == {"score": 1.0, "extracted": [0.35, 0.351]}
    assert screenspot.score("[0.1, 0.2, 0.3, 0.6]", meta)["extracted"] == pytest.approx([0.2, 0.4])
    assert screenspot.score("(0.25,0.45)", meta)["extracted"] == [0.25, 0.45]
    assert screenspot.score("no idea", meta, extracted="(0.3,0.4)") == {"score": 1.0, "extracted": [0.3, 0.4]}


def test_answer_cues_numbers_and_normalisation_details():
    # the last cue counts, "Answer:" is a cue, and the first number after it answers
    assert after_cue("The answer is probably 3. Checking again, the final answer is 5") == "5"
    assert after_cue("The answer is: yes") == "yes"  # the space after "is:" goes too
    assert answer_number("Answer: 7 (not 4)") == 7.0
    assert answer_number("The answer is 12 (out of 15)") == 12.0
    # a dotted run such as a section number gives its first number only, never a fragment after a dot
    assert numbers("section 2.3.4 says 7") == [2.3, 7.0]
    # punctuation becomes a space, so words on either side stay apart
    assert normalize_text("Hello, world!  It's-fine") == "hello world it s fine"
    # official scripts get a plain answer exactly as written
    assert official_text("  B \n") == "  B \n" and official_text("◁think▷x◁/think▷ B ") == "B"
    assert official_text("◁think▷ (B)") == ""  # a reasoning that never closes: the empty answer


def test_option_parsing_prefers_the_cue_the_longest_text_and_whole_letters():
    options = {"A": "red", "B": "dark red", "C": "blue"}
    assert parse_option("I considered (B) at first; the answer is (C)", options) == "C"  # the text after the cue first
    assert parse_option("It is dark red", options) == "B"  # the longest option text contained
    assert parse_option("Table B.2 shows it: C.", options) == "C"  # "B.2" is no letter choice


def test_mmlongbench_official_rules_at_their_edges():
    """eval_score's rules where a looser reading would differ: exact match for "page ..." golds and for lists of
    dates, the worst pair's ANLS for a list, the Int rule's failure scoring an empty gold as right, the float rule's
    rounding to the shorter of the two decimals (at least 2; 3 for a number written without a point), and ANLS of
    exactly 0.5 kept in lenient mode."""
    official = mmlongbench.official_score
    assert official("page 12", "page 13", "Str") == 0.0  # ANLS would give 0.86
    assert official("['2019-05', '2020-01']", "['2019-05', '2020-02']", "List") == 0.0
    assert official("['apple pie', 'banana']", "['apple pie', 'bandana']", "List") == pytest.approx(1 - 1 / 7)
    assert official("", "abc", "Int") == 1.0 and official("3", "x", "Int") == 0.0
    assert official("0.004", "0.00449", "Float") == 1.0  # rounded to 3 places, both are 0.004
    assert official("1e-05", "0.004", "Float") == 0.0  # 3 places for "1e-05": 0.004 is not 0.0
    assert official("it's", "its", "Str") == 0.75  # only a leading or trailing quote is removed
    assert mmlongbench.anls("abcd", "abxy") == 0.5
    # the stand-in extraction drops a final period and keeps a minus sign
    assert mmlongbench.score("The answer is Paris.", {"format": "Str", "answer": "Paris"})["score"] == 1.0
    assert mmlongbench.stand_in("The answer is -3", "Int") == "-3"
    lenient = partial(mmlongbench.score, mode="lenient")
    assert lenient("The answer is 3.7", {"format": "Int", "answer": "3"})["score"] == 1.0  # truncated, not rounded
    assert lenient("12/06", {"format": "Str", "answer": "12/05"})["score"] == 0.0  # digits match exactly
    assert lenient("Not answerable", {"format": "Str", "answer": "Not answerable"})["score"] == 1.0
    # the F1's recall counts the rows whose gold is not "Not answerable", whatever their answer_format
    rows = [
        {"score": 1.0, "extracted": "Not answerable", "meta": {"format": "Str", "answer": "Not answerable"}},
        {"score": 1.0, "extracted": "5", "meta": {"format": "Int", "answer": "5"}},
    ]
    assert mmlongbench.summarize(rows)["f1"] == pytest.approx(100.0)


def test_mmlongbench_official_float_str_and_list_rules():
    """is_float_equal's 1% tolerance of the gold, gold / 100 and gold x 100, and its rounding to the shorter of the two
    decimals (at least 2); an e-mail gold matched exactly; a list item with a number is still a string."""
    official = mmlongbench.official_score
    assert official("50", "50.4", "Float") == 1.0 and official("50", "51", "Float") == 0.0  # 2% off
    for gold, said in (("100", "0.9805"), ("100", "1.0195"), ("1", "101.5"), ("1", "98.5")):  # >1% off gold/100, x100
        assert official(gold, said, "Float") == 0.0
    assert official("0.014", "0.01", "Float") == 1.0  # rounded to the 2 places of "0.01"
    assert official("0.54", "0.5", "Float") == 0.0  # at least 2 places, though "0.5" has 1
    assert official("john@example.com", "john@example.org", "Str") == 0.0  # ANLS would give 0.81
    assert official("['Room 3', 'Room 4']", "['Hall 3', 'Hall 4']", "List") == 0.0
    # an answer that is no number scores 0 as itself, not as a failed extraction
    said = mmlongbench.score("x", {"format": "Float", "answer": "3.5"}, extracted="about three")
    assert said == {"score": 0.0, "extracted": "about three", "answered": True}


def test_mmlongbench_official_summary_counts_and_an_all_unanswered_run():
    """Recall over the golds that are not "Not answerable", precision over the answers that are not; with no answer
    given, eval_acc_and_f1's division fails and its F1 is 0."""
    rows = [
        {"score": 1.0, "extracted": "5", "meta": {"format": "Int", "answer": "5"}},
        {"score": 0.0, "extracted": "Not answerable", "meta": {"format": "Int", "answer": "7"}},
        {"score": 1.0, "extracted": "Not answerable", "meta": {"format": "None", "answer": "Not answerable"}},
        {"score": 0.0, "extracted": "2", "meta": {"format": "None", "answer": "Not answerable"}},
    ]
    metrics = mmlongbench.summarize(rows)
    assert metrics["accuracy"] == 50.0 and metrics["recall"] == 50.0 and metrics["precision"] == 50.0
    assert metrics["f1"] == pytest.approx(50.0)
    metrics = mmlongbench.summarize(rows[1:3])
    assert metrics["accuracy"] == 50.0 and metrics["recall"] == metrics["precision"] == metrics["f1"] == 0.0


CITIES = {"A": "北京", "B": "上海", "C": "广州", "D": "深圳"}


def test_numbers_and_letters_right_after_chinese_characters_are_read():
    """Chinese writes no spaces, and Python's \\w holds Han characters: a number or letter right after one counts, as
    do full-width forms; a letter or number inside a Latin word ("Bébé", "v2") and superscripts still do not."""
    assert numbers("答案是42") == [42.0] and numbers("４２") == [42.0] and numbers("3² + 4² = 5²") == [3.0, 4.0, 5.0]
    assert answer_number("共有3个苹果") == 3.0
    assert parse_option("答案是B", CITIES) == "B" and parse_option("我选B。", CITIES) == "B"
    assert parse_option("选（Ｂ）", CITIES) == "B" and parse_option("Ｂ", CITIES) == "B"
    assert parse_option("Bébé", OPTIONS) is None and parse_option("I think so", {"I": "x", "J": "y"}) is None
    mc = {"type": "multiple-choice", "options": CITIES, "answer": "B", "seed": "1", "group": "Art"}
    assert lenient(mmmu)("答案是B", mc) == {"score": 1.0, "extracted": "B", "random": False}  # was a random guess
    assert lenient(mmmu)("答案是42", {"type": "open", "answer": ["42"], "seed": "1"})["score"] == 1.0
    assert lenient(mathvista)("所以答案是42", _mv(answer="42"))["score"] == 1.0
    assert lenient(mmlongbench)("答案是42", {"format": "Int", "answer": "42"})["score"] == 1.0
    assert lenient(screenspot)("坐标0.2,0.2", {"box": [0.1, 0.1, 0.3, 0.3], "size": (1000, 1000)})["score"] == 1.0


def test_open_answers_and_option_texts_are_found_inside_chinese_sentences():
    """A gold string stands as a word in a Chinese sentence though no space sets it apart; in Latin text it still
    must be a whole word ("cat" is not in "bobcat")."""
    city = {"type": "open", "answer": ["北京"], "seed": "1"}
    assert lenient(mmmu)("答案是北京。", city)["score"] == 1.0 and lenient(mmmu)("答案是上海", city)["score"] == 0.0
    cat = {"type": "open", "answer": ["cat"], "seed": "1"}
    assert lenient(mmmu)("a bobcat", cat)["score"] == 0.0 and lenient(mmmu)("a cat.", cat)["score"] == 1.0
    assert parse_option("我认为是上海", {"A": "北京", "B": "上海"}) == "B"
    assert holds_phrase("Es ist Köln.", "köln") and not holds_phrase("Kölner Dom", "köln")


def test_chinese_commas_cues_superscripts_and_vowel_signs_read_as_written():
    """A review of the CJK reading: "，" was folded to a thousands comma ("120，300" as 120300); a letter named before
    a Chinese or Japanese answer cue won over the answer ("点A ... 答案是C" as A); NFKC fused "2³" into "23" and
    "1½" into "11/2"; a vowel sign after a phrase did not join it ("क" held in "कि")."""
    assert numbers("分别是 120，300") == [120.0, 300.0] and numbers("１，２３４") == [1.0, 234.0]
    assert lenient(mmmu)("两个解分别是 120，300", {"type": "open", "answer": ["300"], "seed": "1"})["score"] == 1.0
    four = dict(zip("ABCD", ["w", "x", "y", "z"], strict=True))
    for said, letter in (
        ("因为点A在圆上，所以答案是C", "C"),
        ("选项A错误，选项B也错误，正确答案是C", "C"),
        ("AさんはBさんより背が高い。答えはC", "C"),
        ("点A的坐标已知，故选D", "D"),
        ("答案：（Ｂ）", "B"),
    ):
        assert parse_option(said, four) == letter, said
    assert answer_number("设点A为原点，答案为 7，因为 3+4=7，共 2 步") == 7.0
    assert normalize_text("2³") == "2³" != normalize_text("23") and normalize_text("1½") == "1½"
    assert normalize_text("x₂") == "x₂" and normalize_text("ｘ²") == "x²"
    assert lenient(mmlongbench)("23", {"format": "Str", "answer": "2³"})["score"] < 1.0
    assert not holds_phrase("कि", "क") and not holds_phrase("रामा", "राम") and holds_phrase("राम है", "राम")
    assert parse_option("उत्तर कि है", {"A": "क", "B": "कि"}) == "B"


def test_normalisation_keeps_combining_marks_and_folds_compatibility_forms():
    """Vowel signs and accents are part of a word (Python's \\w leaves them out): "कि" (ki) and "को" (ko) differ, and
    NFC and NFD spellings of one word agree."""
    assert normalize_text("कि") == "कि" != normalize_text("को") and normalize_text("ดี") != normalize_text("ด")
    assert normalize_text("नमस्ते!") == "नमस्ते" and normalize_text("cafe\u0301") == normalize_text("caf\u00e9")
    assert normalize_text("Ｈｅｌｌｏ，ｗｏｒｌｄ！") == "hello world" and normalize_text("snake_case") == "snake case"
    assert lenient(mmmu)("को", {"type": "open", "answer": ["कि"], "seed": "1"})["score"] == 0.0
    text = _mv(answer_type="text", answer="caf\u00e9")
    assert lenient(mathvista)("cafe\u0301", text) == {"score": 1.0, "extracted": "caf\u00e9"}


FOUR = dict(zip("ABCD", ["w", "x", "y", "z"], strict=True))


def test_after_a_thai_vowel_sign_or_tone_mark_numbers_and_letters_stand_alone():
    """Thai writes no spaces, and its vowel signs and tone marks are combining marks: a number or letter after one was
    taken for part of a word ("ข้อที่3" read no number). A mark still joins the letter before it ("ด" is not in "ดี"),
    and after a Devanagari vowel sign a number stays part of the word."""
    assert numbers("ข้อที่3") == [3.0] and numbers("ได้5") == [5.0] and answer_number("ได้5") == 5.0
    assert parse_option("คำตอบที่ถูกคือข้อที่B", FOUR) == "B"
    assert not holds_phrase("ดี", "ด") and holds_phrase("คำตอบคือดี", "ดี") and numbers("कि3") == []


@pytest.mark.parametrize(
    "said",
    [
        "A不对，答案应该是B",
        "A不對，答案為B",
        "A不对，应选B",
        "A不對，故選B",  # traditional 選 was no cue: A, the letter named first, was read
        "A不對，應選B",
        "Aではなく、正解はB",
        "A는 틀렸고 정답은 B",
    ],
)
def test_chinese_japanese_and_korean_cues_name_the_answer(said):
    assert parse_option(said, FOUR) == "B"


def test_reading_details_at_their_edges():
    assert numbers("ราคา5") == [5.0] and numbers("총3개") == [3.0] and numbers("りんごは3個") == [3.0]
    assert numbers("（０．２５，－０．５）", thousands=False) == [0.25, -0.5] and half_width("～") == "~"
    assert normalize_text("Paris\u200b") == "paris" and normalize_text("$5") == "5"
    assert parse_option("不知道", {"A": "…", "B": "北京"}) is None  # an option text normalising to nothing matches none
    assert parse_option("C 不对，是B.", OPTIONS) == "B" and parse_option("I'D SAY B", OPTIONS) == "B"
    assert parse_option("B's claim is false; C holds", OPTIONS) == "C"
