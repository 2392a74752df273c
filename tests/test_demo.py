"""kimivl demo on a saved checkpoint and the bundled held-out examples."""

import json
import re
from pathlib import Path

import kimivl.demo
from kimivl.cli import main
from kimivl.data.subset import copy_subset
from kimivl.demo import DEFAULT_EXAMPLES, NOT_SHIPPED, run_demo, shipped
from kimivl.eval.synthetic import heldout_records


def test_bundled_examples_cover_every_task():
    records = heldout_records(DEFAULT_EXAMPLES)
    tasks = {r["meta"]["task"] for r in records}
    assert tasks == {"caption", "ocr", "chart", "gui", "video", "reasoning", "interleaved"}
    assert all(sum(r["meta"]["task"] == t for r in records) == 20 for t in tasks)


def test_demo_runs_and_reports_accuracy(small_model, small_processor, tmp_path, capsys):
    small_model.save_pretrained(tmp_path / "model")
    small_processor.save_pretrained(tmp_path / "model")
    assert copy_subset(DEFAULT_EXAMPLES, tmp_path / "ex", per_task=2) == 14
    accuracy = run_demo(tmp_path / "model", tmp_path / "ex", max_new_tokens=4, progress=False)
    out = capsys.readouterr().out
    assert set(accuracy) == {"caption", "ocr", "chart", "gui", "video", "reasoning", "interleaved", "all"}
    assert out.startswith(f"model from {tmp_path / 'model'}: ")  # the model's name, whichever (not kimivl-tiny's)
    assert out.count("--- ") == 7 and "held-out accuracy (14 questions" in out
    assert all(0.0 <= a <= 1.0 for a in accuracy.values())
    # each task's first question with its images (the interleaved one has two, the video's frames none), and n per task
    assert "\n--- interleaved: [2 image/video parts] The word green" in out
    assert out.count("\n    image: ") == 7 and "/ex/media/interleaved_interleaved_000000_1.png\n" in out
    assert re.findall(r"\(n=(\d+)\)", out) == ["2"] * 7 + ["14"]


def test_demo_without_a_model_says_how_to_get_one(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"no model at {tmp_path} (no config.json): pass --model" in err and NOT_SHIPPED not in err


def test_an_install_without_the_clone_says_where_the_shipped_files_are(tmp_path, monkeypatch, capsys):
    """A wheel holds no models/ or examples/: the defaults then point at nothing, and every command says why."""
    monkeypatch.chdir(tmp_path)
    assert shipped("models/kimivl-tiny") == Path(kimivl.__file__).parents[1] / "models" / "kimivl-tiny"
    (tmp_path / "only-here").mkdir()  # absent beside the package, present in the current directory (a clone's root)
    assert shipped("only-here") == tmp_path / "only-here"
    assert shipped("nowhere") == Path(kimivl.__file__).parents[1] / "nowhere"
    monkeypatch.setattr(kimivl.demo, "DEFAULT_MODEL", tmp_path / "site-packages" / "models" / "kimivl-tiny")
    monkeypatch.setattr(kimivl.demo, "DEFAULT_EXAMPLES", tmp_path / "site-packages" / "examples" / "heldout")
    for argv in (["demo"], ["chat", "hi"], ["eval", "--task", "synthetic", "--model", str(kimivl.demo.DEFAULT_MODEL)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and NOT_SHIPPED in err, err


def test_the_examples_question_and_the_models_reasoning_print_their_escapes(
    small_model, small_processor, tmp_path, monkeypatch, capsys
):
    """A held-out file's question and the model's reasoning were printed raw (the answer, repr-quoted, was escaped):
    a data file, or a model steered by it, could clear the screen, set the clipboard (OSC 52) or overwrite a line."""
    small_model.save_pretrained(tmp_path / "model")
    small_processor.save_pretrained(tmp_path / "model")
    (tmp_path / "ex").mkdir()
    record = heldout_records(DEFAULT_EXAMPLES)[0]
    record["messages"][0]["content"][-1]["text"] = "Solve\x1b[2J\x1b]52;c;cHduZWQ=\x07 it.\r\u202e"
    record["meta"]["task"], record["meta"]["gold"] = "reasoning", 35
    (tmp_path / "ex" / "reasoning.jsonl").write_text(json.dumps(record) + "\n")
    # the model answers with a reasoning of escapes, as a prompt-injected one might
    answer = "\u25c1think\u25b7\x1b[2J\x08x\u25c1/think\u25b735"
    monkeypatch.setattr(
        "kimivl.inference.chat.generate", lambda model, processor, prompts, **kw: [answer] * len(prompts)
    )
    run_demo(tmp_path / "model", tmp_path / "ex", progress=False)
    out = capsys.readouterr().out
    assert "--- reasoning: [1 image/video part] Solve\\x1b[2J\\x1b]52;c;cHduZWQ=\\x07 it.\\r\\u202e\n" in out, out
    assert "    reasoning: \\x1b[2J\\x08x\n    answer: '35'   gold: 35   correct\n" in out, out
    assert not any(c in out for c in "\x1b\x07\x08\r\u202e"), out


def test_a_question_of_text_alone_is_shown(small_model, small_processor, tmp_path, monkeypatch, capsys):
    """A held-out record's content may be a string, no list of parts: it has no images to list."""
    small_model.save_pretrained(tmp_path / "model")
    small_processor.save_pretrained(tmp_path / "model")
    (tmp_path / "ex").mkdir()
    record = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "meta": {"task": "reasoning", "gold": 5}}
    (tmp_path / "ex" / "reasoning.jsonl").write_text(json.dumps(record) + "\n")
    monkeypatch.setattr("kimivl.inference.chat.generate", lambda model, processor, prompts, **kw: ["5"] * len(prompts))
    assert run_demo(tmp_path / "model", tmp_path / "ex", progress=False) == {"reasoning": 1.0, "all": 1.0}
    out = capsys.readouterr().out
    assert "--- reasoning: [0 image/video parts] What is 2 + 3?\n    answer: '5'   gold: 5   correct\n" in out, out
