"""Running tasks: resume after an interruption, re-scoring saved predictions, the results files, the CLI."""

import base64
import csv
import io
import json
import logging
import os
import re

import pytest
import torch
from PIL import Image

from kimivl import generate
from kimivl.cli import main
from kimivl.eval.runner import EvalError, _made_dir, read_predictions, run_task
from kimivl.eval.tasks import get_task
from kimivl.files import WriteError


def ocr_tsv(path, n=7, bad=()):
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (255, 255, 255)).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["index", "image", "question", "answer", "category"], delimiter="\t")
        w.writeheader()
        for i in range(n):
            w.writerow(
                {
                    "index": i,
                    "image": image,
                    "question": f"Word {i}?",
                    "category": "Regular",
                    "answer": "[]" if i in bad else f"['word{i}']",
                }
            )
    return path


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


class Interrupted(RuntimeError):
    pass


def test_resume_after_interruption_scores_every_row_once(tmp_path):
    data, out = ocr_tsv(tmp_path / "ocr.tsv"), tmp_path / "out"
    task = get_task("ocrbench")
    asked = []

    def flaky(conversations):  # answers two batches, then dies
        if len(asked) >= 4:
            raise Interrupted("killed")
        asked.extend(c[0]["content"][-1]["text"] for c in conversations)
        return [f"it says word{t.split()[1][:-1]}" for t in asked[-len(conversations) :]]

    with pytest.raises(Interrupted):
        run_task(task, task.load(data), out, generate_fn=flaky, batch_size=2, progress=False)
    pred = out / "ocrbench.predictions.jsonl"
    assert [r["index"] for r in lines(pred)] == [0, 1, 2, 3]
    with open(pred, "a") as f:  # a write cut short by the kill
        f.write('{"index": 4, "predic')

    second = []

    def steady(conversations):
        second.extend(c[0]["content"][-1]["text"] for c in conversations)
        return ["word" + t.split()[1][:-1] for t in second[-len(conversations) :]]

    result = run_task(task, task.load(data), out, generate_fn=steady, batch_size=2, progress=False)
    assert second == ["Word 4?", "Word 5?", "Word 6?"]
    assert sorted(r["index"] for r in lines(pred)) == list(range(7))  # each once, the cut line dropped
    assert result["scored"] == 7 and result["skipped"] == 0 and result["metrics"]["score"] == 1000.0
    results = json.loads((out / "results.json").read_text())
    assert results["ocrbench"]["metrics"]["score"] == 1000.0
    assert "| ocrbench | score | 1000.0 | 7 | 7 | 0 |" in (out / "results.md").read_text()


def test_malformed_rows_are_reported_and_failed_generation_scores_as_an_empty_answer(tmp_path):
    """As the official scripts count every row, a row whose generation failed is scored (as no answer: wrong here),
    so failures cannot raise the score; a malformed row cannot be scored. Both are listed with their reasons."""
    data = ocr_tsv(tmp_path / "ocr.tsv", n=5, bad={1})
    task = get_task("ocrbench")

    def gen(conversations):
        if any("Word 3?" in c[0]["content"][-1]["text"] for c in conversations):
            raise ValueError("prompt of 99999 tokens does not fit the model's context")
        return ["nothing"] * len(conversations)

    result = run_task(task, task.load(data), tmp_path / "out", generate_fn=gen, batch_size=4, progress=False)
    assert result["scored"] == 4 and result["answered"] == 3 and result["missing"] == 1 and result["skipped"] == 1
    assert result["skipped_rows"] == [{"index": "1", "reason": "no answer"}]
    [missing] = result["missing_rows"]
    assert missing["index"] == "3" and "does not fit" in missing["reason"]
    scored = {r["index"]: r for r in lines(tmp_path / "out" / "ocrbench.scored.jsonl")}
    assert sorted(scored) == ["0", "2", "3", "4"]
    assert "does not fit" in scored["3"]["failed"] and scored["3"]["prediction"] == "" and scored["3"]["score"] == 0
    assert "failed" not in scored["0"]


def test_rescoring_saved_predictions_without_a_model(tmp_path, capsys):
    data = ocr_tsv(tmp_path / "ocr.tsv", n=4)
    pred = tmp_path / "other_system.jsonl"
    pred.write_text(
        "".join(
            json.dumps({"index": i, "prediction": p}) + "\n"
            for i, p in [(0, "WORD0"), (1, "◁think▷ word1 ◁/think▷ nope"), (2, "word2"), (0, "x")]
        )
    )
    out = tmp_path / "scores"
    assert main(["eval", "--task", "ocrbench", "--data", str(data), "--predictions", str(pred), "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())["ocrbench"]
    assert result["scored"] == 4 and result["answered"] == 3
    assert result["metrics"]["score"] == pytest.approx(2000 / 4)  # the row without a prediction counts, as wrong
    assert result["missing_rows"] == [{"index": "3", "reason": "no prediction"}] and result["skipped_rows"] == []
    assert "ocrbench: score=500.0  (scored 4 rows: 3 answered, 1 missing" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"index": 0}\n')
    assert main(["eval", "--task", "ocrbench", "--data", str(data), "--predictions", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_read_predictions_keeps_the_first_of_an_index(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"index": 1, "prediction": "a"}\n\n{"index": "1", "prediction": "b"}\n')
    assert read_predictions(path) == {"1": "a"}


def test_a_last_line_without_newline_is_read_from_a_users_file_and_cut_from_a_resumed_one(tmp_path, caplog):
    path = tmp_path / "p.jsonl"
    path.write_text('{"index": 1, "prediction": "a"}\n{"index": 2, "prediction": "b"}')
    assert read_predictions(path) == {"1": "a", "2": "b"}  # an editor's file often ends so
    with caplog.at_level(logging.WARNING, logger="kimivl.eval.runner"):
        assert read_predictions(path, repair=True) == {"1": "a"}  # kimivl's own, killed mid-write
        assert "ignoring an incomplete last line" in caplog.text
        caplog.clear()
        assert path.read_text() == '{"index": 1, "prediction": "a"}\n'
        assert read_predictions(path, repair=True) == {"1": "a"} and not caplog.text  # a whole file: no warning


def test_cli_eval_refuses_an_empty_task_list_bad_numbers_and_a_missing_predictions_file(tmp_path, capsys):
    for args, words in (
        (["--task", ","], "names no task"),
        (["--task", "ocrbench", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--task", "ocrbench", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--task", "ocrbench", "--limit", "-1"], "--limit must be >= 1"),
        (["--task", "synthetic", "--predictions", str(tmp_path / "none.jsonl")], "none.jsonl: no such file"),
        (["--task", "synthetic", "--predictions", str(tmp_path)], "no such file"),
    ):
        assert main(["eval", *args, "--out", str(tmp_path / "out")]) == 2
        assert words in capsys.readouterr().err, args
    assert not (tmp_path / "out").exists()


def test_cli_eval_with_a_model_on_synthetic_and_a_benchmark(checkpoint, small_model, small_processor, tmp_path, capsys):
    data = ocr_tsv(tmp_path / "ocr.tsv", n=3)
    out = tmp_path / "out"
    assert (
        main(
            [
                "eval",
                "--model",
                str(checkpoint),
                "--task",
                "synthetic:caption,ocrbench",
                "--data",
                f"ocrbench={data}",
                "--limit",
                "2",
                "--batch-size",
                "2",
                "--max-new-tokens",
                "3",
                "--dtype",
                "float32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["synthetic:caption"]["scored"] == 2 and results["ocrbench"]["scored"] == 2
    preds = lines(out / "ocrbench.predictions.jsonl")
    task = get_task("ocrbench")
    samples = list(task.load(data))[:2]
    expected = generate(small_model, small_processor, [s.messages for s in samples], max_new_tokens=3)
    assert [p["prediction"] for p in preds] == expected
    assert "synthetic:caption: accuracy=" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert main(["eval", "--task", "mmmu", "--predictions", "p.jsonl"]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert main(["eval", "--task", "nope", "--predictions", "p.jsonl"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", "--task", "ocrbench", "--data", str(ocr_tsv(tmp_path / "o.tsv"))]) == 2
    assert "--model" in capsys.readouterr().err


def test_resuming_refuses_predictions_of_other_settings_unless_overwrite(tmp_path):
    from kimivl.eval.runner import EvalError

    data, out = ocr_tsv(tmp_path / "ocr.tsv", n=4), tmp_path / "out"
    task = get_task("ocrbench")
    calls = []

    def answer(tag):
        def gen(conversations):
            calls.append((tag, len(conversations)))
            return [f"{tag} word{c[0]['content'][-1]['text'].split()[1][:-1]}" for c in conversations]

        return gen

    a = {"model": "/m/a", "checkpoint_fingerprint": "aaa", "data": str(data), "max_new_tokens": 8}
    run_task(task, task.load(data), out, generate_fn=answer("A"), settings=a, limit=2, progress=False)
    resumed = run_task(task, task.load(data), out, generate_fn=answer("A"), settings=a, progress=False)
    assert calls == [("A", 2), ("A", 2)] and resumed["scored"] == 4  # the same run: only the missing rows
    for change in ({"model": "/m/b", "checkpoint_fingerprint": "bbb"}, {"max_new_tokens": 16}):
        with pytest.raises(EvalError, match="another run.*" + next(iter(change)) + ".*--overwrite"):
            run_task(task, task.load(data), out, generate_fn=answer("B"), settings={**a, **change}, progress=False)
    assert [r["prediction"].split()[0] for r in lines(out / "ocrbench.predictions.jsonl")] == ["A"] * 4
    b = {**a, "model": "/m/b", "checkpoint_fingerprint": "bbb"}
    run_task(task, task.load(data), out, generate_fn=answer("B"), settings=b, overwrite=True, progress=False)
    assert [r["prediction"].split()[0] for r in lines(out / "ocrbench.predictions.jsonl")] == ["B"] * 4
    assert json.loads((out / "ocrbench.run.json").read_text())["model"] == "/m/b"
    (out / "ocrbench.run.json").unlink()  # predictions whose run is unknown are not resumed either
    with pytest.raises(EvalError, match="no record of the run"):
        run_task(task, task.load(data), out, generate_fn=answer("B"), settings=b, progress=False)
    for damaged in (b'{"model": "/m/b"', b"\xff\xfe{}", b'["model", "/m/b"]'):  # nor those of a damaged record
        (out / "ocrbench.run.json").write_bytes(damaged)
        with pytest.raises(EvalError, match=r"no record of the run that made them \(ocrbench.run.json\)"):
            run_task(task, task.load(data), out, generate_fn=answer("B"), settings=b, progress=False)
    empty = tmp_path / "empty"  # a run cut short before its first prediction left an empty file: nothing to resume
    empty.mkdir()
    (empty / "ocrbench.predictions.jsonl").touch()
    run_task(task, task.load(data), empty, generate_fn=answer("C"), settings=a, progress=False)
    assert [r["prediction"].split()[0] for r in lines(empty / "ocrbench.predictions.jsonl")] == ["C"] * 4


def test_checkpoint_fingerprint_reads_the_weights_survives_a_copy_and_samples_large_files(tmp_path):
    import shutil

    from kimivl.eval.runner import checkpoint_fingerprint, sampled_ranges

    a = tmp_path / "a"
    a.mkdir()
    (a / "config.json").write_text('{"x": 1}')
    (a / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    b = tmp_path / "b"
    shutil.copytree(a, b)  # another inode and modification time, the same contents
    assert checkpoint_fingerprint(a) == checkpoint_fingerprint(b)
    with open(b / "model.safetensors", "r+b") as f:  # other weights of the same size
        f.seek(500)
        f.write(b"\xff")
    assert checkpoint_fingerprint(a) != checkpoint_fingerprint(b)
    shutil.copy(a / "model.safetensors", b / "model.safetensors")
    (b / "config.json").write_text('{"x": 2}')
    assert checkpoint_fingerprint(a) != checkpoint_fingerprint(b)

    size = 16 << 30  # a 16 GiB file: its first MiB and 4 KiB of every 2 MiB, to its last byte
    ranges = sampled_ranges(size)
    assert ranges[0] == (0, 1 << 20) and ranges[-1] == (size - 4096, 4096)
    assert ranges[1:3] == [(1 << 20, 4096), (3 << 20, 4096)] and len(ranges) == 2 + 8192  # every 2 MiB after the head
    assert sampled_ranges(64 << 20) == [(0, 64 << 20)] and len(sampled_ranges((64 << 20) + 1)) > 2  # whole to 64 MiB
    assert 8 << 20 < sum(n for _, n in ranges) < 40 << 20
    assert all(at + n <= nxt for (at, n), (nxt, _) in zip(ranges, ranges[1:]))
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "model.safetensors", "wb") as f:  # 80 MiB, sparse: sampled, not read whole
        f.truncate(80 << 20)
    before = checkpoint_fingerprint(big)
    with open(big / "model.safetensors", "r+b") as f:  # a trained tensor in the middle of the file
        f.seek(40 << 20)
        f.write(b"\x01" * (3 << 20))
    assert checkpoint_fingerprint(big) != before


def test_cli_refuses_to_resume_after_the_weights_changed_in_place(monkeypatch, tmp_path, capsys):
    data, out = ocr_tsv(tmp_path / "ocr.tsv", n=4), tmp_path / "out"
    ckpt = fake_cli(monkeypatch, tmp_path, lambda convs: ["x"] * len(convs))
    weights = ckpt / "model.safetensors"
    weights.write_bytes(bytes(64) * 64)
    args = ["eval", "--model", str(ckpt), "--task", "ocrbench", "--data", str(data), "--out", str(out)]
    assert main([*args, "--limit", "2"]) == 0
    with open(weights, "r+b") as f:  # retrained: same shapes and sizes, other values
        f.write(b"\x07" * 64)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds predictions of another run (checkpoint_fingerprint:" in err
    assert "(the checkpoint's config or weights changed since, or a kimivl before 2026-12-06 made them" in err
    assert len(lines(out / "ocrbench.predictions.jsonl")) == 2  # nothing of the other weights was added


def test_paths_read_under_lc_all_c_are_recorded_as_their_text_and_the_results_written(monkeypatch, tmp_path):
    """Under LC_ALL=C without UTF-8 mode argv holds a non-ASCII path as lone surrogates: every row was generated, then
    writing results.json failed ("surrogates not allowed"), and the run record kept the surrogates, so a rerun in a
    UTF-8 locale was refused as another run's predictions. Paths are recorded as their UTF-8 text; a lone surrogate
    left in a reason is written as its escape."""

    def argv(path) -> str:  # as Python reads it under LC_ALL=C
        return os.fsencode(path).decode("ascii", "surrogateescape")

    def answer(convs):
        if any("Word 1?" in str(c) for c in convs):
            raise ValueError(f"{argv(tmp_path)} is unreadable")
        return ["x"] * len(convs)

    (tmp_path / "数据").mkdir()
    data = ocr_tsv(tmp_path / "数据" / "ocr.tsv", n=3)
    with open(data, "a") as f:
        f.write("3\tgone.png\tWord 3?\t['word3']\tRegular\n")  # skipped: its reason names the data's folder
    model, out = fake_cli(monkeypatch, tmp_path, answer).rename(tmp_path / "模型"), tmp_path / "出力"
    args = ["eval", "--task", "ocrbench", "--out"]
    assert main([*args, argv(out), "--model", argv(model), "--data", argv(data)]) == 0
    run = json.loads((out / "ocrbench.run.json").read_text(encoding="utf-8"))
    assert (run["model"], run["data"]) == (str(model), str(data))
    result = json.loads((out / "results.json").read_text(encoding="utf-8"))["ocrbench"]
    assert (result["model"], result["data"]) == (str(model), str(data))
    assert result["predictions"] == str(out / "ocrbench.predictions.jsonl")
    assert result["skipped_rows"][0]["reason"].startswith(
        f"image 'gone.png' is neither a file under {argv(data.parent)}"
    )
    assert result["missing_rows"][0]["reason"] == f"generation failed: {argv(tmp_path)} is unreadable"
    assert lines(out / "ocrbench.scored.jsonl")[1]["failed"] == result["missing_rows"][0]["reason"]
    assert main([*args, str(out), "--model", str(model), "--data", str(data)]) == 0  # resumed in a UTF-8 locale


class FakeModel:
    dtype = torch.bfloat16

    class config:
        class text_config:
            max_position_embeddings = 4096


def fake_cli(monkeypatch, tmp_path, generate_fn):
    import kimivl
    import kimivl.cli

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "config.json").write_text("{}")
    monkeypatch.setattr(kimivl.cli, "_load", lambda path, dtype, device: (FakeModel(), None))
    monkeypatch.setattr(kimivl, "generate", lambda model, processor, convs, max_new_tokens: generate_fn(convs))
    return ckpt


def test_results_name_the_model_data_and_files_by_absolute_paths_as_run_json_does(monkeypatch, tmp_path):
    """``kimivl eval --model m --out ../out`` wrote ``"model": "m"`` and ``"predictions": "../out/..."`` into
    results.json, paths relative to the caller's directory (run.json held them resolved): read from anywhere else, or
    beside results.json, they named other files. A re-scored predictions file given relatively is named so too."""
    tmp_path = tmp_path.resolve()
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    ocr_tsv(work / "ocr.tsv", n=2)
    fake_cli(monkeypatch, work, lambda convs: ["x"] * len(convs))
    monkeypatch.chdir(work)
    assert main(["eval", "--model", "ckpt", "--task", "ocrbench", "--data", "ocr.tsv", "--out", "../out"]) == 0
    run = json.loads((out / "ocrbench.run.json").read_text())
    result = json.loads((out / "results.json").read_text())["ocrbench"]
    assert (
        (result["model"], result["data"]) == (run["model"], run["data"]) == (str(work / "ckpt"), str(work / "ocr.tsv"))
    )
    assert (result["predictions"], result["scores"]) == (
        str(out / "ocrbench.predictions.jsonl"),
        str(out / "ocrbench.scored.jsonl"),
    )
    args = ["--data", "ocr.tsv", "--predictions", "../out/ocrbench.predictions.jsonl", "--out", "../again"]
    assert main(["eval", "--task", "ocrbench", *args]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())["ocrbench"]
    assert (again["model"], again["predictions"]) == (None, str(out / "ocrbench.predictions.jsonl"))


def test_cli_ctrl_c_keeps_predictions_and_says_how_to_resume(monkeypatch, tmp_path, capsys):
    data, out = ocr_tsv(tmp_path / "ocr.tsv", n=6), tmp_path / "out"
    batches = []

    def interrupted(convs):
        if len(batches) == 2:
            raise KeyboardInterrupt
        batches.append(len(convs))
        return ["x"] * len(convs)

    ckpt = fake_cli(monkeypatch, tmp_path, interrupted)
    args = [
        "eval",
        "--model",
        str(ckpt),
        "--task",
        "ocrbench",
        "--data",
        str(data),
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted; 4 predictions of ocrbench kept in" in err and "Rerun the same command" in err
    assert "Traceback" not in err and len(lines(out / "ocrbench.predictions.jsonl")) == 4
    asked = []
    fake_cli(monkeypatch, tmp_path, lambda convs: asked.extend(convs) or ["x"] * len(convs))
    assert main(args) == 0 and len(asked) == 2  # resumed: the 2 rows left
    assert main([*args, "--max-new-tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert "another run (max_new_tokens: 512 before, 64 now)" in err and "--overwrite" in err
    assert main([*args, "--max-new-tokens", "64", "--overwrite"]) == 0 and len(asked) == 8
    batches.clear()  # interrupted under --overwrite: rerunning it as it was would drop what was kept
    fake_cli(monkeypatch, tmp_path, interrupted)
    assert main([*args, "--overwrite"]) == 130
    assert "Rerun the command without --overwrite to resume" in capsys.readouterr().err

    def stopped(path, dtype, device):
        raise KeyboardInterrupt

    monkeypatch.setattr("kimivl.cli._load", stopped)  # Ctrl-C while the model loads
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted; the predictions written so far stay in" in err and "Traceback" not in err


def test_extracted_answers_and_the_scoring_mode_in_the_results(tmp_path, capsys):
    data = ocr_tsv(tmp_path / "ocr.tsv", n=3)
    pred = tmp_path / "judged.jsonl"
    pred.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"index": 0, "prediction": "long rambling answer", "extracted": "word0"},
                {"index": 1, "prediction": "word1"},
                {"index": 2, "prediction": "◁think▷ word2", "extracted": "nope"},
            ]
        )
    )
    for mode, score in (("official", 2000 / 3), ("lenient", 2000 / 3)):
        out = tmp_path / mode
        assert (
            main(
                [
                    "eval",
                    "--task",
                    "ocrbench",
                    "--data",
                    str(data),
                    "--predictions",
                    str(pred),
                    "--out",
                    str(out),
                    *(["--scoring", mode] if mode == "lenient" else []),
                ]
            )
            == 0
        )
        result = json.loads((out / "results.json").read_text())["ocrbench"]
        assert result["scoring"] == mode and result["metrics"]["score"] == pytest.approx(score)
        assert f"{mode} scoring" in capsys.readouterr().out
        assert f"ocrbench {mode}" in (out / "results.md").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"index": 0, "prediction": "x", "extracted": 3}\n')
    assert main(["eval", "--task", "ocrbench", "--data", str(data), "--predictions", str(bad)]) == 2
    assert "optionally a string 'extracted'" in capsys.readouterr().err


def test_progress_bar_shows_the_total_where_known(tmp_path, capsys):
    task = get_task("ocrbench")
    samples = list(task.load(ocr_tsv(tmp_path / "ocr.tsv", n=5)))
    run_task(task, samples, tmp_path / "out", generate_fn=lambda c: ["x"] * len(c), batch_size=2)
    assert "5/5" in capsys.readouterr().err


def test_rule_extraction_is_recorded_where_the_official_pipeline_uses_an_llm(tmp_path):
    """MathVista and MMLongBench-Doc officially extract answers with an LLM; results say how many rows rest on
    kimivl's rules instead, and results.md says those numbers are not comparable."""
    import dataclasses

    from kimivl.eval.report import markdown

    assert get_task("mathvista").llm_extraction and get_task("mmlongbench_doc").llm_extraction
    assert not get_task("ocrbench").llm_extraction
    data = ocr_tsv(tmp_path / "ocr.tsv", n=3)
    task = dataclasses.replace(get_task("ocrbench"), llm_extraction=True)
    pred = tmp_path / "p.jsonl"
    pred.write_text(
        '{"index": 0, "prediction": "x", "extracted": "word0"}\n{"index": 1, "prediction": "word1"}\n'
        '{"index": 2, "prediction": "word2", "extracted": "word2"}\n'
    )
    result = run_task(task, task.load(data), tmp_path / "out", predictions=pred, progress=False)
    assert result["extraction"] == {"given": 2, "rules": 1}
    assert "answers of 1 rows extracted by kimivl's rules" in markdown({"t": result})
    all_given = markdown({"t": {**result, "extraction": {"given": 3, "rules": 0}}})
    assert "extracted by" not in all_given and f": t {result['scoring']}\n" in all_given


def test_update_results_merges_each_task_into_results_json_and_md(tmp_path):
    from kimivl.eval.report import update_results

    update_results(str(tmp_path), "a", {"metrics": {"accuracy": 50.0}, "scored": 2, "answered": 2, "skipped": 0})
    b = {"metrics": {"accuracy": 25.0, "accuracy/x": 10.0}, "scored": 4, "answered": 3, "skipped": 1}
    merged = update_results(str(tmp_path), "b", b)  # a path as text, as a script passes it
    assert list(merged) == ["a", "b"] and json.loads((tmp_path / "results.json").read_text()) == merged
    md = (tmp_path / "results.md").read_text()
    assert "| a | accuracy | 50.0 | 2 | 2 | 0 |\n| b | accuracy | 25.0 | 4 | 3 | 1 |\n" in md
    assert "### b\n\n| metric | value |\n|---|---|\n| accuracy/x | 10.0 |" in md


def test_predictions_holding_line_separators_resume_and_a_bom_or_bad_bytes_are_handled(tmp_path):
    task = get_task("synthetic:ocr")
    rows = list(task.load(task.default_data))
    out = tmp_path / "out"
    run_task(task, rows, out, generate_fn=lambda c: ["3\u2028\u2029\x85"] * len(c), progress=False, limit=4)
    result = run_task(task, rows, out, generate_fn=lambda c: ["3"] * len(c), progress=False, limit=8)  # resumes
    assert result["scored"] == 8 and result["duplicate_predictions"] == 0
    saved = read_predictions(out / "synthetic_ocr.predictions.jsonl")
    assert list(saved.values()) == ["3\u2028\u2029\x85"] * 4 + ["3"] * 4
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"index": 1, "prediction": "a"}\r\n{"index": 2, "prediction": "b"}\r\n')
    assert read_predictions(bom) == {"1": "a", "2": "b"}  # as Windows editors save it
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"index": 1, "prediction": "a"}\n{"index": 2, "prediction": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin.jsonl:2: not UTF-8 \(byte 32 of the line\)"):
        read_predictions(latin)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"index": 1, "prediction": "a"}\n{"index": 2, "prediction": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: invalid JSON .*; expected a JSON object with 'index'"):
        read_predictions(broken)


def test_a_second_eval_into_the_same_out_is_refused_while_the_first_runs(tmp_path):
    task = get_task("synthetic:ocr")
    rows = list(task.load(task.default_data))
    out, refused = tmp_path / "out", []

    def answer_and_start_another(conversations):
        with pytest.raises(EvalError, match=rf"{out} is in use by another run \(pid {os.getpid()} on ") as e:
            run_task(task, rows, out, generate_fn=lambda c: ["9"] * len(c), progress=False, settings={"model": "B"})
        refused.append(e.value)
        return ["3"] * len(conversations)

    settings = {"model": "A"}
    result = run_task(task, rows, out, generate_fn=answer_and_start_another, progress=False, limit=4, settings=settings)
    assert len(refused) == 1 and result["scored"] == 4
    assert list(read_predictions(out / "synthetic_ocr.predictions.jsonl").values()) == ["3"] * 4  # A's answers only
    assert json.loads((out / "synthetic_ocr.run.json").read_text())["model"] == "A"
    again = run_task(task, rows, out, generate_fn=lambda c: ["3"] * len(c), progress=False, limit=6, settings=settings)
    assert again["scored"] == 6  # the lock went with the first run


def test_a_damaged_results_file_stops_the_run_before_any_generation(tmp_path):
    task = get_task("synthetic:ocr")
    out, asked = tmp_path / "out", []
    out.mkdir()
    (out / "results.json").write_text('{"mmmu": {"metrics": {\n')

    def answer(conversations):
        asked.extend(conversations)
        return ["3"] * len(conversations)

    with pytest.raises(ValueError, match=rf"{out / 'results.json'} is damaged \(Expecting property name .*move it"):
        run_task(task, task.load(task.default_data), out, generate_fn=answer, progress=False, limit=4)
    assert asked == []


def test_repeated_indices_in_predictions_are_counted_and_the_first_is_scored(tmp_path, caplog):
    data = ocr_tsv(tmp_path / "ocr.tsv", n=4)
    pred = tmp_path / "p.jsonl"
    answers = [(0, "wrong"), (1, "wrong"), (0, "word0"), (1, "word1"), (2, "word2"), (3, "word3")]
    pred.write_text("".join(json.dumps({"index": i, "prediction": p}) + "\n" for i, p in answers))
    task = get_task("ocrbench")
    with caplog.at_level(logging.WARNING):
        result = run_task(task, task.load(data), tmp_path / "out", predictions=pred, progress=False)
    assert result["duplicate_predictions"] == 2 and result["metrics"]["score"] == 500.0  # 2 of 4 right
    assert "p.jsonl: 2 lines repeat an index of an earlier line and are ignored" in caplog.text
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["ocrbench"]
    assert saved["duplicate_predictions"] == 2


def test_zero_padded_and_float_looking_indices_match_their_rows(tmp_path):
    from kimivl.eval.tables import index_key

    assert [index_key(i) for i in ("000", 0, "007", 7.0, "7.0", "-3", " 12 ")] == ["0", "0", "7", "7", "7", "-3", "12"]
    assert [index_key(i) for i in ("7.5", "text/1024/0/0", "a1", "1e3")] == ["7.5", "text/1024/0/0", "a1", "1e3"]
    data = tmp_path / "ocr.tsv"
    rows = ocr_tsv(tmp_path / "plain.tsv", n=3).read_text().splitlines()
    data.write_text("\n".join([rows[0], *(r.replace(f"{i}\t", f"00{i}\t", 1) for i, r in enumerate(rows[1:]))]) + "\n")
    pred = tmp_path / "p.jsonl"
    answers = [("000", "word0"), (1, "word1"), ("2.0", "word2")]
    pred.write_text("".join(json.dumps({"index": i, "prediction": p}) + "\n" for i, p in answers))
    task = get_task("ocrbench")
    result = run_task(task, task.load(data), tmp_path / "out", predictions=pred, progress=False)
    assert result["answered"] == 3 and result["metrics"]["score"] == 1000.0 and result["unmatched_predictions"] == 0


def test_limit_counts_predictions_past_it_apart_from_unmatched_ones(tmp_path):
    data = ocr_tsv(tmp_path / "ocr.tsv", n=5)
    pred = tmp_path / "p.jsonl"
    pred.write_text("".join(json.dumps({"index": i, "prediction": f"word{i}"}) + "\n" for i in [0, 1, 2, 3, 4, 99]))
    task = get_task("ocrbench")
    limited = run_task(task, task.load(data), tmp_path / "a", predictions=pred, limit=2, progress=False)
    assert (limited["scored"], limited["limit"]) == (2, 2)
    assert limited["unmatched_predictions"] == 0 and limited["beyond_limit_predictions"] == 4
    whole = run_task(task, task.load(data), tmp_path / "b", predictions=pred, progress=False)
    assert (whole["scored"], whole["limit"], whole["unmatched_predictions"], whole["beyond_limit_predictions"]) == (
        5,
        None,
        1,
        0,
    )
    saved = json.loads((tmp_path / "a" / "results.json").read_text())["ocrbench"]
    assert saved["limit"] == 2 and saved["beyond_limit_predictions"] == 4


def test_a_failed_start_leaves_no_run_record_and_no_output_directory(tmp_path):
    from kimivl.data.formats import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"index": 0, "question": "q"\n')
    task = get_task("ocrbench")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="bad.jsonl:1: invalid JSON"):
        run_task(task, task.load(bad), out, generate_fn=lambda c: ["x"] * len(c), settings={"model": "A"})
    assert not out.exists()
    out.mkdir()  # a directory the user made stays, without a record of a run that never started
    with pytest.raises(DataError):
        run_task(task, task.load(bad), out, generate_fn=lambda c: ["x"] * len(c), settings={"model": "A"})
    assert [p.name for p in out.iterdir()] == [".lock"]


def test_cli_checks_every_tasks_data_before_loading_the_model(monkeypatch, tmp_path, capsys):
    data, out = ocr_tsv(tmp_path / "ocr.tsv", n=2), tmp_path / "out"
    ckpt = fake_cli(monkeypatch, tmp_path, lambda convs: ["x"] * len(convs))

    def never(path, dtype, device):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("kimivl.cli._load", never)
    (tmp_path / "empty").mkdir()
    for later, words in (
        (f"mmmu={tmp_path / 'missing.tsv'}", "--data for mmmu: benchmark data not found: "),
        (f"mmmu={tmp_path / 'empty'}", "--data for mmmu: no .tsv, .parquet, .json, .jsonl files under"),
    ):
        args = ["eval", "--model", str(ckpt), "--task", "ocrbench,mmmu", "--data", f"ocrbench={data}", "--data", later]
        assert main([*args, "--out", str(out)]) == 2
        assert words in capsys.readouterr().err
    assert main(["eval", "--model", str(ckpt), "--task", "synthetic", "--data", str(tmp_path / "nope")]) == 2
    assert "--data for synthetic: no such file or directory: " in capsys.readouterr().err
    assert not out.exists()


def test_a_write_the_disk_refuses_names_the_file_and_leaves_the_scores_whole(tmp_path, file_size_limit):
    data, out = ocr_tsv(tmp_path / "ocr.tsv"), tmp_path / "out"
    task = get_task("ocrbench")

    def long(conversations):
        return ["word " * 100] * len(conversations)

    run_task(task, task.load(data), out, generate_fn=long, batch_size=2, progress=False)
    pred, scored = out / "ocrbench.predictions.jsonl", out / "ocrbench.scored.jsonl"
    before = scored.read_text()
    assert len(before) > pred.stat().st_size + 200
    file_size_limit(pred.stat().st_size + 100)  # the predictions fit, the scores do not
    with pytest.raises(OSError, match=r"cannot write .*ocrbench\.scored\.jsonl: File too large"):
        run_task(task, task.load(data), out, generate_fn=long, batch_size=2, progress=False, overwrite=True)
    file_size_limit(1000)
    with pytest.raises(OSError, match=r"cannot write .*ocrbench\.predictions\.jsonl: File too large"):
        run_task(task, task.load(data), out, generate_fn=long, batch_size=2, progress=False, overwrite=True)
    file_size_limit(None)
    assert scored.read_text() == before  # whole, as results.json says


def test_niah_options_are_recorded_for_niah_only_so_other_tasks_resume_without_them(monkeypatch, tmp_path, capsys):
    ckpt, out = fake_cli(monkeypatch, tmp_path, lambda convs: ["3"] * len(convs)), tmp_path / "out"
    base = ["eval", "--model", str(ckpt), "--task", "synthetic:ocr", "--limit", "2", "--out", str(out)]
    assert main([*base, "--lengths", "1k,2k", "--depths", "0,50,100", "--haystack", "text", "--trials", "2"]) == 0
    run = json.loads((out / "synthetic_ocr.run.json").read_text())
    assert not {"lengths", "depths", "haystack", "trials"} & set(run) and run["task"] == "synthetic:ocr"
    capsys.readouterr()
    assert main([*base, "--limit", "4"]) == 0, capsys.readouterr().err  # the same run, without the NIAH options
    assert json.loads((out / "results.json").read_text())["synthetic:ocr"]["scored"] == 4
    assert len(lines(out / "synthetic_ocr.predictions.jsonl")) == 4


def test_an_unknown_synthetic_task_is_refused_before_the_model_loads(monkeypatch, tmp_path, capsys):
    ckpt = fake_cli(monkeypatch, tmp_path, lambda convs: ["3"] * len(convs))

    def never(path, dtype, device):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("kimivl.cli._load", never)
    out = tmp_path / "out"
    assert main(["eval", "--model", str(ckpt), "--task", "synthetic:ocr,synthetic:foo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown synthetic task 'foo'" in err and "holds: caption, chart, gui, interleaved, ocr" in err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--lengths", "--depths"])
@pytest.mark.parametrize("value", [",", "", " , "])
def test_an_empty_list_of_lengths_or_depths_is_refused_not_the_default(flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--task", "niah", "--predictions", "p.jsonl", flag, value])
    assert stop.value.code == 2
    assert f"argument {flag}: {value!r} holds no number; give one or more, comma-separated" in capsys.readouterr().err


@pytest.mark.parametrize("entry", ["5", "null", "[1, 2]", '"done"'])
def test_a_results_entry_that_is_not_an_object_stops_the_run_before_any_generation(tmp_path, entry):
    task = get_task("synthetic:ocr")
    out, asked = tmp_path / "out", []
    out.mkdir()
    damaged = f'{{"mmmu": {{"metrics": {{}}}}, "ocrbench": {entry}}}\n'
    (out / "results.json").write_text(damaged)

    def answer(conversations):
        asked.extend(conversations)
        return ["3"] * len(conversations)

    words = rf"{out / 'results.json'} is damaged \(the entry of 'ocrbench' is {re.escape(entry)}, not an object\)"
    with pytest.raises(ValueError, match=words):
        run_task(task, task.load(task.default_data), out, generate_fn=answer, progress=False, limit=4)
    assert asked == [] and (out / "results.json").read_text() == damaged


def test_rows_without_a_prediction_are_counted_as_missing_not_as_skipped(tmp_path, capsys):
    """Rows a predictions file lacks are scored (as empty answers) and were counted and listed as "skipped" beside the
    malformed rows, which are not scored, with their indices now an int, now a string; each has its own count and
    list, every index a string."""
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (255, 255, 255)).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    rows = [
        {"index": str(i), "question": f"Pick {i}", "A": "x", "B": "y", "answer": "Z" if i == 7 else "A", "image": image}
        for i in range(8)
    ]
    data = tmp_path / "MMMU_DEV_VAL.tsv"
    with open(data, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps({"index": i, "prediction": "A"}) + "\n" for i in (0, 1, 2, 3, 6, 7)))
    out = tmp_path / "out"
    assert main(["eval", "--task", "mmmu", "--data", str(data), "--predictions", str(pred), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "(scored 7 rows: 5 answered, 2 missing and scored as empty answers; 1 skipped as malformed; official "
        "scoring)" in printed
    )
    assert "  missing 4: no prediction\n  missing 5: no prediction\n  skipped 7: " in printed
    result = json.loads((out / "results.json").read_text())["mmmu"]
    assert (result["scored"], result["answered"], result["missing"], result["skipped"]) == (7, 5, 2, 1)
    assert result["missing_rows"] == [{"index": i, "reason": "no prediction"} for i in ("4", "5")]
    [skipped] = result["skipped_rows"]
    assert skipped["index"] == "7" and "option letters" in skipped["reason"]


def test_data_given_twice_or_for_a_task_not_run_is_refused(tmp_path, capsys):
    """``--data mmmu=A --data mmmu=B`` silently used B; with one task, ``--data ocrbench=X`` for ``--task mmmu`` was
    taken whole as a path ("benchmark data not found: ocrbench=X"). A path holding '=' still reads as a path."""
    data = ocr_tsv(tmp_path / "ocr.tsv", n=2)
    pred = tmp_path / "p.jsonl"
    pred.write_text('{"index": 0, "prediction": "word0"}\n')
    rescore = ["eval", "--predictions", str(pred), "--out", str(tmp_path / "out")]
    for task, given, words in (
        ("ocrbench", [f"ocrbench={data}", f"ocrbench={tmp_path / 'B.tsv'}"], "--data gives task ocrbench two files, "),
        ("ocrbench", [str(data), f"ocrbench={data}"], "--data gives task ocrbench two files, "),
        ("mmmu", [f"ocrbench={data}"], f"--data ocrbench={data}: task ocrbench is not among --task mmmu; add it"),
        ("ocrbench", [f"synthetic:count={data}"], "task synthetic:count is not among --task ocrbench"),
        # an empty path loaded the model, then failed in the loader with a TypeError
        ("ocrbench", ["ocrbench="], "--data 'ocrbench=' gives no file"),
        ("ocrbench", [""], "--data '' gives no file"),
        ("ocrbench,mmmu", [f"unknown={data}"], "TASK=FILE, TASK one of ocrbench, mmmu"),
    ):
        assert main([*rescore, "--task", task, *(x for d in given for x in ("--data", d))]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "a=b").mkdir()
    odd = ocr_tsv(tmp_path / "a=b" / "ocr=1.tsv", n=2)  # '=' in a path, with no task's name before it
    for spec in (str(odd), f"ocrbench={odd}"):
        assert main([*rescore, "--task", "ocrbench", "--data", spec]) == 0
        assert "ocrbench: score=500.0  (scored 2 rows: 1 answered, 1 missing" in capsys.readouterr().out


def test_a_task_whose_rows_were_all_missing_is_scored_not_failed(tmp_path, capsys):
    """No row has a prediction: each is scored as an empty answer, 0 answered of 2 scored, a score of 0 to publish
    (exit 0); only a task with no row scored at all fails the command."""
    data, pred, out = ocr_tsv(tmp_path / "ocr.tsv", n=2), tmp_path / "p.jsonl", tmp_path / "out"
    pred.write_text('{"index": 99, "prediction": "word0"}\n')  # no row of the data has this index
    assert main(["eval", "--predictions", str(pred), "--out", str(out), "--task", "ocrbench", "--data", str(data)]) == 0
    assert "ocrbench: score=0.0  (scored 2 rows: 0 answered, 2 missing" in capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())["ocrbench"]
    assert (result["scored"], result["answered"], result["missing"], result["metrics"]["score"]) == (2, 0, 2, 0)


def test_a_task_that_scored_no_rows_fails_the_command_after_the_others_ran(monkeypatch, tmp_path, capsys):
    """Every row of mmmu malformed: it scored 0 rows with metrics {}, and eval exited 0 (CI published it)."""
    data, bad, out = ocr_tsv(tmp_path / "ocr.tsv", n=2), tmp_path / "bad.tsv", tmp_path / "out"
    bad.write_text("index\tquestion\n0\thello\n")
    ckpt = fake_cli(monkeypatch, tmp_path, lambda convs: ["word0"] * len(convs))
    args = [
        "eval",
        "--model",
        str(ckpt),
        "--task",
        "mmmu,ocrbench",
        "--data",
        f"mmmu={bad}",
        "--data",
        f"ocrbench={data}",
    ]
    assert main([*args, "--out", str(out)]) == 1
    results = json.loads((out / "results.json").read_text())
    assert results["mmmu"]["scored"] == 0 and results["mmmu"]["skipped"] == 1 and results["mmmu"]["metrics"] == {}
    assert results["ocrbench"]["scored"] == 2 and results["ocrbench"]["metrics"]["score"] == pytest.approx(500)
    captured = capsys.readouterr()
    assert "ocrbench: score=500.0" in captured.out and f"results: {out}/results.json" in captured.out
    assert captured.err.splitlines()[-1].startswith("kimivl eval: error: mmmu scored 0 rows")


def test_a_task_of_ones_own_with_a_scorer_the_runner_cannot_use_is_named_before_generating(tmp_path):
    """A ``score(prediction, meta)`` (the old annotation) failed with 'unexpected keyword argument mode', and one
    returning a float with "'float' object is not a mapping", both as tracebacks once every row was generated."""
    from kimivl.eval.tables import Sample
    from kimivl.eval.tasks import Task

    def load(data, **_):
        yield Sample("0", [{"role": "user", "content": "Say yes."}], {"gold": "yes"})

    with pytest.raises(TypeError, match=r"task 'mine': score is called as score\(prediction, meta, mode=, extra"):
        Task("mine", load, lambda prediction, meta: {"score": 1.0})
    task = Task("mine", load, lambda prediction, meta, mode, extracted: float(prediction == meta["gold"]))
    (tmp_path / "p.jsonl").write_text('{"index": "0", "prediction": "yes"}\n')
    with pytest.raises(TypeError, match=r"task 'mine': score returned 1.0, not a dict with a 'score'"):
        run_task(task, load(None), tmp_path / "out", predictions=tmp_path / "p.jsonl", progress=False)
    task = Task("mine", load, lambda prediction, meta, **_: {"correct": prediction == meta["gold"]})
    with pytest.raises(TypeError, match=r"task 'mine': score returned \{'correct': True\}, not a dict with a 'score'"):
        run_task(task, load(None), tmp_path / "out", predictions=tmp_path / "p.jsonl", progress=False)
    task = Task("mine", load, lambda prediction, meta, **_: {"score": float(prediction == meta["gold"])})
    result = run_task(task, load(None), tmp_path / "ok", predictions=tmp_path / "p.jsonl", progress=False)
    assert result["metrics"]["accuracy"] == 100.0 and result["scored"] == 1  # accuracy in percent


def test_control_characters_and_pipes_from_the_data_are_escaped_in_what_is_printed_and_tabled(tmp_path, capsys, caplog):
    """A row's index or group reached the terminal and results.md raw: an escape sequence could clear the screen and
    print fake results, a group name with a | and a line break add cells and a heading to the table."""
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (255, 255, 255)).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    data = tmp_path / "OCRBench.tsv"
    with open(data, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["index", "image", "question", "answer", "category"], delimiter="\t")
        w.writeheader()
        row = {"image": image, "question": "q"}
        w.writerow({**row, "index": "0", "answer": "['a']", "category": "Text | 100.0 |\n# x"})
        w.writerow({**row, "index": "\x1b[2J", "answer": "[]", "category": "Regular"})
    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps({"index": 0, "prediction": "b"}) + "\n")
    out = tmp_path / "out"
    argv = ["eval", "--task", "ocrbench", "--data", str(data), "--predictions", str(pred), "--out", str(out)]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "\x1b" not in printed + caplog.text and "skipped \\x1b[2J: " in printed
    table = (out / "results.md").read_text()
    assert "\n# x" not in table and "Text \\| 100.0 \\|\\n# x | 0.0 |" in table
    from kimivl.terminal import printable  # other text stays as it is: scripts' spaces, joiners, new emoji

    kept = "中文\u3000问题 👩\u200d💻 x\xa0y \U0001fae8"
    assert printable(kept + " a\tb") == kept + " a\\tb"
    assert printable("\x1b[2J\u2028\u202e\x85") == "\\x1b[2J\\u2028\\u202e\\x85"


def test_an_out_folder_that_cannot_be_made_is_named(tmp_path, unprivileged):
    """On a read-only disk ``kimivl eval --out ro/new`` printed a bare "[Errno 30] Read-only file system"."""
    (tmp_path / "ro").mkdir(mode=0o555)

    def make():
        with _made_dir(tmp_path / "ro" / "evout"):
            pass

    with pytest.raises(WriteError, match=r"cannot write .*/ro/evout: Permission denied"):
        unprivileged(make)
