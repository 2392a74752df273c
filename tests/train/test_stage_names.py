"""A stage's name is its folder under ``out``: the edges of what is taken (100 characters, Windows' device names
com1-com9 and lpt1-lpt9 with or without a suffix, in any letter case), and the names of the run's own files."""

import json

import pytest

from kimivl.train.recipe import RecipeError, load_recipe


def _load(tmp_path, name):
    stage = {"name": name, "kind": "joint", "steps": 4, "lr": 1e-3, "mix": {"t": 1}}
    recipe = {
        "name": "r",
        "out": str(tmp_path / "run"),
        "sources": {"t": "t.jsonl"},
        "tokenizer": {"train_vocab": 300},
        "stages": [stage],
    }
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    return load_recipe(tmp_path / "r.yaml")


@pytest.mark.parametrize("name", ["com1", "COM9", "lpt1", "LPT9.x", "a" * 101])
def test_a_device_name_or_a_name_over_100_characters_is_refused(tmp_path, name):
    with pytest.raises(RecipeError, match=f"stage name '{name}': use letters"):
        _load(tmp_path, name)


@pytest.mark.parametrize("name", ["com10", "com0", "lpt10.x", "a" * 100, "a", "b" * 99 + "-"])
def test_names_next_to_the_refused_ones_are_taken(tmp_path, name):
    assert [s.name for s in _load(tmp_path, name).stages] == [name]


@pytest.mark.parametrize("name", ["seed.json", "metrics.jsonl", "Curves.PNG", "initial"])
def test_the_name_of_a_file_or_folder_of_the_run_itself_is_refused(tmp_path, name):
    """They passed every check, and the run failed after training ("Not a directory: .../seed.json/checkpoints"; a
    stage named curves.png made every resume fail when the curves were drawn, the export never written)."""
    with pytest.raises(RecipeError, match=f"stage name '{name}': use letters"):
        _load(tmp_path, name)
