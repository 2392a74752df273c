"""The record of what a recipe's BPE was trained on (``out/tokenizer/trained_with.json``): ``answers_only`` is part of
it, a sharded run's initial weights count as trained with the tokenizer, and a plan writes nothing."""

import json

import pytest
import yaml
from test_pipeline import data_dir, recipe_dict  # noqa: F401 (data_dir: a fixture)

from kimivl.cli import main
from kimivl.data.formats import write_records
from kimivl.train import pipeline
from kimivl.train.pipeline import TOKENIZER_RECORD, Sources, begun, run_recipe
from kimivl.train.recipe import RecipeError, load_recipe


def _recipe(data_dir, tmp_path, answers_only: bool, vocab: int = 280) -> None:  # noqa: F811
    """r.yaml: one stage of one step over the text source and a source of thinking answers (the colour source too)."""
    cot = []
    for a in range(4):
        turns = [{"role": "user", "content": f"What is {a} + {a}?"}]
        turns.append({"role": "assistant", "content": f"◁think▷{a} and {a} make {2 * a}◁/think▷{2 * a}"})
        cot.append({"messages": turns})
    write_records(tmp_path / "cot.jsonl", cot)
    d = recipe_dict(data_dir, tmp_path / "run")
    d["tokenizer"] = {"train_vocab": vocab}
    d["sources"]["cot"] = {"path": str(tmp_path / "cot.jsonl"), "answers_only": answers_only}
    d["stages"], d["schedule"] = [{**d["stages"][3], "steps": 1, "accum": 1, "mix": {"text": 1, "cot": 1}}], {}
    del d["export"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))


def test_a_resume_with_answers_only_toggled_is_refused_by_the_tokenizers_record(
    data_dir,  # noqa: F811
    tmp_path,
    capsys,
):
    """The BPE read the source's answers alone, or its thinking too: a run trained with one is not resumed with the
    other."""
    _recipe(data_dir, tmp_path, answers_only=False)
    assert main(["train", str(tmp_path / "r.yaml")]) == 0
    record = json.loads((tmp_path / "run" / "tokenizer" / TOKENIZER_RECORD).read_text())
    assert record["sources"]["cot"]["answers_only"] is False
    _recipe(data_dir, tmp_path, answers_only=True)
    capsys.readouterr()
    assert main(["train", str(tmp_path / "r.yaml"), "--resume"]) == 2
    assert (
        "run/tokenizer was trained on other records than the recipe's sources hold now (cot: answers_only False "
        "then, True now)" in capsys.readouterr().err
    )


def test_a_sharded_runs_initial_weights_keep_the_tokenizer_they_were_sized_to(data_dir, tmp_path):  # noqa: F811
    """A sharded run writes ``initial`` (weights drawn for the tokenizer's vocabulary) before any checkpoint: another
    train_vocab then is refused, not trained anew under those weights."""

    def tokenizer(vocab: int):
        _recipe(data_dir, tmp_path, answers_only=True, vocab=vocab)
        recipe = load_recipe(tmp_path / "r.yaml")
        return pipeline.recipe_tokenizer(recipe, Sources(recipe), None)

    assert tokenizer(280).n_ranks == 280
    (tmp_path / "run" / "initial").mkdir()
    assert not begun(tmp_path / "run")
    (tmp_path / "run" / "initial" / "config.json").write_text("{}")
    assert begun(tmp_path / "run")
    with pytest.raises(RecipeError, match=r"run/tokenizer was trained with train_vocab 280, not 290"):
        tokenizer(290)


def test_a_plan_does_not_record_a_tokenizer_saved_without_a_record(data_dir, tmp_path, capsys):  # noqa: F811
    """A run keeps a tokenizer saved before kimivl recorded what it was trained on, and records it; ``--plan`` (which
    writes nothing) keeps it too, unrecorded."""
    _recipe(data_dir, tmp_path, answers_only=True)
    run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    record = tmp_path / "run" / "tokenizer" / TOKENIZER_RECORD
    record.unlink()  # as a kimivl before the record left it
    assert main(["train", str(tmp_path / "r.yaml"), "--plan"]) == 0
    said = capsys.readouterr()
    assert "stage cooldown: about 4 samples" in said.out and "holds no record of what it was trained on" in said.err
    assert not record.exists()
    recipe = load_recipe(tmp_path / "r.yaml")
    pipeline.recipe_tokenizer(recipe, Sources(recipe), None)  # the run's
    assert json.loads(record.read_text())["sources"]["cot"]["answers_only"] is True
