"""What ``kimivl train`` says when Ctrl-C stops a run between training steps: the finished stages kept, and how to
resume."""

import yaml
from test_pipeline import data_dir, recipe_dict  # noqa: F401 (data_dir: a fixture)

from kimivl.cli import main
from kimivl.train import pipeline


def test_ctrl_c_after_a_runs_only_stage_names_it_kept(data_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    recipe = recipe_dict(data_dir, tmp_path / "out")
    recipe["stages"], recipe["schedule"] = [{**recipe["stages"][1], "steps": 1}], {}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_export", interrupted)
    assert main(["train", str(tmp_path / "r.yaml")]) == 130
    assert capsys.readouterr().err.splitlines()[-2:] == [
        f"kimivl train: interrupted; finished stage align kept under {tmp_path / 'out'}; a stage under way resumes "
        "from its last checkpoint",
        f"resume with: kimivl train {tmp_path / 'r.yaml'} --resume",
    ]
