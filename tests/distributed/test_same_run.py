"""Ranks launched with different recipes or flags stop before anything runs, every one naming what differs (a rank
with another lr or --seed trained silently wrong; another --ep stopped mid-step with a gloo size mismatch)."""

import json

import pytest
import torch
import yaml

from kimivl.distributed.same_run import check_same_run, run_settings
from kimivl.distributed.world import World
from kimivl.train.recipe import RecipeError, load_recipe
from tests.distributed.test_sharded_training import run

RANK_1_DIFFERS = """
import os, pathlib, sys, time
from kimivl.cli import main
args = sys.argv[1:]
if os.environ["RANK"] == "1":
    args = [a.replace("a.yaml", "b.yaml") for a in args] + ["--seed", "1", "--ep", "2"]
code = main(args)
sys.stderr.flush()
here = pathlib.Path(args[1]).parent  # each rank waits for the other's message: torchrun ends the others on a failure
(here / f"done{os.environ['RANK']}").touch()
for _ in range(300):
    if all((here / f"done{r}").exists() for r in range(2)):
        break
    time.sleep(0.1)
sys.exit(code)
"""


def recipe(tmp_path, lr: float) -> dict:
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(8)))
    return {
        "name": "r",
        "out": str(tmp_path / "run"),
        "base": {"preset": "tiny"},
        "tokenizer": {"train_vocab": 280},
        "sources": {"text": str(tmp_path / "text.jsonl")},
        "stages": [{"name": "s", "kind": "joint", "steps": 2, "lr": lr, "budget": 64, "accum": 2, "mix": {"text": 1}}],
    }


def test_ranks_with_another_lr_seed_and_ep_stop_naming_them(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(recipe(tmp_path, 1e-3)))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(recipe(tmp_path, 2e-3)))
    (tmp_path / "launch.py").write_text(RANK_1_DIFFERS)
    done = run([str(tmp_path / "launch.py"), "train", str(tmp_path / "a.yaml")], 2)
    assert done.returncode != 0
    said = "kimivl train: error: the ranks were launched with different recipes or flags ("
    assert done.stderr.count(said) == 2, done.stderr[-3000:]  # every rank stops, saying why
    for part in (
        "stage s: lr: 0.001 on rank 0 vs 0.002 on rank 1",
        "seed: 0 on rank 0 vs 1 on rank 1",
        "ep: 1 on rank 0 vs 2 on rank 1",
    ):
        assert done.stderr.count(part) == 2, part
    assert not (tmp_path / "run" / "s").exists()  # before anything ran


def test_the_refusal_names_five_settings_each_value_shortened_and_its_ranks(tmp_path):
    """Six ranks, rank 5 launched with 6 other settings (one it lacks): the first 5 named, values over 40 characters
    cut to 37 and "...", at most 4 ranks listed by number."""
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(recipe(tmp_path, 1e-3)))
    world = World(mesh=object())  # sharded: its gather hands back the six ranks' settings below
    every = [run_settings(load_recipe(tmp_path / "a.yaml"), World()) for _ in range(6)]
    forty, longer = json.dumps("x" * 38), json.dumps("y" * 39)
    assert (len(forty), len(longer)) == (40, 41)
    every[0]["name"] = forty
    every[5] |= {"seed": "1", "stage s: lr": "0.002", "name": longer, "device": '"cuda"', "bf16": "true"}
    del every[5]["ep"]
    world.gather = lambda settings: every
    with pytest.raises(RecipeError) as e:
        check_same_run(load_recipe(tmp_path / "a.yaml"), world)
    named = str(e.value).split("(", 1)[1].rsplit(")", 1)[0]
    assert named == (
        f'name: {forty} on rank 0 vs "r" on ranks 1, 2, 3, 4 vs "{"y" * 36}... on rank 5; '
        "stage s: lr: 0.001 on ranks 0, 1, 2, 3 and 1 more vs 0.002 on rank 5; "
        "seed: 0 on ranks 0, 1, 2, 3 and 1 more vs 1 on rank 5; "
        'device: "cpu" on ranks 0, 1, 2, 3 and 1 more vs "cuda" on rank 5; '
        "bf16: null on ranks 0, 1, 2, 3 and 1 more vs true on rank 5 and 1 more"
    )
    every[5]["bf16"] = every[4]["bf16"]  # five settings differ: all named
    with pytest.raises(RecipeError, match=r"ep: 1 on ranks 0, 1, 2, 3 and 1 more vs \(none\) on rank 5\): launch"):
        check_same_run(load_recipe(tmp_path / "a.yaml"), world)
    every[:] = [every[4]] * 6
    check_same_run(load_recipe(tmp_path / "a.yaml"), world)  # the same settings on every rank: no refusal
    world.gather = None
    check_same_run(load_recipe(tmp_path / "a.yaml"), World())  # one process: nothing to compare


def test_the_settings_compared_leave_out_the_rank_s_own_device_index(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(recipe(tmp_path, 1e-3)))
    settings = []
    for device in ("cuda:0", "cuda:1", "cpu"):
        r = load_recipe(tmp_path / "a.yaml")
        r.device = device  # as kimivl train sets it after init_world
        settings.append(run_settings(r, World(device=device)))
    assert settings[0] == settings[1] and settings[0] != settings[2]
    assert json.loads(settings[0]["stage s: lr"]) == 1e-3 and json.loads(settings[0]["dp_shard"]) == 1


def test_world_gather_refuses_tensors_and_passes_plain_objects_in_one_process():
    world = World()
    assert world.gather({"names": ["a", "b"], "n": 3}) == [{"names": ["a", "b"], "n": 3}]
    with pytest.raises(TypeError, match=r"shape \(2, 3\)\): send \.tolist\(\)"):
        world.gather((["a"], [torch.ones(2, 3)]))
