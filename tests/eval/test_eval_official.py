"""The default (official) scoring agrees with each benchmark's own evaluation code on every recorded case.

The fixtures under ``fixtures/official_<benchmark>.json`` hold hand-made answers and the result the official code
gave for each when run on them (its repository, path and commit are in each fixture's ``source``); no official
code is part of kimivl or of these tests.
"""

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from kimivl.eval import mathvista, mmlongbench, mmmu, ocrbench, screenspot, videomme
from kimivl.eval.answers import OPTION_LETTERS

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name):
    data = json.loads((FIXTURES / f"official_{name}.json").read_text())
    assert data["source"]["repo"].startswith("github:") and len(data["source"]["commit"]) == 40
    assert len(data["cases"]) >= 40
    return data


def test_mmmu_agrees_with_the_official_code_random_picks_included():
    cases = fixture("mmmu")["cases"]
    items = []
    for c in cases:
        if c["type"] == "multiple-choice":
            meta = {
                "type": c["type"],
                "options": dict(zip(OPTION_LETTERS, c["options"])),
                "answer": c["answer"],
                "seed": c["id"],
                "group": c["subject"],
            }
        else:
            meta = {"type": "open", "answer": c["answer"], "seed": c["id"], "group": c["subject"]}
        items.append((c["response"], meta, None))
    scored = mmmu.score_rows(items)
    for c, s in zip(cases, scored):
        assert s["score"] == float(c["official_correct"]), c
        if c["type"] == "multiple-choice":
            assert s["extracted"] == c["official_parsed"], c
    guessed = [s for s in scored if s.get("random")]
    assert len(guessed) >= 5  # the seeded random stream is exercised, in the official order
    assert sum(c["official_correct"] for c in cases) not in (0, len(cases))


def test_mmmu_extracted_answers_skip_parsing():
    meta = {"type": "multiple-choice", "options": {"A": "x", "B": "y"}, "answer": "B", "seed": "0", "group": "Math"}
    assert mmmu.score("garbage", meta, extracted="B")["score"] == 1.0
    assert mmmu.score("(B)", meta, extracted="A")["score"] == 0.0
    assert mmmu.score("?", {"type": "open", "answer": ["12"]}, extracted="12.0")["score"] == 1.0


def test_mmmu_official_parsing_at_its_edges():
    """What MMMU's parse_multi_choice_response and parse_open_response (the fixture's commit) give where a looser
    reading differs: the latest last occurrence wins, a tie goes to the first option, option texts need more than
    5 words; open keys are the shortest tail after a cue, "=" on the last line only, a trivial key left out."""
    options = dict(zip(OPTION_LETTERS, ["red car", "red", "blue", "green"]))
    for said, letter in (
        ("B:", "B"),
        ("(A) or (B)? I keep (A)", "A"),
        ("A or B or A", "A"),
        ("green at first, then blue, finally green", "D"),
        ("I think it is the red car here", "A"),  # "red" ends at the same place: the first option wins the tie
        ("one two three four blue", None),  # 5 words: no option text is read, the official code guesses
    ):
        assert mmmu.official_choice(said, options) == letter, said
    for said, keys in (
        ("the answer is 5, isotope", {"5, isotope"}),
        ("the result 42 mm", {"42 mm", 42.0}),
        ("x = 3\nso 5", {5.0}),
        ("x = 3", {3.0}),
        ("what it is ;", {"what it is ;"}),
        ("The capital is Paris.", {"paris"}),
        ("so it is 5. then 6", {"5. then 6", 5.0, 6.0}),
        ("1,234 or 1.5e3 and -2.25 so", {"1,234 or 1.5e3 and -2.25 so", 1234.0, 1500.0, -2.25, 1.0, 234.0, 3.0}),
    ):
        assert set(mmmu.official_open(said)) == keys, said
    assert not mmmu.official_open_correct(["c"], mmmu.official_open("the answer is abc"))  # one letter: padded
    assert mmmu.official_open_correct(["3.14"], mmmu.official_open("area = 3.14159 m"))  # 2 decimals
    meta = {"type": "multiple-choice", "options": options, "answer": "D", "seed": "0", "group": "Art Theory"}
    guess = mmmu.score("no idea", meta)  # a row scored alone: the first draw of random.Random(42)
    assert guess == {"score": 0.0, "extracted": "A", "random": True}
    assert mmmu._subject_rank("Art Theory") == mmmu._subject_rank("art_theory") == mmmu.SUBJECTS.index("Art_Theory")


THREE_CHOICES = {  # a multiple-choice problem whose answer is the third choice
    "question_type": "multi_choice",
    "answer_type": "text",
    "answer": "6",
    "choices": ["2", "4", "6"],
    "precision": None,
}


def _mathvista_meta(problem):
    choices = problem["choices"]
    return {
        "question_type": problem["question_type"],
        "answer_type": problem["answer_type"],
        "precision": None if problem["precision"] is None else int(problem["precision"]),
        "answer_text": problem["answer"],
        "answer": problem["answer"],
        "choices": choices,
        "options": dict(zip(OPTION_LETTERS, choices or [])),
    }


def test_mathvista_agrees_with_the_official_code():
    cases = fixture("mathvista")["cases"]
    for c in cases:
        extracted = c["official_extraction"] if c["llm_called"] else None  # what the official LLM step gave
        s = mathvista.score(c["response"], _mathvista_meta(c["problem"]), extracted=extracted)
        assert s["extracted"] == c["official_extraction"], c
        assert s["normalized"] == c["official_prediction"], c
        assert s["score"] == float(c["official_correct"]), c
    assert sum(c["llm_called"] for c in cases) >= 10 and sum(not c["llm_called"] for c in cases) >= 10


def test_mathvista_stand_in_for_the_llm_extraction():
    meta = _mathvista_meta(
        {"question_type": "free_form", "answer_type": "integer", "answer": "7", "choices": None, "precision": None}
    )
    assert mathvista.score("The answer is 7.", meta) == {"score": 1.0, "extracted": "7", "normalized": "7"}
    meta = _mathvista_meta(THREE_CHOICES)
    assert mathvista.score("So the answer is (C).", meta)["score"] == 1.0
    assert mathvista.score("◁think▷ (A)?", meta)["normalized"] == "2"  # no answer: "" picks the shortest choice
    # the stand-in reads a letter or number right after Chinese text as it does after English
    assert mathvista.score("答案是C", meta) == {"score": 1.0, "extracted": "C", "normalized": "6"}
    integer = {
        "question_type": "free_form",
        "answer_type": "integer",
        "answer": "42",
        "choices": None,
        "precision": None,
    }
    assert mathvista.score("所以答案是42", _mathvista_meta(integer))["score"] == 1.0


def test_mathvista_official_normalisation_at_its_edges():
    """normalize_extracted_answer's first bracketed letter in either case; a float question without a precision
    normalises to None; the loader's meta (the gold letter beside the answer text) compares the answer text."""
    mc = _mathvista_meta(THREE_CHOICES)
    assert mathvista.official_normalize("(b)", mc) == "4" and mathvista.official_normalize("(A) or (C)", mc) == "2"
    assert mathvista.score("So it is (C).", {**mc, "answer": "C"}) == {
        "score": 1.0,
        "extracted": "C",
        "normalized": "6",
    }
    floats = {
        "question_type": "free_form",
        "answer_type": "float",
        "precision": None,
        "choices": None,
        "answer_text": "1.5",
    }
    assert mathvista.official_normalize("1.5", floats) is None and mathvista.score("1.5", floats)["score"] == 0.0
    # the stand-in for the LLM: the last bracketed list; a text answer without its final period
    lists = {**floats, "answer_type": "list", "answer_text": "[3, 4]"}
    assert mathvista.score("[1, 2] becomes [3, 4]", lists) == {
        "score": 1.0,
        "extracted": "[3, 4]",
        "normalized": "[3, 4]",
    }
    text = {**floats, "answer_type": "text", "answer_text": "yes"}
    assert mathvista.score("The answer is yes.", text)["score"] == 1.0


def test_ocrbench_agrees_with_the_official_code(tmp_path):
    """Each case read as a row of OCRBench's own OCRBench.json, then scored: a string answer is one gold as it is."""
    cases = fixture("ocrbench")["cases"]
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    keys = ("dataset_name", "type", "answers")
    rows = [{"id": i, "image_path": "a.png", "question": "q", **{k: c[k] for k in keys}} for i, c in enumerate(cases)]
    (tmp_path / "OCRBench.json").write_text(json.dumps(rows))
    loaded = {s.index: s for s in ocrbench.load(tmp_path / "OCRBench.json")}
    for i, c in enumerate(cases):
        if not str(c["answers"]).strip():  # an empty gold: a row the loader skips (OCRBench.json has none)
            assert loaded[i].reason == "no answer"
            continue
        assert ocrbench.score(c["predict"], loaded[i].meta)["score"] == c["official_result"], c
    assert 0 < sum(c["official_result"] for c in cases) < len(cases)
    hme = {"answers": ["x ^ { 2 } + 1"], "hme": True}
    assert ocrbench.score("x^{2}+1", hme)["score"] == 1.0 and ocrbench.score("x^{2}\t+1", hme)["score"] == 0.0


def test_videomme_agrees_with_the_official_code_and_its_denominator():
    data = fixture("videomme")
    rows = []
    for c in data["cases"]:
        meta = {"answer": c["answer"], "group": c["duration"]}
        s = videomme.score(c["response"], meta)
        assert s["extracted"] == c["official_extraction"], c
        rows.append({**s, "meta": meta})
    metrics = videomme.summarize(rows)
    printed = data["official_overall_printed"]
    for name, key in (
        ("short", "accuracy/short"),
        ("medium", "accuracy/medium"),
        ("long", "accuracy/long"),
        ("all", "accuracy"),
    ):
        assert printed[name] == f"Overall: {metrics[key]: .1f}%"
    assert metrics["parsed"] < 100 and metrics["accuracy_all"] < metrics["accuracy"]  # unanswered rows left out


def test_mmlongbench_agrees_with_the_official_code_scores_and_f1():
    data = fixture("mmlongbench")
    rows = []
    for c in data["cases"]:
        meta = {"format": c["answer_format"], "answer": c["answer"]}
        s = mmlongbench.score("ignored", meta, extracted=c["extracted"])
        assert s["score"] == pytest.approx(c["official_score"], abs=1e-12), c
        rows.append({**s, "meta": meta})
    metrics = mmlongbench.summarize(rows)
    assert metrics["accuracy"] == pytest.approx(100 * data["official_acc"])
    assert metrics["f1"] == pytest.approx(100 * data["official_f1"])
    assert any(c["official_raised"] for c in data["cases"])
    partial = [c["official_score"] for c in data["cases"] if 0 < c["official_score"] < 1]
    assert partial and all(not math.isclose(p, 1) for p in partial)  # ANLS partial credit is exercised


def test_mmlongbench_extractor_reply_and_stand_in():
    meta = {"format": "Int", "answer": "12"}
    assert mmlongbench.score("x", meta, extracted="Extracted answer: 12\nAnswer format: Integer")["score"] == 1.0
    failed = mmlongbench.score("x", {"format": "Float", "answer": "n/a"}, extracted="3")  # the gold is no float
    assert failed == {"score": 0.0, "extracted": "Failed to extract", "answered": True}
    assert mmlongbench.score("There are 12 figures.", meta)["extracted"] == "12"  # Int: the first number
    assert mmlongbench.score("The answer is 12.", meta)["score"] == 1.0
    none = {"format": "None", "answer": "Not answerable"}
    for said in (
        "Not answerable",
        "The question is unanswerable.",
        "This cannot be determined from the document.",
        "The answer is not mentioned in the document.",
    ):
        assert mmlongbench.score(said, none) == {"score": 1.0, "extracted": "Not answerable", "answered": False}
    lists = {"format": "List", "answer": "['Paris', 'Tokyo']"}
    assert mmlongbench.score("The answer is Tokyo and Paris", lists)["score"] == 1.0


def test_screenspot_agrees_with_the_official_code():
    cases = fixture("screenspot")["cases"]
    for c in cases:
        box = screenspot.normalized_box(c["bbox_xywh"], "xywh", tuple(c["img_size"]))
        assert box == c["official_bbox"]
        s = screenspot.score(c["response"], {"box": box, "size": c["img_size"]})
        assert s["score"] == float(c["official_correct"]), c
        assert (s["extracted"] is None) == c["official_wrong_format"], c
    assert sum(c["official_wrong_format"] for c in cases) >= 5


@pytest.mark.parametrize("module", [mmmu, mathvista, ocrbench, screenspot, videomme, mmlongbench])
def test_unknown_scoring_mode_is_an_error(module):
    with pytest.raises(ValueError, match="unknown scoring mode 'strict'"):
        module.score("x", {}, mode="strict")
