"""A rank whose row has images beside one whose row has none, at the same step (2 CPU processes, gloo): the vision
tower's collectives ran on one rank only, and the job stopped ("collective mismatch"); now the rank without images
runs the tower on a blank image weighing 0, and the run equals one process."""

import pytest
import torch

from kimivl.distributed.vision_sync import has_images, pad_embeddings, vision_pad
from kimivl.distributed.world import World
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


def test_one_process_pads_nothing_and_a_pad_joins_the_embeddings_only_while_it_requires_grad(tiny_model):
    """No patch, no images; in one process the pad is a plain 0 (no collective); a pad that requires grad is added to
    the token embeddings inside the block (the logits unchanged, its gradient reached through every layer)."""
    assert not has_images(None) and not has_images(torch.zeros(0, 3, 14, 14)) and has_images(torch.zeros(4, 3, 14, 14))
    for images in (False, True):
        zero = vision_pad(tiny_model, World(), images)
        assert zero.item() == 0 and not zero.requires_grad
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    want = tiny_model(ids).logits
    hooks = tiny_model.language_model.model.embed_tokens._forward_hooks
    with pad_embeddings(tiny_model, zero):
        assert not hooks
    pad = torch.zeros((), requires_grad=True)
    with pad_embeddings(tiny_model, pad):
        got = tiny_model(ids).logits
    assert not hooks
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.square().sum().backward()
    assert pad.grad is not None and pad.grad != 0
