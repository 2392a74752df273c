"""benchmarks/rl_signal.py: the recipes it derives for each arm and seed, and its reward-curve summary."""

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kimivl.train.recipe import load_recipe
from kimivl.train.stages.rl import rl_config

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("rl_signal", ROOT / "benchmarks" / "rl_signal.py")
rl_signal = importlib.util.module_from_spec(spec)
sys.path.insert(0, str(ROOT / "benchmarks"))  # the helpers it imports, as when it runs
spec.loader.exec_module(rl_signal)
sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.parametrize("arm", list(rl_signal.ARMS))
def test_each_arm_and_seed_gets_its_recipe_with_the_evaluation_on_the_fresh_problems(arm, tmp_path):
    model = tmp_path / "start"
    args = argparse.Namespace(out=tmp_path, model=model, fresh=500, steps=None, problems=None, samples=8, priority=None)
    out = tmp_path / f"{arm}-s2"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rl_signal.derived_recipe(args, arm, 2, out)))
    recipe = load_recipe(tmp_path / "r.yaml")
    shipped = load_recipe(ROOT / "recipes" / rl_signal.ARMS[arm])
    assert recipe.seed == 2 and recipe.out == out and recipe.world is None
    assert recipe.base == {"checkpoint": str(model)}  # --model, not the shipped recipe's models/kimivl-tiny
    assert recipe.source_path("reasoning") == tmp_path / "world" / "train" / "reasoning.jsonl"
    assert recipe.eval == {"base": True, "after": ["rl"], "split": str(tmp_path / "fresh" / "heldout"), "limit": 500,
                           "max_new_tokens": 160}  # fmt: skip
    # never over models/; the shipped recipe's sampling (the thinking model's) goes with the arm's model
    assert recipe.export == {**(shipped.export or {"dtype": "bfloat16"}), "path": str(out / "model")}
    # the shipped recipe's RL settings, with the seed
    assert rl_config(recipe, recipe.stages[0]) == dataclasses.replace(rl_config(shipped, shipped.stages[0]), seed=2)
    args.steps, args.priority = 12, "failure"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rl_signal.derived_recipe(args, arm, 2, out)))
    cfg = rl_config(load_recipe(tmp_path / "r.yaml"), load_recipe(tmp_path / "r.yaml").stages[0])
    assert (cfg.iterations, cfg.priority) == (12, "failure")


def test_a_command_may_name_paths(tmp_path, capsys):
    """The pass@k command passed --model as a Path: " ".join failed at step 2 of every run of the script."""
    rl_signal.run(["-c", "import sys; open(sys.argv[1], 'w').write('ran')", tmp_path / "out"])
    assert (tmp_path / "out").read_text() == "ran" and "+ -c import sys" in capsys.readouterr().out


def test_curve_summary_means_each_quarter(tmp_path):
    rows = [
        {"step": i, "reward": i / 10, "accuracy": 0.5, "mean_length": 60 - i, "all_correct": 0, "all_wrong": i % 2}
        for i in range(8)
    ]
    rows.insert(3, {"step": 3, "loss": 1.0})  # rows without a reward (other stages) are not iterations
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = rl_signal.curve_summary(tmp_path)
    assert c["reward"] == pytest.approx((0.05, 0.25, 0.45, 0.65)) and c["mean_length"][::3] == (59.5, 53.5)
    assert c["all_wrong"] == (0.5,) * 4 and c["accuracy"] == (0.5,) * 4
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    with pytest.raises(ValueError, match="has 3 RL iterations; a summary by quarter needs 4"):
        rl_signal.curve_summary(tmp_path)


def test_steps_below_what_the_recipes_can_run_are_refused_and_zero_is_not_the_default(tmp_path):
    assert rl_signal.least_steps(list(rl_signal.ARMS)) == 5  # warm-up 4 must be below the steps
    args = argparse.Namespace(out=tmp_path, model=tmp_path, fresh=5, steps=0, problems=None, samples=8, priority=None)
    assert rl_signal.derived_recipe(args, "grpo", 0, tmp_path)["stages"][0]["steps"] == 0
    cmd = [sys.executable, str(ROOT / "benchmarks" / "rl_signal.py"), "--out", str(tmp_path / "o"), "--steps", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "--steps 4: at least 5" in done.stderr
    cmd[-2:] = ["--model", "nowhere"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and f"--model {tmp_path / 'nowhere'}: no checkpoint there" in done.stderr
    assert not (tmp_path / "o").exists()  # refused before any work


def test_a_run_into_an_out_made_with_other_settings_is_refused(tmp_path, capsys):
    """A second run into the same --out with --fresh 6 (the first had 4) reported the first run's pass@k and runs."""
    ap = argparse.ArgumentParser()
    settings = {"fresh": 4, "fresh_seed": 7, "steps": None, "problems": 2, "samples": 2, "priority": None}
    args = argparse.Namespace(out=tmp_path / "o", model=tmp_path / "m", **settings)
    rl_signal.check_settings(ap, args)
    assert json.loads((tmp_path / "o" / "settings.json").read_text()) == {"model": str(tmp_path / "m"), **settings}
    rl_signal.check_settings(ap, args)  # the same settings: the run goes on where the last one stopped
    args.fresh, args.steps = 6, 12
    with pytest.raises(SystemExit) as stopped:
        rl_signal.check_settings(ap, args)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and f"--out {tmp_path / 'o'} holds results made with other settings" in err
    assert "(--fresh 4 then, 6 now; --steps the default then, 12 now)" in err
    assert "give another --out, or remove that one to start over" in err


def test_building_the_problems_says_so_and_shows_a_bar(tmp_path, monkeypatch, capsys):
    """The script built its 4,100 + 500 problems with no bar and no word: 40-60 s of silence before its first line.
    Here the worlds have 3 problems a split, and the run stops at its first child."""

    class Stopped(Exception):
        pass

    def stop(argv):
        raise Stopped

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.setattr(rl_signal, "WORLD", {"train": 3, "heldout": 3}, raising=False)
    monkeypatch.setattr(rl_signal, "run", stop)
    out = tmp_path / "o"
    argv = ["--out", str(out), "--model", str(tmp_path / "m"), "--seeds", "0", "--arms", "opmd-len", "--no-passk"]
    monkeypatch.setattr(sys, "argv", ["rl_signal.py", *argv, "--fresh", "3"])
    with pytest.raises(Stopped):
        rl_signal.main()
    said = capsys.readouterr()
    assert f"building the problems RL trains on under {out / 'world'}" in said.out, said.out
    assert f"building the fresh problems under {out / 'fresh'}" in said.out, said.out
    assert said.err.count("world: 100%") == 2 and "6/6" in said.err and "3/3" in said.err, said.err
    with pytest.raises(Stopped):  # built: nothing to say
        rl_signal.main()
    said = capsys.readouterr()
    assert "building" not in said.out and "world:" not in said.err, said


def test_compare_md_shows_the_pass_at_k_table(tmp_path):
    """compare.md held passk's whole JSON (its per-problem counts too) in a code span, not the table."""
    from kimivl.rl.passk import format_table, summarise

    table = summarise(["easy", "easy", "hard"], [2, 0, 1], 2, [1, 2])  # correct answers of 2 samples each
    (tmp_path / "base.json").write_text(json.dumps({"settings": {}, "table": table, "correct": [2, 0, 1]}))
    shown = rl_signal.passk_table(tmp_path / "base.json")
    assert shown == format_table(table, [1, 2]) and shown.splitlines()[0].startswith("| difficulty | problems | pass@1")
    assert "correct" not in shown
