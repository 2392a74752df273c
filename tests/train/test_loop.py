"""The shared training loop: kill-and-resume equality, atomic checkpoints, the NaN guard, metrics."""

import dataclasses
import itertools
import json
import logging
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kimivl import KimiVL
from kimivl.checkpoint import FROZEN_FINGERPRINT, checkpoint_files
from kimivl.data.mixture import Mixture
from kimivl.data.packing import PackedBatch, pack
from kimivl.model.moe import Router
from kimivl.processing.processor import Encoded
from kimivl.train.balance import ExpertLoadTracker
from kimivl.train.loop import LoopConfig, to_device, train_loop
from kimivl.train.optim import build_optimizer
from kimivl.train.schedule import WarmupCosine, scheduler_at
from kimivl.train.state import latest_checkpoint, load_state, save_state
from kimivl.train.step import TrainingError
from kimivl.train.trainable import set_trainable
from tests.data.test_packing import counted_draws

CHATS = [
    [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]
    for a in range(5)
    for b in range(5)
]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Count the circles: there are 3 circles."]


def joint_loss(model, batch):
    out = model(**batch.kwargs())
    return out.loss, {"efficiency": batch.efficiency}, batch.n_tokens


def setup(small_model, small_processor, seed=0, replacement=True):
    torch.manual_seed(seed)
    model = KimiVL(small_model.config)

    def encode(kind, item):
        return small_processor.encode_text(item) if kind == "text" else small_processor.encode_for_training(item)

    data = Mixture(
        {"chat": CHATS, "text": TEXTS}, encode, budget=96, start={"chat": 1, "text": 1}, seed=1, replacement=replacement
    )
    opt = build_optimizer(model, lr=3e-3)
    return model, data, opt, scheduler_at(opt, WarmupCosine(2, 8))


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def tensorboard_losses(run_dir):
    events = EventAccumulator(str(run_dir / "tensorboard" / "s"))
    events.Reload()
    return [(e.step, round(e.value, 6)) for e in events.Scalars("loss")]


@pytest.mark.parametrize("accum, replacement", [(1, True), (2, False)])
def test_kill_and_resume_gives_identical_losses(small_model, small_processor, tmp_path, accum, replacement):
    cfg = LoopConfig(steps=6, ckpt_every=3, log_every=1, accum=accum)
    model, data, opt, sched = setup(small_model, small_processor, replacement=replacement)
    train_loop(model, joint_loss, data, opt, sched, cfg, tmp_path / "a", "s", progress=False)

    calls = {"n": 0}

    def dies_in_step_5(model, batch):
        calls["n"] += 1
        if calls["n"] == 4 * accum + 1:
            raise KeyboardInterrupt  # killed mid-run, after the step-3 checkpoint
        return joint_loss(model, batch)

    model, data, opt, sched = setup(small_model, small_processor, replacement=replacement)
    with pytest.raises(KeyboardInterrupt):
        train_loop(model, dies_in_step_5, data, opt, sched, cfg, tmp_path / "b", "s", progress=False)
    assert latest_checkpoint(tmp_path / "b" / "s" / "checkpoints").name == "step-0000003"
    # TensorBoard reads a run's event files in name order, and a name holds the second it was opened and then a
    # per-process counter (…1796518961.host.pid.9 sorts after ….10): a resume opened within the killed run's second
    # could be read first. A real resume starts a new process at least a second later; so does this one.
    time.sleep(1.01 - time.time() % 1)
    # different init, a fresh mixture: all comes from disk and the data position
    model, data, opt, sched = setup(small_model, small_processor, seed=123, replacement=replacement)
    train_loop(model, joint_loss, data, opt, sched, cfg, tmp_path / "b", "s", progress=False)
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert len(losses(tmp_path / "a")) == 6 and losses(tmp_path / "a")[-1] < losses(tmp_path / "a")[0]
    # TensorBoard hides what the killed run logged after its checkpoint: the curves equal the uninterrupted run's
    assert tensorboard_losses(tmp_path / "b") == tensorboard_losses(tmp_path / "a")


def id_mixture(replacement: bool) -> Mixture:
    """Samples of 1 to 3 tokens whose ids name their record (``offset`` of the source + index): about 32 to a row."""
    sources, offset = {"a": list(range(7)), "b": list(range(3)), "c": list(range(11))}, {"a": 0, "b": 100, "c": 200}

    def encode(name, k):
        ids = [offset[name] + k] * (1 + k % 3)
        return Encoded(ids, torch.zeros(0, 3, 14, 14), torch.zeros(0, 2, dtype=torch.long), ids)

    weights = {"a": 5, "b": 1, "c": 2}, {"a": 1, "b": 3, "c": 2}
    return Mixture(sources, encode, 64, *weights, horizon=500, seed=1, replacement=replacement, stream="s")


@pytest.mark.parametrize("replacement, counts_saved", [(False, True), (True, True), (False, False)])
def test_a_resume_draws_the_uninterrupted_run_s_samples_without_replaying_the_earlier_draws(
    tmp_path, monkeypatch, replacement, counts_saved
):
    """Killed after the step-10 checkpoint (about 300 samples in) and resumed with a fresh mixture, a run trains on
    the rows of an uninterrupted one; the draw counts saved with the position spare it the replay of every earlier
    sample's draw, and a checkpoint without them (written before kimivl kept them) resumes by replaying them."""
    cfg = LoopConfig(steps=12, ckpt_every=10, log_every=1)

    def run(run_dir, die_at=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(1, 1)
        opt = build_optimizer(model, lr=1e-3)
        rows = []

        def loss_fn(model, batch):
            if len(rows) + 1 == die_at:
                raise KeyboardInterrupt
            rows.append(batch.input_ids[0].tolist())
            return model(torch.ones(1, 1)).pow(2).sum(), {}, batch.n_tokens

        data = id_mixture(replacement)
        sched = scheduler_at(opt, WarmupCosine(2, 12))
        train_loop(model, loss_fn, data, opt, sched, cfg, run_dir, "s", progress=False)
        return rows

    whole = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", die_at=11)
    trainer = latest_checkpoint(tmp_path / "b" / "s" / "checkpoints") / "trainer.pt"
    saved = torch.load(trainer, weights_only=True)
    if not counts_saved:
        del saved["stream"]
        torch.save(saved, trainer)
    calls = counted_draws(monkeypatch)
    assert run(tmp_path / "b") == whole[10:]
    at = saved["position"]
    end = torch.load(latest_checkpoint(tmp_path / "b" / "s" / "checkpoints") / "trainer.pt")["position"]
    assert at > 250 and end - at < 100
    if counts_saved:  # a draw for each sample (and one of its replay), none for the samples before the resume
        assert calls["n"] <= 2 * (end - at) + 2
    elif not replacement:
        assert calls["n"] >= at


def test_nan_loss_stops_with_a_usable_checkpoint(small_model, small_processor, tmp_path):
    model, data, opt, sched = setup(small_model, small_processor)
    calls = {"n": 0}

    def nan_at_step_3(model, batch):
        calls["n"] += 1
        loss, values, n = joint_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 3 else loss), values, n

    with pytest.raises(TrainingError, match="s: step 3: loss is nan; the last good state is saved"):
        train_loop(
            model, nan_at_step_3, data, opt, sched, LoopConfig(steps=5, ckpt_every=10), tmp_path, "s", progress=False
        )
    saved = latest_checkpoint(tmp_path / "s" / "checkpoints")
    assert saved.name == "step-0000002"
    reloaded = KimiVL.from_pretrained(saved, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))


def test_crash_while_writing_keeps_previous_checkpoint(small_model, small_processor, tmp_path, monkeypatch):
    model, data, opt, sched = setup(small_model, small_processor)
    train_loop(model, joint_loss, data, opt, sched, LoopConfig(steps=2, ckpt_every=2), tmp_path, "s", progress=False)
    import kimivl.checkpoint as ck

    def torn_write(tensors, file, metadata=None):
        open(file, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", torn_write)
    model, data, opt, sched = setup(small_model, small_processor)
    with pytest.raises(
        TrainingError,
        match="step-0000004 not written: cannot write .*model.safetensors: disk full; .*step-0000002 is intact",
    ):
        train_loop(
            model, joint_loss, data, opt, sched, LoopConfig(steps=4, ckpt_every=2), tmp_path, "s", progress=False
        )
    monkeypatch.undo()
    saved = latest_checkpoint(tmp_path / "s" / "checkpoints")
    assert saved.name == "step-0000002"
    KimiVL.from_pretrained(saved)


def failing_from_step_2(data, error: Exception) -> tuple:
    """Make ``data``'s encoding raise ``error`` from the second row's second sample on (samples are encoded once
    each, in order); returns the working encode and that sample's index."""
    encode, first_bad, calls = data.encode, next(data.batches(0))[1] + 1, []

    def broken(kind, item):
        calls.append(kind)
        if len(calls) > first_bad:
            raise error
        return encode(kind, item)

    data.encode = broken
    return encode, first_bad


def test_a_sample_that_cannot_be_encoded_stops_with_the_progress_saved(small_model, small_processor, tmp_path):
    cfg = LoopConfig(steps=6, ckpt_every=10, log_every=1)
    model, data, opt, sched = setup(small_model, small_processor)
    train_loop(model, joint_loss, data, opt, sched, cfg, tmp_path / "a", "s", progress=False)

    model, data, opt, sched = setup(small_model, small_processor)
    encode, first_bad = failing_from_step_2(data, ValueError("image /data/x.png is truncated"))
    bad = data.pick(first_bad)
    with pytest.raises(
        TrainingError,
        match=rf"s: no batch for step 2: sample {first_bad}: record {bad[1] + 1} of source "
        rf"'{bad[0]}' cannot be encoded: image /data/x.png is truncated; the state "
        "before it is saved at .*step-0000001 \\(fix the record in place, then resume\\)",
    ):
        train_loop(model, joint_loss, data, opt, sched, cfg, tmp_path / "b", "s", progress=False)
    data.encode = encode  # fixed: the resumed run equals an uninterrupted one
    model, data, opt, sched = setup(small_model, small_processor, seed=123)
    train_loop(model, joint_loss, data, opt, sched, cfg, tmp_path / "b", "s", progress=False)
    assert losses(tmp_path / "b") == losses(tmp_path / "a")


def test_a_source_that_cannot_be_read_mid_run_stops_with_the_progress_saved(small_model, small_processor, tmp_path):
    """A source file deleted or unmounted mid-run was met with the advice to fix a record in place."""
    model, data, opt, sched = setup(small_model, small_processor)
    failing_from_step_2(data, FileNotFoundError(2, "No such file or directory", "/data/chat.jsonl"))
    with pytest.raises(
        TrainingError,
        match=r"s: no batch for step 2: \[Errno 2\] No such file or directory: "
        r"'/data/chat.jsonl'; the state before it is saved at .*step-0000001 \(make the file readable "
        r"again, then resume\)",
    ):
        train_loop(model, joint_loss, data, opt, sched, LoopConfig(steps=4, ckpt_every=10), tmp_path, "s", False)


def test_a_stream_of_batches_that_ends_is_named_not_called_bad_data(small_model, small_processor, tmp_path):
    """A caller's stream that ran out was reported as bad data with an empty reason and advice to fix a record."""
    model, data, opt, sched = setup(small_model, small_processor)

    class ThreeBatches:
        def batches(self, position):
            return itertools.islice(data.batches(position), 3)

    with pytest.raises(TrainingError) as e:
        train_loop(model, joint_loss, ThreeBatches(), opt, sched, LoopConfig(steps=5, ckpt_every=10), tmp_path, "s")
    assert re.fullmatch(
        r"s: no batch for step 4: the data stream ended \(it must yield 1 batch\(es\) per step for all 5 steps\); "
        r"the state before it is saved at .*step-0000003",
        str(e.value),
    ), e.value
    assert latest_checkpoint(tmp_path / "s" / "checkpoints").name == "step-0000003"


def test_batches_move_to_the_model_device():
    batch = PackedBatch(
        torch.ones(1, 4, dtype=torch.long),
        torch.ones(1, 4, dtype=torch.long),
        torch.tensor([0, 4], dtype=torch.int32),
        None,
        None,
        budget=8,
    )
    moved = to_device(batch, torch.device("meta"))
    assert all(t.is_meta for t in (moved.input_ids, moved.labels, moved.cu_seqlens))
    assert moved.pixel_values is None and moved.budget == 8 and batch.input_ids.device.type == "cpu"
    assert to_device((1, 2), torch.device("meta")) == (1, 2)


def frozen_shard(checkpoint):
    """The checkpoint's shard of frozen tensors (marked with a fingerprint)."""
    shards = [f for f in checkpoint_files(checkpoint) if FROZEN_FINGERPRINT in (safe_open(f, "pt").metadata() or {})]
    assert len(shards) == 1
    return Path(shards[0])


def test_frozen_weights_are_written_once_a_stage(small_model, small_processor, tmp_path):
    model, data, _, _ = setup(small_model, small_processor)
    set_trainable(model, ["language_model"], ["*.mlp.experts.*", "*.embed_tokens.*"])
    opt = build_optimizer(model, lr=3e-3)
    cfg = LoopConfig(steps=4, ckpt_every=1, log_every=1, keep_checkpoints=3)
    train_loop(model, joint_loss, data, opt, scheduler_at(opt, WarmupCosine(2, 8)), cfg, tmp_path, "s", progress=False)
    root = tmp_path / "s" / "checkpoints"
    steps = [root / f"step-{s:07d}" for s in (2, 3, 4)]
    assert sorted(p.name for p in root.glob("step-*")) == [p.name for p in steps]  # step 1, the first writer, pruned
    shards = [frozen_shard(p) for p in steps]
    assert len({s.stat().st_ino for s in shards}) == 1 and shards[0].stat().st_nlink == 3  # one file, three names
    frozen = load_file(shards[0])
    assert any(".mlp.experts." in k for k in frozen) and "language_model.model.embed_tokens.weight" in frozen
    assert not any(".self_attn." in k for k in frozen)
    others = {f for p in steps for f in checkpoint_files(p) if Path(f) not in shards}
    assert len({Path(f).stat().st_ino for f in others}) == len(others) == 3  # trained tensors: written each time
    loaded = KimiVL.from_pretrained(steps[-1], dtype=torch.float32)  # a complete official checkpoint
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with torch.no_grad():  # a frozen tensor that did change is written again, not linked
        next(p for n, p in model.named_parameters() if ".mlp.experts." in n).add_(1.0)
    changed = save_state(root, model, {"step": 5}, keep=4)
    assert frozen_shard(changed).stat().st_ino != shards[0].stat().st_ino and shards[0].stat().st_nlink == 3
    assert not all(torch.equal(load_file(frozen_shard(changed))[k], t) for k, t in frozen.items())


def test_a_training_wrapper_s_frozen_weights_are_written_once_too(tmp_path):
    """A model without ``save_pretrained`` (the vit stage's pre-trainer) is saved by ``save_checkpoint``, its frozen
    tensors in a shard of their own, linked from the checkpoint before while unchanged."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    first, second = (save_state(tmp_path, model, {"step": s}) for s in (1, 2))
    assert frozen_shard(first).stat().st_ino == frozen_shard(second).stat().st_ino
    assert set(load_file(frozen_shard(second))) == {"0.weight", "0.bias"}


def test_accumulation_adds_the_gradients_of_several_batches_to_one_step(small_model, small_processor, tmp_path):
    model, data, opt, sched = setup(small_model, small_processor)
    cfg = LoopConfig(steps=2, log_every=1, accum=3, bias_update_rate=0)  # the router's bias stays put, as by hand
    train_loop(model, joint_loss, data, opt, sched, cfg, tmp_path / "a", "s", progress=False)
    # by hand: the same batches, each loss over 3, backward, then one optimizer step
    ref, _, ref_opt, ref_sched = setup(small_model, small_processor)
    rows = data.batches(0)
    logged = []
    for _ in range(2):
        ref_opt.zero_grad(set_to_none=True)
        step_losses = []
        for _ in range(3):
            batch, position = next(rows)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = joint_loss(ref, batch)[0]
            (loss / 3).backward()
            step_losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        ref_sched.step()
        logged.append(sum(step_losses) / 3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert losses(tmp_path / "a") == pytest.approx(logged, rel=1e-6)
    state = torch.load(latest_checkpoint(tmp_path / "a" / "s" / "checkpoints") / "trainer.pt", weights_only=True)
    assert state["position"] == position  # six batches consumed


class Numbers:
    """Batch i is the number i."""

    def batches(self, position):
        for i in itertools.count(position):
            yield i, i + 1


def number_loss(model, batch):
    return model(torch.full((1, 1), float(batch))).pow(2).sum(), {"batch": float(batch)}, 1


def test_the_loop_returns_its_last_metrics_and_shows_a_bar_only_when_asked(tmp_path, capsys):
    """``train_loop`` returns the metrics it wrote for its last step, the held-out ones of a dense model's validation
    among them; ``progress=False`` writes no bar."""

    def held_out(model):
        return {"held_out": 0.5}

    for run, progress in (("quiet", False), ("shown", True)):
        torch.manual_seed(0)
        model = torch.nn.Linear(1, 1)
        opt = build_optimizer(model, lr=1e-2)
        sched = scheduler_at(opt, WarmupCosine(1, 3))
        cfg = LoopConfig(steps=3, log_every=1)
        last = train_loop(
            model, number_loss, Numbers(), opt, sched, cfg, tmp_path / run, "s", progress=progress, validate=held_out
        )
        assert last["batch"] == 2.0 and last["loss"] == losses(tmp_path / run)[-1] > 0 and last["held_out"] == 0.5
        shown = capsys.readouterr().err
        assert ("3/3" in shown) == progress, shown


def test_the_loop_logs_validates_and_saves_at_its_cadences_and_after_the_last_step(tmp_path):
    """A metrics row every ``log_every`` steps and at each validation (every ``val_every`` steps), a checkpoint every
    ``ckpt_every`` steps, and all three after the last step; a row's metrics are the mean over its ``accum`` batches."""
    validated = []

    def held_out(model):
        validated.append(len(validated))
        return {"held_out": 0.5}

    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    opt = build_optimizer(model, lr=1e-2)
    cfg = LoopConfig(steps=5, log_every=2, val_every=3, ckpt_every=2, accum=2, keep_checkpoints=5)
    sched = scheduler_at(opt, WarmupCosine(1, 5))
    train_loop(model, number_loss, Numbers(), opt, sched, cfg, tmp_path, "s", progress=False, validate=held_out)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4, 5] and len(validated) == 2
    assert ["held_out" in r for r in rows] == [False, True, False, True]
    assert [r["batch"] for r in rows] == [2.5, 4.5, 6.5, 8.5]  # step s trains batches 2s - 2 and 2s - 1
    saved = sorted(p.name for p in (tmp_path / "s" / "checkpoints").glob("step-*"))
    assert saved == ["step-0000002", "step-0000004", "step-0000005"]


class Rows:
    """A stream of the given packed rows, in order."""

    def __init__(self, rows: list[PackedBatch]):
        self.rows = rows

    def batches(self, position: int):
        for i in range(position, len(self.rows)):
            yield self.rows[i], i + 1


def image_and_text_rows(processor, folder: Path) -> tuple[list[PackedBatch], list[PackedBatch]]:
    """Two rows of one image question each, and two rows of text."""
    images = []
    for i, colour in enumerate([(220, 30, 30), (30, 30, 220)]):
        Image.fromarray(np.full((28 * (i + 1), 56, 3), colour, dtype=np.uint8)).save(folder / f"{i}.png")
        chat = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": str(folder / f"{i}.png")},
                    {"type": "text", "text": "What colour?"},
                ],
            },
            {"role": "assistant", "content": ["red", "blue"][i]},
        ]
        images.append(pack([processor.encode_for_training(chat)], 96))
    return images, [pack([processor.encode_text(t)], 96) for t in TEXTS]


@pytest.mark.parametrize("rate", [0.01, 0.0])
def test_a_step_moves_the_router_biases_by_its_batch_s_expert_loads(small_model, small_processor, tmp_path, rate):
    """After each step the loop moves every router's bias by ``bias_update_rate`` towards the mean load of that
    step's batch (``update_biases``); a rate of 0 leaves them."""
    model, data, opt, sched = setup(small_model, small_processor)
    cfg = LoopConfig(steps=1, log_every=1, bf16=False, bias_update_rate=rate)
    train_loop(model, joint_loss, data, opt, sched, cfg, tmp_path, "s", progress=False)
    ref, _, _, _ = setup(small_model, small_processor)
    with ExpertLoadTracker(ref) as tracker:
        joint_loss(ref, next(data.batches(0))[0])
        tracker.update_biases(0.01)
    moved = [m.e_score_correction_bias for m in ref.modules() if isinstance(m, Router)]
    biases = [m.e_score_correction_bias for m in model.modules() if isinstance(m, Router)]
    assert moved and all(b.abs().sum() > 0 for b in moved)
    assert all(torch.equal(b, m if rate else torch.zeros_like(m)) for b, m in zip(biases, moved))


def test_a_row_whose_loss_reaches_no_trained_weight_adds_a_zero_gradient(
    small_model, small_processor, tmp_path, caplog
):
    """Only the projector trains: a text row's loss reaches no trained weight (it crashed the backward). Among the
    accumulated rows it adds nothing to the gradient and its loss counts in the step's mean, so a step of two image
    rows and two text rows has half the gradient of the step of the two image rows alone; a step of text rows alone
    leaves the weights as they were. A run with such rows says so once (a language model frozen by ``freeze``
    patterns, which the data check cannot see, trained nothing on its text rows without a word)."""
    caplog.set_level(logging.WARNING, logger="kimivl.train.step")
    (image_a, image_b), (text_a, text_b) = image_and_text_rows(small_processor, tmp_path)
    cfg = LoopConfig(steps=1, log_every=1, clip=1e9, bf16=False, bias_update_rate=0)  # no clipping

    def run(name, rows, **settings):
        torch.manual_seed(0)
        model = KimiVL(small_model.config)
        set_trainable(model, ["multi_modal_projector"])
        opt = build_optimizer(model, lr=3e-3)
        run_cfg = dataclasses.replace(cfg, **settings)
        train_loop(
            model,
            joint_loss,
            Rows(rows),
            opt,
            scheduler_at(opt, WarmupCosine(2, 8)),
            run_cfg,
            tmp_path / name,
            "s",
            progress=False,
        )
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return model, grads, json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])

    torch.manual_seed(0)
    by_hand = KimiVL(small_model.config)
    with torch.no_grad():
        first = {k: joint_loss(by_hand, row)[0].item() for k, row in zip("abcd", (image_a, text_a, image_b, text_b))}
    _, alone, images_only = run("images", [image_a, image_b], accum=2)
    assert not caplog.messages
    mixed_model, mixed, step = run("mixed", [image_a, text_a, image_b, text_b], accum=4)
    assert caplog.messages == [
        "s: step 1 has a row that reaches no trained weight (no images while the language model is frozen): such "
        "rows add no gradient, and train nothing"
    ]
    assert alone.keys() == mixed.keys() and all(n.startswith("multi_modal_projector.") for n in alone)
    for name, grad in alone.items():
        torch.testing.assert_close(mixed[name], grad / 2, rtol=1e-6, atol=1e-9, msg=name)
    assert step["grad_norm"] == pytest.approx(images_only["grad_norm"] / 2, rel=1e-6)
    assert step["loss"] == pytest.approx(sum(first.values()) / 4, rel=1e-5)  # the text rows' losses among them
    assert images_only["loss"] == pytest.approx((first["a"] + first["c"]) / 2, rel=1e-5)
    one_text = run("one text", [text_a, image_a], accum=2)[2]  # a text row first, an image row after it
    assert one_text["loss"] == pytest.approx((first["b"] + first["a"]) / 2, rel=1e-5)
    rows = [image_a, text_a, image_b, text_b] + [text_a, text_b] * 2
    then_text, _, last = run("then text", rows, accum=4, steps=2)
    assert last["step"] == 2 and last["grad_norm"] == 0.0
    assert last["loss"] == pytest.approx((first["b"] + first["d"]) / 2, rel=1e-5)  # the weights it reaches are frozen
    for a, b in zip(then_text.state_dict().values(), mixed_model.state_dict().values()):
        assert torch.equal(a, b)  # the text-only step changed nothing


def test_resuming_with_other_trained_parameters_is_named(small_model, small_processor, tmp_path):
    model, data, opt, sched = setup(small_model, small_processor)
    train_loop(model, joint_loss, data, opt, sched, LoopConfig(steps=2, ckpt_every=1), tmp_path, "s", progress=False)
    model, data, _, _ = setup(small_model, small_processor)
    set_trainable(model, ["language_model"], ["*.mlp.experts.*"])  # the recipe changed between the runs
    opt = build_optimizer(model, lr=3e-3)
    with pytest.raises(
        TrainingError,
        match="s: the optimiser state in .*step-0000002 does not fit the parameters "
        "this run trains .*resume with the stage's settings of that run",
    ):
        _resume_to_four(model, data, opt, tmp_path)


def test_the_logged_lr_is_the_rate_each_step_trained_at(small_model, small_processor, tmp_path):
    """Warm-up and cosine move the rate every step: each logged lr is the one the optimizer stepped with."""
    model, data, opt, sched = setup(small_model, small_processor)
    used = []
    opt.register_step_pre_hook(lambda o, args, kwargs: used.append(o.param_groups[0]["lr"]))
    train_loop(model, joint_loss, data, opt, sched, LoopConfig(steps=4, log_every=1), tmp_path, "s", progress=False)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(used) == 4 and used[0] < used[1] > used[3]  # a warm-up of 2 steps, then the decay
    assert logged == pytest.approx(used, rel=1e-12)


def test_resuming_with_another_schedule_is_refused(small_model, small_processor, tmp_path):
    """Loading the checkpoint's scheduler would quietly keep its lr and length: a changed recipe is named instead."""
    from kimivl.train.schedule import WarmupCosine, scheduler_at
    from kimivl.train.step import TrainingError

    model, data, opt, sched = setup(small_model, small_processor)
    train_loop(model, joint_loss, data, opt, sched, LoopConfig(steps=2, ckpt_every=2), tmp_path, "s", progress=False)
    for lr, schedule, words in ((3e-3, WarmupCosine(2, 16), "total_steps"), (5e-2, WarmupCosine(2, 8), "base_lrs")):
        model, data, _, _ = setup(small_model, small_processor)
        opt = build_optimizer(model, lr=lr)
        with pytest.raises(TrainingError, match=f"schedule of this run differs.*{words}.*start the stage afresh"):
            train_loop(
                model,
                joint_loss,
                data,
                opt,
                scheduler_at(opt, schedule),
                LoopConfig(steps=4),
                tmp_path,
                "s",
                progress=False,
            )
    model, data, opt, sched = setup(small_model, small_processor)  # the same settings resume
    train_loop(model, joint_loss, data, opt, sched, LoopConfig(steps=4), tmp_path, "s", progress=False)


def test_a_sharded_resume_refuses_param_groups_that_train_other_parameters():
    """Sharded checkpoints kept each group's hyperparameters only, compared by name: after ``freeze`` changed, the
    groups kept their names, DCP's partial load hid the rest, and the run resumed with other parameters in them."""
    from kimivl.train.optim import build_optimizer
    from kimivl.train.state import _group_record, _restore_groups

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    saved = [_group_record(g) for g in build_optimizer(model, lr=1e-3).param_groups]
    model[1].requires_grad_(False)  # the run now freezes a layer
    with pytest.raises(ValueError, match="trains 16 elements, 24 saved"):
        _restore_groups(build_optimizer(model, lr=1e-3), saved)
    model[1].requires_grad_(True)
    optimizer = build_optimizer(model, lr=5e-4)
    _restore_groups(optimizer, saved)  # the same parameters: the saved hyperparameters come back
    assert all(g["lr"] == 1e-3 and "numel" not in g for g in optimizer.param_groups)


def _continue_stage(tmp_path, warmup=2, min_ratio=0.1, pre_steps=10, cooldown_steps=10):
    """A 'cooldown' stage on the recipe-wide curve after a 'pre' stage, over a small model, and its TrainState."""
    from kimivl.train.pipeline import stage_scheduler
    from kimivl.train.recipe import load_recipe
    from kimivl.train.state import TrainState

    recipe = {
        "name": "r",
        "out": str(tmp_path / "run"),
        "tokenizer": {"train_vocab": 260},
        "sources": {"a": "a.jsonl"},
        "schedule": {"warmup": warmup, "decay_stages": ["cooldown"], "min_ratio": min_ratio},
        "stages": [
            {"name": "pre", "kind": "joint", "steps": pre_steps, "lr": 1e-3, "mix": {"a": 1}},
            {"name": "cooldown", "kind": "joint", "steps": cooldown_steps, "lr": 1e-3, "mix": {"a": 1}},
        ],
    }
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    recipe = load_recipe(tmp_path / "r.json")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, lr=1e-3)
    sched = stage_scheduler(recipe, recipe.stages[1], opt)
    return TrainState(tmp_path / "ckpt", "cooldown", model, opt, sched), sched


def _train(state, sched, steps):
    lrs = []
    for _ in range(steps):
        lrs.append(state.optimizer.param_groups[0]["lr"])
        state.model(torch.ones(2, 4)).pow(2).sum().backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        sched.step()
        state.advance()
    return lrs


@pytest.mark.parametrize(
    "change, named",
    [
        ({"warmup": 3}, "warmup_steps: 2 then, 3 now"),
        ({"min_ratio": 0.5}, "min_ratio: 0.1 then, 0.5 now"),
        ({"cooldown_steps": 20}, "decay_steps: 10 then, 20 now"),
        ({"pre_steps": 12}, "offset: 10 then, 12 now"),  # an earlier stage moved where this one starts
    ],
)
def test_resuming_a_stage_on_the_recipe_wide_curve_after_the_curve_changed_is_refused(tmp_path, change, named):
    state, sched = _continue_stage(tmp_path)
    _train(state, sched, 4)
    state.save()
    state, _ = _continue_stage(tmp_path, **change)
    with pytest.raises(TrainingError, match=f"cooldown: the learning-rate schedule .*{named}.*start the stage afresh"):
        state.resume()


def test_a_checkpoint_without_a_data_position_resumes_reading_from_the_start(tmp_path):
    """A checkpoint written before kimivl kept the data position resumes its step with the data read from record 0."""
    state, sched = _continue_stage(tmp_path)
    _train(state, sched, 2)
    state.advance(position=7)
    saved = state.save()
    trainer = torch.load(saved / "trainer.pt", weights_only=True)
    assert trainer["position"] == 7
    del trainer["position"]
    torch.save(trainer, saved / "trainer.pt")
    state, _ = _continue_stage(tmp_path)
    assert state.resume() == saved and (state.step, state.position) == (3, 0)


def test_a_stage_on_the_recipe_wide_curve_resumes_where_it_stopped(tmp_path, caplog):
    """Unchanged, it resumes at the lr of an uninterrupted run; a checkpoint written before the multiplier was
    recorded (``lr_lambdas`` None) cannot be compared, and resumes with a warning."""
    state, sched = _continue_stage(tmp_path / "full")
    full = _train(state, sched, 8)
    state, sched = _continue_stage(tmp_path)
    _train(state, sched, 4)
    saved = state.save()
    state, sched = _continue_stage(tmp_path)
    assert state.resume() == saved and state.step == 4
    assert _train(state, sched, 4) == full[4:]
    trainer = torch.load(saved / "trainer.pt", weights_only=True)
    trainer["scheduler"]["lr_lambdas"] = [None] * len(trainer["scheduler"]["lr_lambdas"])  # as kimivl wrote it
    torch.save(trainer, saved / "trainer.pt")
    state, sched = _continue_stage(tmp_path)
    with caplog.at_level("WARNING"):
        assert state.resume() == saved
    assert "holds no record of its learning-rate schedule" in caplog.text
    assert _train(state, sched, 4) == full[4:]


@pytest.mark.parametrize(
    "setting, named",
    [
        ({"weight_decay": 0.05}, r"\(weight_decay: 0.1 then, 0.05 now\)"),
        ({"ns_dtype": "bfloat16"}, r"\(ns_dtype: 'float32' then, 'bfloat16' now\)"),
        ({"betas": (0.9, 0.99)}, r"\(betas: \(0.9, 0.95\) then, \(0.9, 0.99\) now\)"),
    ],
)
def test_resuming_with_other_optimiser_settings_is_refused(small_model, small_processor, tmp_path, setting, named):
    """Loading the optimiser's state restores its param groups' settings: a changed weight_decay or ns_dtype would be
    quietly replaced by the checkpoint's."""
    model, data, opt, sched = setup(small_model, small_processor)
    train_loop(model, joint_loss, data, opt, sched, LoopConfig(steps=2, ckpt_every=2), tmp_path, "s", progress=False)
    model, data, _, _ = setup(small_model, small_processor)
    opt = build_optimizer(model, lr=3e-3, **setting)
    with pytest.raises(TrainingError, match=f"s: the optimiser settings of this run differ .*{named}"):
        _resume_to_four(model, data, opt, tmp_path)


def test_a_sharded_resume_names_changed_optimiser_settings():
    """A sharded checkpoint's param groups come back by ``_restore_groups``; what they restore over the run's own
    settings is named as in one process."""
    from kimivl.train.state import _changed_hyperparameters, _group_record, _hyperparameters, _restore_groups

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    saved = [_group_record(g) for g in build_optimizer(model, lr=1e-3).param_groups]
    optimizer = build_optimizer(model, lr=1e-3)
    wanted = [_hyperparameters(g) for g in optimizer.param_groups]
    _restore_groups(optimizer, saved)
    assert _changed_hyperparameters(wanted, optimizer.param_groups) == []
    assert _changed_hyperparameters([_hyperparameters({"betas": (0.9, 0.95)})], [{"betas": [0.9, 0.95]}]) == []
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.2, ns_dtype="bfloat16")
    wanted = [_hyperparameters(g) for g in optimizer.param_groups]
    _restore_groups(optimizer, saved)
    assert _changed_hyperparameters(wanted, optimizer.param_groups) == [
        "ns_dtype: 'float32' then, 'bfloat16' now",
        "weight_decay: 0.1 then, 0.2 now",
    ]


def _resume_to_four(model, data, opt, tmp_path) -> None:
    """Stage "s" in ``tmp_path`` trained on (resumed) to step 4 with a fresh warm-up + cosine schedule."""
    train_loop(
        model,
        joint_loss,
        data,
        opt,
        scheduler_at(opt, WarmupCosine(2, 8)),
        LoopConfig(steps=4),
        tmp_path,
        "s",
        progress=False,
    )


def test_loading_a_state_restores_the_global_random_generators(tiny_model, tmp_path):
    """torch's, Python's and numpy's generators continue from where the saved run left them."""
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    saved = save_state(tmp_path, tiny_model, {"step": 1})
    expected = (torch.rand(4).tolist(), random.random(), np.random.rand(2).tolist())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    assert load_state(saved, tiny_model)["step"] == 1
    assert (torch.rand(4).tolist(), random.random(), np.random.rand(2).tolist()) == expected


def test_a_run_resumed_from_an_earlier_checkpoint_keeps_it_and_drops_the_later_ones(tiny_model, tmp_path):
    """With ``latest`` pointed back at step 10 (step 20 damaged, as the error for it advises), the next save pruned
    step 10 as the older of two and kept the damaged step 20."""
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        save_state(root, tiny_model, {"step": step})
    (root / "step-0000020" / "trainer.pt").write_bytes(b"torn")
    (root / "latest").write_text("step-0000010\n")
    save_state(root, tiny_model, {"step": 11})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000010", "step-0000011"]


def test_a_save_removes_the_temporary_folders_a_kill_mid_save_left(tiny_model, tmp_path):
    """A save killed before its rename leaves ``.step-N.tmp``; the next checkpoint written removes it."""
    root = tmp_path / "checkpoints"
    (root / ".step-0000003.tmp").mkdir(parents=True)
    (root / ".step-0000003.tmp" / "model.safetensors").write_bytes(b"torn")
    save_state(root, tiny_model, {"step": 4})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000004"]


def test_checkpoints_past_seven_digits_of_steps_are_kept_and_pruned_by_step(tiny_model, tmp_path):
    """Names were compared as text: step-10000000 sorts before step-9999999, so its save deleted the checkpoint
    before it as 'abandoned'; a folder step-x of the user's is no checkpoint to prune."""
    root = tmp_path / "checkpoints"
    (root / "step-x").mkdir(parents=True)
    for step in (9_999_998, 9_999_999, 10_000_000):
        save_state(root, tiny_model, {"step": step})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-10000000", "step-9999999", "step-x"]
    save_state(root, tiny_model, {"step": 10_000_001})  # of the two older, the larger step is kept, not the longer name
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-10000000", "step-10000001", "step-x"]


def test_a_damaged_checkpoint_of_another_name_than_step_n_names_the_checkpoints_to_resume_from(tiny_model, tmp_path):
    """``latest`` may name any folder (a copy called best); when it was damaged, ordering it among the steps met None
    with a TypeError."""
    root = tmp_path / "checkpoints"
    save_state(root, tiny_model, {"step": 10})
    shutil.copytree(root / "step-0000010", root / "best")
    (root / "best" / "trainer.pt").write_bytes(b"torn")
    with pytest.raises(TrainingError, match=r"the checkpoint .*best is damaged: resume from .* writing step-0000010"):
        load_state(root / "best", tiny_model)
    shutil.copytree(root / "best", root / "9")  # a name of digits alone is no step-N either
    with pytest.raises(TrainingError, match=r"the checkpoint .*9 is damaged: resume from .* writing step-0000010"):
        load_state(root / "9", tiny_model)
    for step in (11, 12):  # a damaged step-N names the newest before it: an older one would lose progress
        save_state(root, tiny_model, {"step": step}, keep=5)
    (root / "step-0000012" / "trainer.pt").write_bytes(b"torn")
    with pytest.raises(TrainingError, match=r"writing step-0000011 into .*latest \(checkpoints kept: step-0000010, "):
        load_state(root / "step-0000012", tiny_model)
    for name in ("step-0000010", "step-0000011"):
        shutil.rmtree(root / name)
    (root / "step-0000011").write_text("a file, no checkpoint")
    with pytest.raises(TrainingError, match="there is no older checkpoint"):
        load_state(root / "step-0000012", tiny_model)


def test_a_checkpoint_of_other_shapes_says_what_to_do(tmp_path):
    """A vit checkpoint of kimivl before 2026-12-06 (scalar log_temp, now of shape (1,)) failed to resume with the
    shapes alone; the error now says where such a checkpoint comes from and how to go on."""

    class Heads(torch.nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.log_temp = torch.nn.Parameter(torch.zeros(shape))

    saved = save_state(tmp_path / "checkpoints", Heads(()), {"step": 2})
    with pytest.raises(TrainingError) as e:
        load_state(saved, Heads((1,)))
    assert "log_temp: checkpoint [] vs model [1]" in str(e.value)
    assert str(e.value).endswith(f"start the stage afresh (remove {tmp_path / 'checkpoints'})")


def test_a_latest_pointer_to_an_incomplete_checkpoint_is_an_error(tiny_model, tmp_path):
    """``latest`` naming a checkpoint without its trainer state is named, not resumed from weights alone."""
    saved = save_state(tmp_path, tiny_model, {"step": 2})
    assert latest_checkpoint(tmp_path) == saved
    (saved / "trainer.pt").unlink()
    with pytest.raises(FileNotFoundError, match=f"names {saved}, which is not a complete checkpoint"):
        latest_checkpoint(tmp_path)
