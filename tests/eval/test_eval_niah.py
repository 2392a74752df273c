"""Needle in a haystack: the needle lands at the asked depth and length, and the scorer reads it back."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from kimivl import KimiVLProcessor
from kimivl.cli import main
from kimivl.eval import niah
from kimivl.eval.report import headline, markdown
from kimivl.eval.runner import rescoring_samples, run_task
from kimivl.eval.tasks import get_task


@pytest.mark.parametrize("depth", [0, 25, 50, 90, 100])
def test_text_needle_at_the_asked_depth_and_length(small_processor, depth):
    messages, where = niah.text_case(small_processor, 1500, depth, "4821337")
    assert where["tokens"] == len(small_processor.encode(messages).input_ids)
    assert 1400 <= where["tokens"] <= 1500
    start, end = where["haystack"]
    relative = (where["needle"] - start) / (end - start)
    assert abs(relative - depth / 100) < 0.04  # within about one filler sentence
    ids = small_processor.encode(messages).input_ids
    needle = small_processor.tokenizer.decode(ids[where["needle"] : where["needle"] + 40])
    assert needle.lstrip().startswith("The secret number of the day is 4821337.")


@pytest.mark.parametrize("depth", [0, 30, 50, 100])  # 30% of 12 frame gaps is 3.6: the nearest frame is 4
def test_video_needle_frame_at_the_asked_depth(small_processor, depth):
    messages, where = niah.video_case(small_processor, 1200, depth, "5550123")
    assert where["tokens"] == len(small_processor.encode(messages).input_ids) <= 1200
    assert where["tokens"] > 1200 - 80  # within one frame of the target
    frames = [p["image"] for p in messages[0]["content"] if p["type"] == "image"]
    assert len(frames) == where["frames"]
    white = [bool((np.asarray(f) == 255).mean() > 0.8) for f in frames]
    assert white.index(True) == where["needle"] == round(depth / 100 * (len(frames) - 1)) and sum(white) == 1


@pytest.fixture(scope="module")
def shipped_processor():
    """The shipped model's processor (its tokenizer splits timestamps and joined filler as the bug needs)."""
    return KimiVLProcessor.from_pretrained(Path(__file__).parents[2] / "models" / "kimivl-tiny")


def test_video_haystack_counts_its_tokens_past_ten_seconds(shipped_processor):
    # timestamps from 00:10.0 on take more tokens than 00:01.0: the count is measured, not extrapolated from two
    # frames, and the prompt stays within the asked length by less than a frame
    for length in (2048, 4064):
        messages, where = niah.video_case(shipped_processor, length, 50, "5550123")
        assert where["tokens"] == len(shipped_processor.encode(messages).input_ids) <= length
        assert where["tokens"] > length - 80
        assert where["frames"] == sum(p["type"] == "image" for p in messages[0]["content"])


def test_text_haystack_never_passes_the_asked_length(shipped_processor):
    # joining filler sentences can tokenize a token longer than their counts; at the top length such a prompt
    # would leave the answer one token short of the context
    over = []
    for trial in range(8):
        for depth in (0, 10, 25, 50, 75, 90, 100):
            messages, where = niah.text_case(
                shipped_processor, 1024, depth, niah.secret_for(f"text/1024/{depth}/0"), trial
            )
            assert where["tokens"] == len(shipped_processor.encode(messages).input_ids)
            over += [where["tokens"] - 1024] if where["tokens"] > 1024 else []
            assert where["tokens"] > 1024 - 70  # short by less than two filler sentences (34 tokens at most)
    assert over == []


def test_secret_and_meta_come_back_from_the_index():
    index = niah.case_index("video", 4096, 30, 1)
    meta = niah.meta_from_index(index)
    assert meta == {"kind": "video", "length": 4096, "depth": 30, "trial": 1, "secret": niah.secret_for(index)}
    assert niah.secret_for(index) != niah.secret_for(niah.case_index("video", 4096, 40, 1))
    assert niah.default_lengths(4096) == [1024, 2048, 4064]


def test_an_oracle_that_reads_the_needle_scores_full_recall(small_processor, tmp_path):
    def oracle(conversations):
        return [re.search(r"day is (\d+)", c[0]["content"]).group(1) for c in conversations]

    task = get_task("niah")
    cases = task.load(processor=small_processor, lengths=[300, 2500], depths=[0, 50, 100], kinds=["text"])
    result = run_task(task, cases, tmp_path, generate_fn=oracle, batch_size=3, progress=False)
    assert result["scored"] == 6 and result["metrics"]["recall/text"] == 100.0
    assert result["metrics"]["recall/text/0K-2K"] == result["metrics"]["recall/text/2K-4K"] == 100.0
    assert "| text | 100.0 | 100.0 |" in result["table"]
    assert (tmp_path / "niah_text.png").stat().st_size > 1000


def test_the_heatmaps_are_named_by_absolute_paths(small_processor, tmp_path, monkeypatch):
    """An ``--out`` given relatively recorded ``figures`` relative to the caller's directory (run.json's paths are
    absolute): read from anywhere else, they named other files."""
    task = get_task("niah")
    cases = task.load(processor=small_processor, lengths=[300], depths=[0], kinds=["text"])
    monkeypatch.chdir(tmp_path)
    result = run_task(task, cases, "out", generate_fn=lambda c: ["0"] * len(c), progress=False)
    assert result["figures"] == [str(tmp_path.resolve() / "out" / "niah_text.png")]
    assert result["predictions"] == str(tmp_path.resolve() / "out" / "niah.predictions.jsonl")


def test_niah_through_the_cli_and_rescored_from_the_index(small_model, small_processor, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    small_model.save_pretrained(ckpt)
    small_processor.save_pretrained(ckpt)
    out = tmp_path / "out"
    assert (
        main(
            [
                "eval",
                "--model",
                str(ckpt),
                "--task",
                "niah",
                "--lengths",
                "300,600",
                "--depths",
                "0,100",
                "--max-new-tokens",
                "2",
                "--dtype",
                "float32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    run = json.loads((out / "niah.run.json").read_text())  # NIAH's options make its rows: resuming checks them
    assert (run["lengths"], run["depths"], run["haystack"], run["trials"]) == ([300, 600], [0, 100], None, None)
    result = json.loads((out / "results.json").read_text())["niah"]
    assert result["scored"] == 8 and set(result["figures"]) == {str(out / "niah_text.png"), str(out / "niah_video.png")}
    assert "| haystack | 0K-2K |" in (out / "results.md").read_text()
    printed = capsys.readouterr().out
    assert "| haystack | 0K-2K |" in printed and "| text |" in printed and "| video |" in printed  # on the console
    pred = out / "niah.predictions.jsonl"
    rows = [json.loads(x) for x in pred.read_text().splitlines()]
    perfect = tmp_path / "perfect.jsonl"
    perfect.write_text(
        "".join(json.dumps({"index": r["index"], "prediction": niah.secret_for(r["index"])}) + "\n" for r in rows)
        + json.dumps({"index": "garbage", "prediction": "x"})  # a foreign line had ended the run
        + "\n"
    )
    capsys.readouterr()
    assert main(["eval", "--task", "niah", "--predictions", str(perfect), "--out", str(tmp_path / "re")]) == 0
    rescored = json.loads((tmp_path / "re" / "results.json").read_text())["niah"]
    assert rescored["metrics"]["recall/text"] == rescored["metrics"]["recall/video"] == 100.0
    assert rescored["unmatched_predictions"] == 1
    assert "recall/text=100.0" in capsys.readouterr().out  # the summary line had shown no number


def test_depths_outside_0_to_100_are_an_error_and_the_grid_has_a_size(small_processor):
    for depths in ([-50], [0, 101]):
        with pytest.raises(ValueError, match="0 to 100"):
            niah.load(processor=small_processor, lengths=[300], depths=depths)
    with pytest.raises(ValueError, match="positive"):
        niah.load(processor=small_processor, lengths=[0], depths=[0])
    cases = niah.load(processor=small_processor, lengths=[300, 600], depths=[0, 50, 100], kinds=["text"], trials=2)
    assert len(cases) == 12 == len(list(cases))


def test_cli_rejects_a_negative_depth_in_one_line(small_model, small_processor, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    small_model.save_pretrained(ckpt)
    small_processor.save_pretrained(ckpt)
    assert (
        main(
            [
                "eval",
                "--model",
                str(ckpt),
                "--task",
                "niah",
                "--lengths",
                "300",
                "--depths",
                "-50",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "0 to 100" in err and "-50" in err and "Traceback" not in err


@pytest.mark.parametrize("index", ["garbage", "text/abc/0/0", "audio/1024/0/0", "text/1024/0/0/1", "text/1024/-5/0"])
def test_a_foreign_index_is_not_a_niah_case(index):
    with pytest.raises(ValueError, match=r"not a NIAH index: .* \(expected kind/length/depth/trial"):
        niah.meta_from_index(index)


def test_rescoring_counts_predictions_with_foreign_indices_as_unmatched(tmp_path):
    task = get_task("niah")
    cases = [niah.case_index("text", 1024, 50, 0), niah.case_index("video", 3000, 0, 0)]
    lines = [{"index": i, "prediction": niah.secret_for(i)} for i in cases]
    lines += [{"index": i, "prediction": "1234567"} for i in ("garbage", "text/abc/0/0", 7)]
    pred = tmp_path / "p.jsonl"
    pred.write_text("".join(json.dumps(x) + "\n" for x in lines))
    samples = rescoring_samples(task, pred)
    assert [s.index for s in samples] == cases
    result = run_task(task, samples, tmp_path / "out", predictions=pred, progress=False)
    assert result["scored"] == 2 and result["unmatched_predictions"] == 3
    assert result["metrics"] == {
        "recall/text": 100.0,
        "recall/text/0K-2K": 100.0,
        "recall/video": 100.0,
        "recall/video/2K-4K": 100.0,
    }


def test_the_headline_metrics_of_a_task_whose_metrics_all_have_groups():
    recall = {"recall/text": 50.0, "recall/text/0K-2K": 50.0}
    assert headline(recall) == recall  # NIAH: no metric without a "/", so all of them
    assert headline({"accuracy": 40.0, "accuracy/ocr": 55.0}) == {"accuracy": 40.0}
    assert "| niah | recall/text | 50.0 | 2 |" in markdown({"niah": {"metrics": recall, "scored": 2}})


def test_lengths_beyond_the_context_are_refused_before_any_haystack_or_model(
    checkpoint, small_model, small_processor, monkeypatch, tmp_path, capsys
):
    context = small_model.config.text_config.max_position_embeddings
    top = context - 32
    cases = niah.load(processor=small_processor, lengths=[300, top], context=context, max_new_tokens=32)
    assert len(cases) == 2 * 2 * 11  # 2 haystacks, 2 lengths, 11 depths: the longest that leaves room is taken
    with pytest.raises(ValueError, match=rf"NIAH lengths {top + 1} exceed .* of {context} tokens .*up to {top}"):
        niah.load(processor=small_processor, lengths=[300, top + 1], context=context, max_new_tokens=32)

    def never(path, dtype, device):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("kimivl.cli._load", never)
    args = ["eval", "--model", str(checkpoint), "--task", "niah", "--out", str(tmp_path / "out")]
    assert main([*args, "--lengths", "100000k"]) == 2
    err = capsys.readouterr().err
    assert f"NIAH lengths 102400000 exceed what the model's context of {context} tokens leaves" in err
    assert f"give --lengths up to {top}" in err and "Traceback" not in err
    assert main([*args, "--lengths", "1k", "--depths", "0,120"]) == 2  # other options too, before the model loads
    assert "0 to 100; got 120" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lengths", [["--lengths", "1k"], []])
def test_max_new_tokens_over_the_context_is_named_before_the_lengths(
    checkpoint, small_model, tmp_path, capsys, lengths
):
    """The advice was nonsense: '... a prompt with 5000 new tokens (-904); give --lengths up to -904'."""
    context = small_model.config.text_config.max_position_embeddings
    args = ["eval", "--model", str(checkpoint), "--task", "niah", "--out", str(tmp_path / "out"), *lengths]
    for max_new in (context, context + 904):
        assert main([*args, "--max-new-tokens", str(max_new)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"kimivl eval: error: --max-new-tokens {max_new} must be below the model's context of {context} tokens: "
            "the prompt and the answer share it"
        )
    assert not (tmp_path / "out").exists()


def test_each_niah_metric_in_results_md_counts_its_own_rows(tmp_path):
    """Each per-haystack (and per-bucket) metric showed the task's total row count (5) rather than its own."""
    task = get_task("niah")
    text = [niah.case_index("text", n, d, 0) for n, d in ((1024, 0), (1024, 50), (3000, 0))]
    video = [niah.case_index("video", 3000, d, 0) for d in (0, 50)]
    pred = tmp_path / "p.jsonl"
    answers = [(i, niah.secret_for(i)) for i in text + video[:1]] + [(video[1], "0")]
    pred.write_text("".join(json.dumps({"index": i, "prediction": p}) + "\n" for i, p in answers))
    result = run_task(task, rescoring_samples(task, pred), tmp_path / "out", predictions=pred, progress=False)
    assert result["scored"] == 5
    table = (tmp_path / "out" / "results.md").read_text()
    for row in (
        "| niah | recall/text | 100.0 | 3 | 3 | 0 |",
        "| niah | recall/text/0K-2K | 100.0 | 2 | 2 | 0 |",
        "| niah | recall/text/2K-4K | 100.0 | 1 | 1 | 0 |",
        "| niah | recall/video | 50.0 | 2 | 2 | 0 |",
        "| niah | recall/video/2K-4K | 50.0 | 2 | 2 | 0 |",
    ):
        assert row in table, row


def test_a_value_given_twice_is_refused_before_the_model_loads(checkpoint, tmp_path, monkeypatch, capsys):
    """--haystack text,text (or --lengths 1k,1024, --depths 0,0) built each case twice; the second of each was then
    'skipped as malformed' (a repeated index)."""
    for options, message in (
        ({"lengths": [1024, 512, 1024]}, "NIAH --lengths gives 1024 more than once"),
        ({"lengths": [512], "depths": [0, 50, 0, 50]}, "NIAH --depths gives 0, 50 more than once"),
        ({"lengths": [512], "kinds": ["text", "text"]}, "NIAH --haystack gives text more than once"),
    ):
        with pytest.raises(ValueError, match=message):
            niah.check_options(**options)
    assert niah.check_options([512, 1024], [0, 100], ["text", "video"]) == [512, 1024]
    with pytest.raises(ValueError, match=r"unknown haystack 'audio' \(expected one of text, video\)"):
        niah.check_options([512], kinds=["audio"])
    assert niah.check_options(context=4096) == [1024, 2048, 4064]  # room for 32 new tokens by default
    assert niah.check_options()[-1] == 131072 - 32 and niah.check_options([1]) == [1]  # no context: the report's 128K
    with pytest.raises(ValueError, match=r"lengths and trials must be positive; got lengths \[512\], trials 0"):
        niah.check_options([512], trials=0)

    def never(path, dtype, device):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("kimivl.cli._load", never)
    args = [
        "eval",
        "--model",
        str(checkpoint),
        "--task",
        "niah",
        "--out",
        str(tmp_path / "out"),
        "--lengths",
        "1k,1024",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kimivl eval: error: NIAH --lengths gives 1024 more than once") and "\n" not in err


def test_video_haystack_fits_a_long_length_in_few_encodes(monkeypatch):
    """At 128K the frame count was found a frame at a time from a two-frame guess: 17 encodes of about 1,700 frames
    (45 s a case). Later frames here cost more tokens, as later timestamps do."""

    def cost(k: int) -> int:
        return 30 + sum(64 + 2 * (i >= 10) + 2 * (i >= 100) + 2 * (i >= 1000) for i in range(k))

    calls = []

    def tokens(processor, messages):
        calls.append(sum(p["type"] == "image" for p in messages[0]["content"]))
        return cost(calls[-1])

    monkeypatch.setattr(niah, "_prompt_tokens", tokens)
    for length in (1200, 32768, 131072):
        calls.clear()
        _, where = niah.video_case(None, length, 50, "5550123")
        n = where["frames"]
        assert where["tokens"] == cost(n) <= length < cost(n + 1)  # the most frames that fit
        assert len(calls) <= 6, (length, calls)  # two for the guess, three tries, one past the most


def test_video_cases_of_one_length_share_one_measured_frame_count(small_processor, monkeypatch):
    """Each video case measured its frame count again (4-5 encodes of the whole haystack): the count hangs on the
    frames' sizes and timestamps only, so the depths and trials of a length share it, and the cases are the same as
    each measured alone."""
    real, calls = niah._prompt_tokens, []

    def counting(processor, messages):
        calls.append(1)
        return real(processor, messages)

    monkeypatch.setattr(niah, "_prompt_tokens", counting)
    cases = list(
        niah.load(processor=small_processor, lengths=[700, 1200], depths=[0, 50, 100], kinds=["video"], trials=2)
    )
    assert len(cases) == 12 and len(calls) <= 2 * 6  # at most six encodes per length, not per case
    for case in cases:
        meta = case.meta
        secret, seed = meta["secret"], meta["trial"]
        alone, where = niah.video_case(small_processor, meta["length"], meta["depth"], secret, seed)
        assert {k: meta[k] for k in where} == where
        parts, alone_parts = case.messages[0]["content"], alone[0]["content"]
        assert [p.get("text") for p in parts] == [p.get("text") for p in alone_parts]
        images = [(np.asarray(p["image"]), np.asarray(q["image"])) for p, q in zip(parts, alone_parts) if "image" in p]
        assert len(images) == meta["frames"] and all(np.array_equal(a, b) for a, b in images)
