"""A rank whose row has images beside one whose row has none, at the same step (2 CPU processes, gloo): the vision
tower's collectives ran on one rank only, and the job stopped ("collective mismatch"); now the rank without images
runs the tower on a blank image weighing 0, and the run equals one process."""

import pytest
import torch

from tests.distributed.test_sharded_training import WORKER, close, metrics, run

# seconds a collective waits: the ranks' collectives mismatched (a change that undoes the blank image) fail the test
# then, not at run's limit of 5 minutes; a step of the tiny model takes well under a second
COLLECTIVE_TIMEOUT = ["--timeout", "120"]


def test_image_rows_on_one_rank_and_text_rows_on_the_other_train_as_one_process(tmp_path):
    """Image rows and text rows in turn, 2 per step: under 2 ranks rank 0 trains only image rows, rank 1 only text
    rows. The losses, gradient norms and final weights of one process."""
    weights = {}
    for name, nproc in (("single", None), ("sharded", 2)):
        out = tmp_path / name
        args = [str(WORKER), "--out", str(out), "--steps", "3", "--accum", "2", "--alternate", *COLLECTIVE_TIMEOUT]
        done = run([*args, "--weights", str(out / "w.pt")], nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        weights[name] = torch.load(out / "w.pt")
    assert len(metrics(tmp_path / "single")) == 3
    close(metrics(tmp_path / "sharded"), metrics(tmp_path / "single"), keys=("loss", "grad_norm"))
    for key, whole in weights["single"].items():
        torch.testing.assert_close(weights["sharded"][key], whole, rtol=1e-5, atol=1e-5, msg=key)


def test_text_rows_that_reach_no_trained_weight_train_as_one_process(tmp_path):
    """Only the projector trains, so a text row's loss reaches no trained weight. Steps of an image row and a text
    row (either rank's the image row), and a step of text rows on both ranks, which trains nothing: the losses,
    gradient norms and final weights of one process, where such a row adds a zero gradient."""
    weights = {}
    for name, nproc in (("single", None), ("sharded", 2)):
        out = tmp_path / name
        args = [str(WORKER), "--out", str(out), "--steps", "3", "--accum", "2", "--rows", "itttti", *COLLECTIVE_TIMEOUT]
        done = run([*args, "--train", "multi_modal_projector", "--weights", str(out / "w.pt")], nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        weights[name] = torch.load(out / "w.pt")
    single = metrics(tmp_path / "single")
    assert [r["grad_norm"] == 0 for r in single] == [False, True, False]
    close(metrics(tmp_path / "sharded"), single, keys=("loss", "grad_norm"))
    for key, whole in weights["single"].items():
        torch.testing.assert_close(weights["sharded"][key], whole, rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("objective", ["opmd", "grpo"])
def test_an_rl_update_with_image_answers_on_one_rank_only_equals_one_process(tmp_path, objective):
    """Rank 0's answers have image prompts, rank 1's none: the update's weights equal one process's on all 8."""
    weights = {}
    for name, nproc in (("single", None), ("sharded", 2)):
        out = tmp_path / name
        args = [str(WORKER.with_name("rl_worker.py")), "--out", str(out), "--images", "--objective", objective]
        done = run([*args, "--weights", str(out / "w.pt")], nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        weights[name] = torch.load(out / "w.pt")
    for key, whole in weights["single"].items():
        torch.testing.assert_close(weights["sharded"][key], whole, rtol=1e-5, atol=1e-5, msg=key)
