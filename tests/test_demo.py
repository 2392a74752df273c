"""kimivl demo on a saved checkpoint and the bundled held-out examples."""

from kimivl.cli import main
from kimivl.data.subset import copy_subset
from kimivl.demo import DEFAULT_EXAMPLES, run_demo
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
    assert out.count("--- ") == 7 and "held-out accuracy (14 questions" in out
    assert all(0.0 <= a <= 1.0 for a in accuracy.values())


def test_demo_without_a_model_says_how_to_get_one(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path)]) == 2
    assert "kimivl train recipes/tiny.yaml" in capsys.readouterr().err
