"""A second job on the ``out`` of a live run: every rank stops with the run lock's refusal (rank 0 alone took the
lock, and the others, gone on into their first collective, died with a gloo traceback that torchrun named as the
job's root cause)."""

import os

import yaml

from kimivl.train.lock import run_lock
from tests.distributed.test_same_run import recipe
from tests.distributed.test_sharded_training import run

RUN_RECIPE = """
import sys
from kimivl.distributed.world import close_world, init_world
from kimivl.train.pipeline import run_recipe
from kimivl.train.recipe import RecipeError, load_recipe

recipe = load_recipe(sys.argv[1])
world = init_world(recipe.parallel, recipe.device)
try:
    run_recipe(recipe, progress=False, world=world)
except RecipeError as e:
    print(f"rank {world.rank} refused: {e}", file=sys.stderr)
finally:
    close_world(world)
"""


def test_every_rank_of_a_job_on_a_locked_out_stops_with_the_refusal(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe(tmp_path, 1e-3)))
    (tmp_path / "launch.py").write_text(RUN_RECIPE)
    out = tmp_path / "run"
    refusal = f"{out} is in use by another run (pid {os.getpid()} on "
    with run_lock(out):  # as a live run holds it
        direct = run([str(tmp_path / "launch.py"), str(tmp_path / "r.yaml")], 2)
        cli = run(["-m", "kimivl", "train", str(tmp_path / "r.yaml"), "--resume"], 2)
    assert direct.returncode == 0, direct.stderr[-3000:]
    for rank in range(2):
        assert f"rank {rank} refused: {refusal}" in direct.stderr, direct.stderr[-3000:]
    assert cli.returncode != 0
    assert cli.stderr.count(f"kimivl train: error: {refusal}") == 2, cli.stderr[-3000:]
    for done in (direct, cli):
        assert "Connection closed" not in done.stderr and "[rank1]:" not in done.stderr, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing ran
