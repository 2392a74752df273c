"""What protects a run: weights checked after every update, Ctrl-C saving the step, a full disk named, a torn metrics
line tolerated, one run per directory, stage names confined to their folder, exports that never replace another run's
model."""

import dataclasses
import datetime
import errno
import json
import logging
import math
import os
import re
import signal
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
from held_run import run_held_elsewhere
from test_loop import joint_loss, setup

from kimivl import KimiVL
from kimivl.checkpoint import CheckpointError
from kimivl.distributed.world import World
from kimivl.train.interrupt import Interrupted, StopRequest, stop_on_interrupt
from kimivl.train.lock import check_free, run_lock
from kimivl.train.loop import LoopConfig, train_loop
from kimivl.train.metrics import MetricsLog, plot_curves, read_metrics
from kimivl.train.pipeline import EXPORT_RECORD, check_export, global_schedule, keep_seed, stage_scheduler
from kimivl.train.recipe import RecipeError, StageNameError, load_recipe
from kimivl.train.state import TrainState, latest_checkpoint, load_state_sharded, save_state, save_state_sharded
from kimivl.train.step import TrainingError, check_loss, optimizer_step, total_norm


def test_an_update_that_makes_weights_non_finite_stops_and_names_them():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    (model(torch.randn(8, 4)).pow(2).mean() * 1e12).backward()
    told = []
    with pytest.raises(
        TrainingError,
        match=r"s: step 1: the update made 2 weight tensors non-finite \(0.weight, "
        r"1.weight\): is the learning rate too high\? The last good state is the "
        r"checkpoint c",
    ):
        optimizer_step(
            model,
            torch.optim.SGD(model.parameters(), lr=1e30),
            1e20,
            "s: step 1",
            lambda ok: told.append(ok) or "the checkpoint c",
        )
    assert told == [False]  # the current weights are not offered as the good state


def test_gradients_are_clipped_to_the_norm_clip_and_never_scaled_up():
    """Below ``clip`` the gradients are left exactly as they are; above it they are scaled to norm ``clip``; the norm
    before clipping is returned."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.manual_seed(0)
    for norm in (0.5, 5.0):
        grads = [torch.randn_like(p) for p in model.parameters()]
        scale = norm / torch.cat([g.flatten() for g in grads]).norm()
        for p, g in zip(model.parameters(), grads):
            p.grad = g * scale
        before = [p.grad.clone() for p in model.parameters()]
        got = optimizer_step(model, optimizer, 1.0, "s: step 1", lambda ok: "c")
        torch.testing.assert_close(got, torch.tensor(norm), rtol=1e-6, atol=0)
        after = torch.cat([p.grad.flatten() for p in model.parameters()])
        if norm < 1:
            assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
        else:
            torch.testing.assert_close(after.norm(), torch.tensor(1.0), rtol=1e-6, atol=0)
            torch.testing.assert_close(after, torch.cat([b.flatten() for b in before]) / norm, rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_non_finite_loss_on_any_rank_stops_every_rank():
    class World:
        active = True

        def __init__(self, others_bad: float):
            self.others_bad = others_bad

        def sum(self, t):
            return t + self.others_bad  # the other ranks' count of non-finite losses

    def last_good(weights_ok):
        return "step-2" if weights_ok else "an earlier one"

    check_loss(torch.tensor(2.0), "s: step 3", last_good, World(0.0))  # every rank's loss is finite
    with pytest.raises(TrainingError, match=r"^s: step 3: a rank's loss is not finite; the last good state is step-2$"):
        check_loss(torch.tensor(2.0), "s: step 3", last_good, World(1.0))
    with pytest.raises(TrainingError, match=r"^s: step 3: a rank's loss is inf; "):
        check_loss(torch.tensor(math.inf), "s: step 3", last_good, World(0.0))
    with pytest.raises(TrainingError, match=r"^s: step 3: loss is not finite; the last good state is step-2$"):
        check_loss(torch.tensor([1.0, math.nan]), "s: step 3", last_good)


def test_loop_never_saves_non_finite_weights(small_model, small_processor, tmp_path, monkeypatch):
    model, data, opt, sched = setup(small_model, small_processor)
    step = opt.step
    calls = {"n": 0}

    def blow_up(*args, **kwargs):
        step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                model.language_model.lm_head.weight.fill_(float("inf"))

    monkeypatch.setattr(opt, "step", blow_up)
    with pytest.raises(
        TrainingError,
        match="s: step 3: the update made 1 weight tensors non-finite "
        r"\(language_model.lm_head.weight\).* the checkpoint .*step-0000002",
    ):
        train_loop(
            model, joint_loss, data, opt, sched, LoopConfig(steps=5, ckpt_every=2), tmp_path, "s", progress=False
        )
    saved = latest_checkpoint(tmp_path / "s" / "checkpoints")
    assert saved.name == "step-0000002"
    assert all(torch.isfinite(t).all() for t in KimiVL.from_pretrained(saved).state_dict().values())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_the_step_and_stops(small_model, small_processor, tmp_path, sig):
    """Ctrl-C, and SIGTERM (how SLURM, Kubernetes and torchrun stop a job), save the step in progress and stop."""
    model, data, opt, sched = setup(small_model, small_processor)
    calls = {"n": 0}
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # default, or SIG_IGN in background

    def interrupt_in_step_2(model, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), sig)  # handled after the step, not inside it
        return joint_loss(model, batch)

    with pytest.raises(Interrupted, match=r"s: stopped at your request after step 2 of 6; saved at .*step-0000002"):
        train_loop(
            model,
            interrupt_in_step_2,
            data,
            opt,
            sched,
            LoopConfig(steps=6, ckpt_every=10),
            tmp_path,
            "s",
            progress=False,
        )
    assert latest_checkpoint(tmp_path / "s" / "checkpoints").name == "step-0000002"
    assert {s: signal.getsignal(s) for s in before} == before  # the signals behave as they did before the run


def test_a_second_signal_stops_at_once_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), stop_on_interrupt() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        pytest.fail("the second signal was taken for the first")
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_sharded_norm_counts_each_replica_s_shards_once():
    class World:
        active, device, dp_replicate = True, "cpu", 2

        def sum(self, t):
            return 2 * t  # two replicas holding the same shards

    tensors = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]], dtype=torch.bfloat16)]
    assert total_norm(tensors, World()).item() == 5.0


def test_a_stop_asked_while_the_ranks_agree_counts_at_the_next_step():
    """A signal landing inside the all-reduce must not be erased by its result: every rank then stops a step later."""
    from kimivl.train.loop import agreed

    stop = StopRequest()

    class World:
        active, device = True, "cpu"

        def __init__(self):
            self.calls = 0

        def sum(self, t):
            self.calls += 1
            if self.calls == 1:
                stop.requested = True  # arrives during the collective, after this rank sent 0
                return torch.tensor(0.0)
            return t  # the next step: this rank's request is in the sum

    world = World()
    assert not agreed(stop, world).requested and stop.requested  # this step: nobody asked; the request stays
    assert agreed(stop, world).requested


def test_a_write_the_disk_refuses_is_named_and_leaves_no_partial_checkpoint(small_model, tmp_path, file_size_limit):
    ckpts = tmp_path / "checkpoints"
    save_state(ckpts, small_model, {"step": 2})
    weights = (ckpts / "step-0000002" / "model.safetensors").stat().st_size
    file_size_limit(weights + 100_000)  # the weights fit, trainer.pt does not: torch.save raises its RuntimeError
    with pytest.raises(
        TrainingError,
        match=r"checkpoint .*step-0000004 not written: cannot write .*step-0000004\.tmp.trainer\.pt: File too large; "
        r".*step-0000002 is intact",
    ):
        save_state(ckpts, small_model, {"step": 4, "optimizer": torch.zeros(weights // 4 + 100_000)})
    file_size_limit(None)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000002"]


def test_a_full_disk_under_torch_save_says_so(tmp_path):
    from kimivl.train.state import _save_torch

    with pytest.raises(OSError, match=r"the disk is full: writing /dev/full failed \(No space left on device\)"):
        _save_torch({"x": torch.zeros(100_000)}, Path("/dev/full"))  # a device every write to which is ENOSPC


def test_a_torch_save_error_that_no_write_caused_is_raised_as_it_is(tmp_path, monkeypatch):
    from kimivl.train.state import _save_torch

    def refuse(obj, f):
        raise RuntimeError("cannot save this object")

    monkeypatch.setattr(torch, "save", refuse)
    with pytest.raises(RuntimeError, match="^cannot save this object$"):
        _save_torch({"x": 1}, tmp_path / "trainer.pt")


def _two_checkpoints(small_model, small_processor, tmp_path):
    model, data, opt, sched = setup(small_model, small_processor)
    config = LoopConfig(steps=4, ckpt_every=2)
    train_loop(model, joint_loss, data, opt, sched, config, tmp_path, "s", progress=False)
    return tmp_path / "s" / "checkpoints"


@pytest.mark.parametrize(
    "damage, raised",
    [
        (lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]), "RuntimeError"),
        (lambda f: f.write_bytes(bytes(range(256)) * 40), "UnpicklingError"),
        (lambda f: f.write_bytes(b""), "EOFError"),
    ],
)
def test_a_damaged_trainer_file_is_named_with_the_checkpoint_to_resume_from(
    small_model, small_processor, tmp_path, damage, raised
):
    ckpts = _two_checkpoints(small_model, small_processor, tmp_path)
    damage(ckpts / "step-0000004" / "trainer.pt")
    model, data, opt, sched = setup(small_model, small_processor)
    state = TrainState(ckpts, "s", model, opt, sched)
    with pytest.raises(
        TrainingError,
        match=rf"cannot read .*step-0000004.trainer\.pt: it is damaged or cut short \({raised}\); the checkpoint "
        rf".*step-0000004 is damaged: resume from the checkpoint before it by writing step-0000002 into .*latest "
        r"\(checkpoints kept: step-0000002\), then remove",
    ):
        state.resume()
    (ckpts / "latest").write_text("step-0000002\n")  # as the error says
    assert state.resume() == ckpts / "step-0000002" and state.step == 2


def test_damaged_weights_of_the_only_checkpoint_say_to_start_afresh(small_model, small_processor, tmp_path):
    ckpts = _two_checkpoints(small_model, small_processor, tmp_path)
    (ckpts / "step-0000002").rename(tmp_path / "away")
    weights = ckpts / "step-0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    model, _, opt, sched = setup(small_model, small_processor)
    with pytest.raises(
        TrainingError,
        match=r"cannot read .*model\.safetensors: .*; the checkpoint .*step-0000004 is damaged: there is no older "
        r"checkpoint: remove .*checkpoints to start the stage afresh",
    ):
        TrainState(ckpts, "s", model, opt, sched).resume()


def test_a_torn_last_metrics_line_is_passed_over_and_mended(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stage": "a", "step": 1, "loss": 2.0}\n{"stage": "a", "step": 2, "lo')
    assert read_metrics(path) == [{"stage": "a", "step": 1, "loss": 2.0}]
    with MetricsLog(tmp_path, "a", start=1) as log:
        log.write(2, {"loss": 1.5})
    assert read_metrics(path) == [{"stage": "a", "step": 1, "loss": 2.0}, {"stage": "a", "step": 2, "loss": 1.5}]
    path.write_text('{"stage": "a", "step": 1}\n\n{"stage": "a", "step": 2}\n')  # a blank line is passed over
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"stage": "a", "step": 1}\nnot json\n{"stage": "a", "step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2 is not a JSON record"):
        read_metrics(path)


def test_a_stage_drops_only_its_own_records_after_the_step_it_resumes_from(tmp_path):
    """A later stage, or a resumed one, never erases another stage's curve, whatever its steps."""
    with MetricsLog(tmp_path, "a") as log:
        for step in (1, 2, 3):
            log.write(step, {"loss": 4.0 - step})
    with MetricsLog(tmp_path, "b") as log:  # the next stage starts at step 0
        log.write(1, {"loss": 5.0})
        log.write(2, {"loss": 4.5})
    with MetricsLog(tmp_path, "b", start=1):  # b resumed from its step 1: its step 2 goes
        pass
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["stage"], r["step"], r["loss"]) for r in rows] == [
        ("a", 1, 3.0),
        ("a", 2, 2.0),
        ("a", 3, 1.0),
        ("b", 1, 5.0),
    ]


def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RecipeError, match=rf"{tmp_path} is in use by another run \(pid {os.getpid()} on "):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # free again once the first run ends
        pass


def test_the_lock_takes_the_umask_and_another_users_lock_or_an_unwritable_folder_is_named(tmp_path, unprivileged):
    """A group sharing a folder (umask 002): the lock was made 0644 whatever the umask, so a second user could never
    take it, and was told only "[Errno 13] Permission denied: '.../.lock'"; a default --out in a read-only clone was
    "Permission denied: 'runs'"."""
    umask = os.umask(0o002)
    try:
        with run_lock(tmp_path / "shared"):
            pass
    finally:
        os.umask(umask)
    lock = tmp_path / "shared" / ".lock"
    assert stat.S_IMODE(lock.stat().st_mode) == 0o664
    lock.chmod(0o444)  # as another user's run left it (0644): not writable for this one

    def take(out):
        with run_lock(out):
            return "taken"

    with pytest.raises(
        RecipeError,
        match=rf"{lock} cannot be opened for writing \(Permission denied\): .*; make it writable for this user",
    ):
        unprivileged(lambda: take(tmp_path / "shared"))
    assert unprivileged(lambda: check_free(tmp_path / "shared")) is None  # no run holds it: run_lock names it
    (tmp_path / "clone").mkdir(mode=0o555)
    with pytest.raises(
        RecipeError, match=rf"cannot write to {tmp_path}/clone/runs/eval: Permission denied \(.*runs\); choose another"
    ):
        unprivileged(lambda: take(tmp_path / "clone" / "runs" / "eval"))
    lock.chmod(0o664)  # made writable for the group, as the refusal advises
    assert unprivileged(lambda: take(tmp_path / "shared")) == "taken"


def test_a_lock_the_disk_will_not_take_is_named_and_let_go(tmp_path, file_size_limit):
    """Its holder record refused (a full disk) was "cannot write to OUT: ... (None)", and the descriptor, still
    holding the lock, was lost: no run could take the folder until the process ended."""
    file_size_limit(0)
    with pytest.raises(RecipeError, match=rf"cannot write to {tmp_path}: File too large \({tmp_path}/\.lock\); choose"):
        with run_lock(tmp_path):
            pass
    file_size_limit(None)
    with run_lock(tmp_path):
        pass


def test_an_out_in_use_is_checked_without_a_world_and_this_process_s_own_run_holds_it_free(tmp_path):
    """``check_free`` called as the library allows, without a ``world``: another process's run is named, no run or
    this process's own is none."""
    check_free(tmp_path)
    with run_held_elsewhere(tmp_path) as holder:
        with pytest.raises(RecipeError, match=rf"{tmp_path} is in use by another run \(pid {holder.pid} on .*; wait"):
            check_free(tmp_path)
    with run_lock(tmp_path):
        check_free(tmp_path)


def test_a_train_on_an_out_in_use_names_the_run_before_asking_for_resume(tmp_path, capsys):
    """Without --resume, a second ``kimivl train`` on the out of a live run said the out "already holds a run of this
    recipe; pass --resume to continue it": the user did, and only then learnt the folder was in use."""

    from kimivl.cli import main

    out = tmp_path / "run"
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(8)))
    stage = {"name": "s", "kind": "joint", "steps": 2, "lr": 1e-3, "budget": 64, "mix": {"text": 1}}
    recipe = {"name": "r", "out": str(out), "base": {"preset": "tiny"}, "tokenizer": {"train_vocab": 280}}
    recipe.update(sources={"text": str(tmp_path / "text.jsonl")}, stages=[stage])
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    (out / "s" / "checkpoints").mkdir(parents=True)  # the live run's first stage has begun
    with run_held_elsewhere(out) as holder:
        for resume in ([], ["--resume"]):
            assert main(["train", str(tmp_path / "r.yaml"), *resume]) == 2
            err = capsys.readouterr().err
            assert f"kimivl train: error: {out} is in use by another run (pid {holder.pid} on " in err, err
            assert "--resume" not in err and "; wait for it to end, or choose another --out\n" in err
    assert main(["train", str(tmp_path / "r.yaml")]) == 2  # the run ended: a begun run is now what stops it
    assert "already holds a run of this recipe; pass --resume to continue it" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")  # an --out that is a file is named as one (was ENOTDIR for .lock)
    assert main(["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "a-file")]) == 2
    assert f"{tmp_path / 'a-file'} is not a directory" in capsys.readouterr().err


def test_without_fcntl_scoring_still_imports_and_training_is_refused_clearly(tmp_path):
    """On Windows (no ``fcntl``) ``kimivl eval``, ``kimivl train --plan`` and ``kimivl info --dp-shard`` died at import
    (18 modules import ``kimivl.distributed.world``); now only the lock of a run's output directory (training's, an
    eval's) needs it, and says what to do."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['fcntl'] = None\n"  # import fcntl fails, as on Windows
        "import kimivl.eval.runner, kimivl.train.pipeline, kimivl.rl.trainer, kimivl.cli\n"
        "from pathlib import Path\n"
        "from kimivl.train.lock import run_lock\n"
        "from kimivl.train.recipe import RecipeError\n"
        "try:\n"
        "    with run_lock(Path(sys.argv[1])): pass\n"
        "except RecipeError as e: print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"{tmp_path} would be locked for this run alone with fcntl (training and eval take such a lock on their output "
        "directory), which this platform lacks: run kimivl on Linux or macOS (on Windows, under WSL)\n"
    )


def test_a_refused_run_is_told_when_the_holder_started_with_its_utc_offset(tmp_path, monkeypatch):
    """The holder's start was local time without a zone: a run in another zone, or on another host, misread it."""
    monkeypatch.setenv("TZ", "KIR-14")  # UTC+14, a POSIX zone that needs no tz database
    time.tzset()
    try:
        with run_lock(tmp_path):
            with pytest.raises(RecipeError) as refused:
                with run_lock(tmp_path):
                    pass
    finally:
        monkeypatch.undo()
        time.tzset()
    started = re.search(r"started ([^)]*)\)", str(refused.value)).group(1)
    assert started.endswith("+14:00"), refused.value
    now = datetime.datetime.now(datetime.timezone.utc)
    assert abs((datetime.datetime.fromisoformat(started) - now).total_seconds()) < 60


def _recipe(tmp_path, **changes):
    recipe = {
        "name": "r",
        "out": str(tmp_path / "run"),
        "sources": {"t": "t.jsonl"},
        "tokenizer": {"train_vocab": 300},
        "export": {"path": "models/mine"},
        "stages": [{"name": "a", "kind": "joint", "steps": 4, "lr": 1e-3, "mix": {"t": 1}}],
        **changes,
    }
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    return tmp_path / "r.yaml"


@pytest.mark.parametrize(
    "stage, match",
    [
        ({"name": "../../x"}, r"stage name '\.\./\.\./x': use letters, digits"),
        ({"name": "world"}, "stage name 'world': .* other than"),
        ({"name": ".hidden"}, "stage name '.hidden'"),
        # one folder on macOS's and Windows' disks: the stage would have resumed from, or exported, another's
        ({"name": "Tokenizer"}, "stage name 'Tokenizer': .* other than .* in any letter case"),
        ({"name": "base"}, "stage name 'base': .* other than"),  # its evaluation was the base model's, overwritten
        ({"name": "CON.sft"}, "stage name 'CON.sft': .* Windows' device names"),
        ({"name": "sft."}, r"stage name 'sft\.': .* not ending with '\.'"),
        ({"name": "straße"}, "stage name 'straße': use letters, digits"),
        ({"name": 3}, "stage name 3: use letters"),
        ({"schedule": "cosine", "warmup": 4}, r"stage 'a': warmup \(4 steps\) must be below steps \(4\)"),
        (  # ignored unless the stage runs its own schedule
            {"warmup": 2},
            r"stage 'a': warmup \(2 steps\) .* set schedule: cosine .* or .* the recipe's schedule.warmup",
        ),
    ],
)
def test_stage_names_and_warmups_that_cannot_work(tmp_path, stage, match):
    path = _recipe(tmp_path, stages=[{"name": "a", "kind": "joint", "steps": 4, "lr": 1e-3, "mix": {"t": 1}, **stage}])
    with pytest.raises(RecipeError, match=match):
        load_recipe(path)


@pytest.mark.parametrize("names", [["base"], ["sft."], ["CON"], ["sft", "SFT"]])
def test_a_stage_name_refused_since_its_run_began_says_to_move_its_work_with_it(tmp_path, names):
    """A run of an earlier kimivl whose stage took a name refused now was refused with the rule alone, never naming
    the folder under out; renamed in the recipe alone, as the rule suggests, the stage trained again from scratch.
    Where out holds the stage's work, the refusal names it and says to move it to the new name."""
    run = tmp_path / "run"
    stages = [{"name": n, "kind": "joint", "steps": 4, "lr": 1e-3, "mix": {"t": 1}} for n in names]
    path = _recipe(tmp_path, stages=stages)
    with pytest.raises(RecipeError) as rule:  # nothing under out: the rule alone
        load_recipe(path)
    assert "holds the work" not in str(rule.value)
    held = names[-1]
    (run / held / "checkpoints" / "step-0000002").mkdir(parents=True)
    (run / "tensorboard" / held).mkdir(parents=True)
    (run / "eval").mkdir()
    for end in (".json", ".lengths.json", ".other.json"):
        (run / "eval" / f"{held}{end}").write_text("{}")
    with pytest.raises(RecipeError) as refused:
        load_recipe(path)
    said = str(refused.value)
    assert said.startswith(str(rule.value))
    found = f"{held}, tensorboard/{held}, eval/{held}.json, eval/{held}.lengths.json"
    assert (
        f". {run} holds the work of a stage of that name, from a kimivl that took it ({found}): rename the stage in "
        f"the recipe (and where eval.after and schedule.decay_stages name it) and move what it wrote under its name to "
        f"the new one ({run / held} to {run}/NEW, tensorboard/{held} and eval/{held}.*"
    ) in said
    assert said.endswith("renamed in the recipe alone, it would train again from scratch")
    assert ("else it is the base model's" in said) == (held == "base")


def test_of_stages_named_alike_but_for_letter_case_only_those_are_refused_and_advised_on(tmp_path):
    """Another stage's work under out is no reason to move it: the advice is for the stages refused only."""
    stages = [{"name": n, "kind": "joint", "steps": 4, "lr": 1e-3, "mix": {"t": 1}} for n in ("a", "sft", "SFT")]
    path = _recipe(tmp_path, stages=stages)
    (tmp_path / "run" / "a" / "checkpoints").mkdir(parents=True)
    with pytest.raises(StageNameError) as refused:
        load_recipe(path)
    assert refused.value.names == ["sft", "SFT"] and "holds the work" not in str(refused.value)


def test_the_advice_names_each_refused_stage_whose_work_out_holds_a_final_model_alone_too(tmp_path):
    from kimivl.train.pipeline import renamed_stage_advice

    (tmp_path / "Base" / "final").mkdir(parents=True)  # finished, its checkpoints removed
    (tmp_path / "CON" / "checkpoints").mkdir(parents=True)
    said = renamed_stage_advice(tmp_path, ["Base", "CON"])
    assert said.startswith(
        f". {tmp_path} holds the work of stages of those names, from a kimivl that took it (Base; CON)"
    )
    assert (
        f"({tmp_path / 'Base'} to {tmp_path}/NEW, tensorboard/Base and eval/Base.* (where eval.after names it; else it "
        "is the base model's) likewise)"
    ) in said


def test_a_recipe_path_the_filesystem_encoding_cannot_encode_is_named(tmp_path, ascii_filesystem):
    """Under LANG=C without Python's UTF-8 mode a recipe's ``out: выход`` failed with a bare "'ascii' codec can't
    encode", naming no path."""
    path = _recipe(tmp_path, out=str(tmp_path / "выход run"))
    imports = "from kimivl.train.recipe import RecipeError, load_recipe"
    encoding, said, stderr = ascii_filesystem(imports, "load_recipe(sys.argv[1])", "RecipeError", str(path))
    assert said == [
        ascii(
            f"recipe {path}: out: {tmp_path / 'выход run'} holds 'выход', which the filesystem encoding ({encoding}) "
            "cannot encode: run with PYTHONUTF8=1, or in a UTF-8 locale (LANG=C.UTF-8)"
        )
    ], stderr


def test_yaml_exponents_are_numbers_duplicate_keys_and_bad_seeds_are_errors(tmp_path):
    stage = "{name: a, kind: joint, steps: 4, lr: %s, mix: {t: 1}}"
    base = "name: r\nout: %s\ntokenizer: {train_vocab: 260}\nsources: {t: t.jsonl}\n" % (tmp_path / "run")
    base += "stages: [%s]\n" % stage
    (tmp_path / "r.yaml").write_text(base % "1e-3")  # YAML 1.1 alone reads 1e-3 as a string
    assert load_recipe(tmp_path / "r.yaml").stages[0].lr == 0.001
    (tmp_path / "r.yaml").write_text(base % "1e-3" + "seed: 1\nseed: 2\n")
    with pytest.raises(RecipeError, match="key 'seed' appears twice"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text(base % "1e-3")
    for seed in (-1, 2**64, "7"):
        with pytest.raises(RecipeError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
            load_recipe(tmp_path / "r.yaml", {"seed": seed})


@pytest.mark.parametrize(
    "extra, match",
    [
        ("[a, b]: 1\n", "a key is a list or a mapping"),  # crashed on `key in seen`: unhashable
        ("? {a: 1}\n: 1\n", "a key is a list or a mapping"),
        ("1: x\nfoo: y\n", r"unknown keys \[1, 'foo'\]"),  # crashed sorting an int among strings
        ("schedule: {1: 2, foo: 3}\n", r"schedule has unknown keys \[1, 'foo'\]; it takes"),
    ],
)
def test_recipe_keys_that_are_lists_or_mix_numbers_and_names_are_named(tmp_path, extra, match):
    base = "name: r\nout: %s\ntokenizer: {train_vocab: 260}\nsources: {t: t.jsonl}\n" % (tmp_path / "run")
    base += "stages: [{name: a, kind: joint, steps: 4, lr: 1e-3, mix: {t: 1}}]\n"
    (tmp_path / "r.yaml").write_text(base + extra)
    with pytest.raises(RecipeError, match=match):
        load_recipe(tmp_path / "r.yaml")


def test_source_stage_and_rl_unknown_keys_mixing_numbers_and_names_are_named(tmp_path):
    head = f"name: r\nout: {tmp_path / 'run'}\ntokenizer: {{train_vocab: 260}}\nsources: {{t: t.jsonl}}\n"
    stage = "{name: a, kind: joint, steps: 4, lr: 1e-3, mix: {t: 1}}"
    (tmp_path / "r.yaml").write_text(head.replace("t.jsonl", "{path: t.jsonl, 1: x, foo: y}") + f"stages: [{stage}]\n")
    with pytest.raises(RecipeError, match=r"data source 't': unknown keys \[1, 'foo'\]; a source takes 'path'"):
        load_recipe(tmp_path / "r.yaml")
    stage = "{name: a, kind: joint, steps: 4, lr: 1e-3, mix: {t: 1}, 1: x, foo: y}"
    (tmp_path / "r.yaml").write_text(f"{head}stages: [{stage}]\n")
    with pytest.raises(RecipeError, match=r"stage 'a': unknown keys \[1, 'foo'\]; a joint stage takes"):
        load_recipe(tmp_path / "r.yaml")
    stage = "{name: a, kind: rl, steps: 4, lr: 1e-3, sources: [t], rl: {1: x, foo: y}}"
    (tmp_path / "r.yaml").write_text(f"{head}stages: [{stage}]\n")
    with pytest.raises(RecipeError, match=r"stage 'a': rl has unknown keys \[1, 'foo'\]; it takes"):
        load_recipe(tmp_path / "r.yaml")


def test_a_recipe_warmup_longer_than_its_stages(tmp_path):
    with pytest.raises(
        RecipeError,
        match=r"schedule.warmup \(10 steps\) must be below the steps of the stages that "
        r"continue the recipe-wide schedule \(4\)",
    ):
        load_recipe(_recipe(tmp_path, schedule={"warmup": 10}))
    with pytest.raises(RecipeError, match=r"schedule.warmup \(4 steps\) must be below"):  # the LR would never peak
        load_recipe(_recipe(tmp_path, schedule={"warmup": 4}))
    assert load_recipe(_recipe(tmp_path, schedule={"warmup": 3})).schedule["warmup"] == 3


def test_a_decay_that_begins_before_the_recipe_warmup_ends(tmp_path):
    """The decay would start later than its stage (the curve's stable part cannot be shorter than nothing): the LR
    would rise during the cooldown."""
    stages = [
        {"name": "a", "kind": "joint", "steps": 4, "lr": 1e-3, "mix": {"t": 1}},
        {"name": "cool", "kind": "joint", "steps": 6, "lr": 1e-3, "mix": {"t": 1}},
    ]
    with pytest.raises(
        RecipeError,
        match=r"schedule.warmup \(5 steps\) must end before the decay begins: schedule.decay_stages \['cool'\] "
        r"start at step 4 .* at most 4 steps",
    ):
        load_recipe(_recipe(tmp_path, stages=stages, schedule={"warmup": 5, "decay_stages": ["cool"]}))
    recipe = load_recipe(_recipe(tmp_path, stages=stages, schedule={"warmup": 4, "decay_stages": ["cool"]}))
    curve, _ = global_schedule(recipe)
    assert [curve(i) for i in range(4, 10)] == pytest.approx([1.0] + [0.1 + 0.9 * (1 - i / 6) for i in range(1, 6)])


def test_the_recipe_wide_decay_runs_over_its_decay_stages_in_a_row(tmp_path):
    stages = [
        {"name": "a", "kind": "joint", "steps": 4, "lr": 1e-3, "mix": {"t": 1}},
        {"name": "cool", "kind": "joint", "steps": 3, "lr": 1e-3, "mix": {"t": 1}},
        {"name": "cool2", "kind": "joint", "steps": 3, "lr": 1e-3, "mix": {"t": 1}},
    ]
    schedule = {"warmup": 2, "decay_stages": ["cool", "cool2"]}
    curve, offsets = global_schedule(load_recipe(_recipe(tmp_path, stages=stages, schedule=schedule)))
    assert offsets == {"a": 0, "cool": 4, "cool2": 7}
    assert [curve(i) for i in range(10)] == pytest.approx(
        [0.5, 1.0, 1.0, 1.0] + [0.1 + 0.9 * (1 - i / 6) for i in range(6)]  # from the first decay stage on
    )


def test_a_stage_with_its_own_schedule_takes_no_steps_of_the_recipe_wide_curve(tmp_path):
    """The shared curve spans the 'continue' stages alone: a cosine stage before them moves none of their offsets."""
    stages = [
        {"name": "v", "kind": "joint", "steps": 5, "lr": 1e-3, "mix": {"t": 1}, "schedule": "cosine", "warmup": 1},
        {"name": "a", "kind": "joint", "steps": 4, "lr": 1e-3, "mix": {"t": 1}},
        {"name": "cool", "kind": "joint", "steps": 2, "lr": 1e-3, "mix": {"t": 1}},
    ]
    schedule = {"warmup": 2, "decay_stages": ["cool"]}
    curve, offsets = global_schedule(load_recipe(_recipe(tmp_path, stages=stages, schedule=schedule)))
    assert offsets == {"a": 0, "cool": 4}
    assert [curve(i) for i in range(7)] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 0.55, 0.1])


def test_a_stage_with_its_own_schedule_warms_up_then_follows_a_cosine(tmp_path):
    stage = {"name": "a", "kind": "joint", "steps": 6, "lr": 1e-3, "mix": {"t": 1}, "schedule": "cosine", "warmup": 2}
    recipe = load_recipe(_recipe(tmp_path, stages=[stage]))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler, lrs = stage_scheduler(recipe, recipe.stages[0], optimizer), []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"] / 1e-3)
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.8682, 0.55, 0.2318], abs=1e-4)  # down to 0.1 at step 6


def test_a_run_stopped_in_its_first_stage_goes_on_only_with_its_seed(tmp_path, caplog):
    """A stage's checkpoints, as its final, hold a data stream drawn with the run's seed; a begun run without a seed
    record is warned of once, the record then written."""
    recipe = load_recipe(_recipe(tmp_path))
    (recipe.out / "a" / "checkpoints" / "step-0000001").mkdir(parents=True)
    for warned in (True, False):
        caplog.clear()
        with caplog.at_level("WARNING", logger="kimivl.train.pipeline"):
            keep_seed(recipe, World())
        assert ("holds no record of its seed" in caplog.text) == warned
    with pytest.raises(RecipeError, match="was trained with seed 0, not 7"):
        keep_seed(load_recipe(_recipe(tmp_path), {"seed": 7}), World())


def test_a_fresh_run_records_its_seed_without_a_warning(tmp_path, caplog):
    """Only a begun run without a seed record (one begun before kimivl kept it) is warned about; a fresh run is not."""
    recipe = load_recipe(_recipe(tmp_path))
    recipe.out.mkdir(parents=True)
    with caplog.at_level("WARNING", logger="kimivl.train.pipeline"):
        keep_seed(recipe, World())
    assert "no record of its seed" not in caplog.text
    assert json.loads((recipe.out / "seed.json").read_text()) == {"seed": 0}


def test_a_sharded_run_s_initial_weights_hold_its_seed(tmp_path):
    """A preset's initial weights, written once to out/initial by a sharded run, were drawn with the run's seed: a run
    killed before its first checkpoint went on under another seed from them."""
    recipe = load_recipe(_recipe(tmp_path))
    (recipe.out / "initial").mkdir(parents=True)
    keep_seed(recipe, World())
    keep_seed(load_recipe(_recipe(tmp_path), {"seed": 7}), World())  # nothing drawn yet: the seed may change
    (recipe.out / "initial" / "config.json").write_text("{}")
    with pytest.raises(RecipeError, match="was trained with seed 7, not 0"):
        keep_seed(recipe, World())


def test_export_goes_under_out_and_never_replaces_another_runs_model(
    tmp_path, monkeypatch, small_model, small_processor
):
    monkeypatch.chdir(tmp_path)
    path = _recipe(tmp_path)
    assert load_recipe(path).export["path"] == "models/mine"  # relative to the working directory
    moved = load_recipe(path, {"out": str(tmp_path / "elsewhere")})
    assert moved.export["path"] == str(tmp_path / "elsewhere" / "models" / "mine")  # --out moves every output
    recipe = load_recipe(path)
    assert check_export(recipe).resolve() == tmp_path / "models" / "mine"  # nothing there yet
    small_model.save_pretrained(tmp_path / "models" / "mine")
    with pytest.raises(
        RecipeError, match="export path models/mine holds a model written by no recorded run, not by this run"
    ):
        check_export(recipe)
    (tmp_path / "models" / "mine" / EXPORT_RECORD).write_text(json.dumps({"out": "../../run"}))
    assert check_export(recipe).resolve() == tmp_path / "models" / "mine"  # this run's own export
    (tmp_path / "models" / "mine" / EXPORT_RECORD).write_text(json.dumps({"out": "../../other"}))
    with pytest.raises(RecipeError, match=f"written by the run in {tmp_path / 'other'}"):
        check_export(recipe)


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _retrained(final, rope_theta):
    """``final`` as a later stage leaves it: other weights, another config."""
    from safetensors.torch import load_file, save_file

    weights = load_file(final / "model.safetensors")
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, final / "model.safetensors")
    config = json.loads((final / "config.json").read_text())
    config["text_config"]["rope_theta"] = rope_theta
    (final / "config.json").write_text(json.dumps(config))


KILLED_EXPORT = """
import os, signal, sys
import kimivl.checkpoint as checkpoint
from kimivl import KimiVLProcessor
from kimivl.train import pipeline
from kimivl.train.recipe import load_recipe

save = checkpoint._atomic_save
def save_then_die(tensors, file, *marks):
    save(tensors, file, *marks)
    os.kill(os.getpid(), signal.SIGTERM)  # a time limit, after the weights and before the config
checkpoint._atomic_save = save_then_die
recipe = load_recipe("r.yaml")
pipeline._export(recipe, "final", KimiVLProcessor.from_pretrained("final"), pipeline.check_export(recipe))
"""


def test_an_export_killed_after_its_weights_leaves_the_previous_one_whole(
    tmp_path, monkeypatch, small_model, small_processor
):
    """A re-export was converted over the previous one file by file, config.json last: a SIGTERM between left the new
    weights with the old config (an old rope_theta), which loaded with no warning. Now the previous export stays
    whole until the new one is, and --resume exports again over what the killed one left."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from kimivl.train import pipeline

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(_recipe(tmp_path))
    small_model.save_pretrained(tmp_path / "final")
    small_processor.save_pretrained(tmp_path / "final")
    export = tmp_path / "models" / "mine"
    pipeline._export(recipe, tmp_path / "final", small_processor, check_export(recipe))
    before = _tree(export)
    assert json.loads(before[EXPORT_RECORD]) == {"out": "../../run"} and "tiktoken.model" in before
    _retrained(tmp_path / "final", 800000.0)

    killed = subprocess.run([sys.executable, "-c", KILLED_EXPORT], cwd=tmp_path, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGTERM, killed.stderr
    assert _tree(export) == before  # the previous export, whole: its weights with its config
    assert (tmp_path / "models" / ".mine.tmp" / "model.safetensors").is_file()  # killed after the weights

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "convert_checkpoint", full)
        with pytest.raises(OSError, match="No space left"):
            pipeline._export(recipe, tmp_path / "final", small_processor, check_export(recipe))
    assert _tree(export) == before and not (tmp_path / "models" / ".mine.tmp").exists()

    pipeline._export(recipe, tmp_path / "final", small_processor, check_export(recipe))  # as --resume does
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["mine"]
    exported = KimiVL.from_pretrained(export)
    assert exported.config.text_config.rope_theta == 800000.0 and exported.dtype == torch.bfloat16
    trained, written = load_file(tmp_path / "final" / "model.safetensors"), load_file(export / "model.safetensors")
    saved_as = {k: torch.float32 if ".mlp.gate." in k else torch.bfloat16 for k in trained}  # routers in float32
    assert all(torch.equal(trained[k].to(saved_as[k]), written[k]) for k in trained)
    assert sorted(_tree(export)) == sorted(before) and check_export(recipe).resolve() == export


def test_runs_sharing_an_export_path_take_turns_and_never_replace_each_others_export(
    tmp_path, small_model, small_processor
):
    """Each run checked its export path once, at its start: another run's export written there while it trained was
    replaced, and two runs exporting at once wrote into one temporary directory. Now a run checks the path again at
    its export, holding the path's export lock from the temporary directory to the rename."""
    import re

    from kimivl.train import pipeline

    final, shared = tmp_path / "final", tmp_path / "models" / "mine"
    small_model.save_pretrained(final)
    small_processor.save_pretrained(final)
    a = load_recipe(_recipe(tmp_path, export={"path": str(shared)}))
    b = load_recipe(tmp_path / "r.yaml", {"out": str(tmp_path / "other")})
    assert check_export(a) == check_export(b) == shared  # both runs start
    kept = f"this run's trained model is kept in {final}, not exported"
    pipeline._export(a, final, small_processor, shared)
    before = _tree(shared)
    taken = rf"export path {shared} holds a model written by the run in {tmp_path / 'run'}, not by this run"
    with pytest.raises(RecipeError, match=re.escape(taken) + r" \(.*\); " + re.escape(kept)):
        pipeline._export(b, final, small_processor, shared)
    assert _tree(shared) == before and sorted(p.name for p in shared.parent.iterdir()) == ["mine"]

    from kimivl.train.lock import export_lock
    from kimivl.train.recipe import ExportRefused

    with export_lock(shared, a.out, "wait"):  # as while run a exports
        busy = f"export path {shared} is being written by another run (pid {os.getpid()} on "
        with pytest.raises(ExportRefused, match=re.escape(busy) + rf".*, out {re.escape(str(a.out))}\); "):
            pipeline._export(a, final, small_processor, shared)  # even a's own: one writer at a time
    assert _tree(shared) == before
    pipeline._export(a, final, small_processor, shared)  # free again (--resume exports again)
    assert sorted(_tree(shared)) == sorted(before) and sorted(p.name for p in shared.parent.iterdir()) == ["mine"]


def test_an_export_lock_removed_as_it_was_taken_is_taken_again(tmp_path, monkeypatch):
    """The lock file goes when its export ends: a run that opened it just before holds a removed file, and must not
    take that for the lock (a third run would create and lock a new one), so it opens the path again."""
    from kimivl.train import lock

    path, opened = tmp_path / "mine", []
    file = tmp_path / ".mine.lock"
    real_open = os.open

    def open_then_removed(name, *args):
        fd = real_open(name, *args)
        opened.append(os.fstat(fd).st_ino)
        if len(opened) == 1:
            os.unlink(name)  # as the run exporting before ends its export
        return fd

    monkeypatch.setattr(lock.os, "open", open_then_removed)
    with lock.export_lock(path, tmp_path / "run", "wait"):
        assert len(opened) == 2 and os.stat(file).st_ino == opened[1]
        assert json.loads(file.read_text())["out"] == str(tmp_path / "run")
    assert not file.exists()


@pytest.mark.parametrize(
    "where, make, match",
    [
        ("taken", lambda p: p.write_text("x"), r"export path taken exists and is not a directory"),
        ("afile/model", lambda p: p.parent.write_text("x"), r"afile/model cannot be written: .*afile is not a dir"),
        ("notes", lambda p: (p.mkdir(), (p / "b.txt").touch(), (p / "a.txt").touch()), r"holds a.txt, b.txt and no"),
        (".", lambda p: None, r"export path \. holds the run's out directory"),
    ],
)
def test_an_export_path_that_cannot_take_the_export_stops_the_run_before_anything_runs(
    tmp_path, monkeypatch, where, make, match
):
    """``touch OUT/export`` was found with [Errno 17] only once every stage had trained."""
    from kimivl.train.pipeline import run_recipe

    monkeypatch.chdir(tmp_path)
    make(tmp_path / where)
    recipe = load_recipe(_recipe(tmp_path, export={"path": where}, base={"preset": "tiny"}))
    with pytest.raises(RecipeError, match=match):
        run_recipe(recipe, progress=False)
    assert not (tmp_path / "run").exists()  # no stage began


def test_an_export_path_in_a_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(_recipe(tmp_path))
    assert check_export(recipe).resolve() == tmp_path / "models" / "mine"
    monkeypatch.setattr(os, "access", lambda path, mode: path != tmp_path)  # as for a user without write access
    with pytest.raises(RecipeError, match=f"export path models/mine cannot be written: {tmp_path} is not writable"):
        check_export(recipe)


def _ctx(records, processor, text=False):
    from types import SimpleNamespace

    from kimivl.train.stages.base import StageContext

    return StageContext(
        SimpleNamespace(seed=0),
        SimpleNamespace(items={"c": records}, is_text={"c": text}, checked=set(), progress=False, answers_only=set()),
        processor,
    )


def test_sources_that_cannot_train_are_found_before_training(small_processor, caplog, tmp_path):
    from kimivl.data.formats import DataError
    from kimivl.processing.image import ImageError
    from kimivl.train.stages.joint import JointStage, check_sources
    from kimivl.train.stages.rl import RLStage, check_problems

    stage = JointStage(name="a", kind="joint", steps=2, lr=1e-3, mix={"c": 1})
    chat = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}
    no_answer = {"messages": [{"role": "user", "content": "2 + 2?"}]}
    ctx = _ctx([chat, no_answer], small_processor)
    encode = lambda name, record: small_processor.encode_for_training(record["messages"])  # noqa: E731
    with pytest.raises(DataError, match="data source 'c': record 2 has no assistant turn to learn from"):
        check_sources(stage, ctx, encode)
    check_sources(stage, _ctx([chat], small_processor), encode)
    assert "score no token" not in caplog.text
    nothing = type(small_processor.encode_text("x"))([1, 2], torch.zeros(0, 3, 14, 14), torch.zeros(0, 2), [-100] * 2)
    check_sources(stage, _ctx([chat], small_processor), lambda name, record: nothing)
    assert "the first 1 records of data source 'c' score no token" in caplog.text

    def truncated(name, record):  # a PNG whose header reads but whose pixels do not
        raise ImageError("image x.png cannot be decoded: image file is truncated")

    with pytest.raises(DataError, match="data source 'c': record 1 cannot be encoded: image x.png cannot be"):
        check_sources(stage, _ctx([chat], small_processor), truncated)

    posing = tmp_path / "notes.png"
    posing.write_text("a text file posing as an image")
    pictured = {
        "messages": [{"role": "user", "content": [{"type": "image", "image": str(posing)}]}, chat["messages"][1]]
    }
    with pytest.raises(DataError, match=f"record 1 names {posing}, which is no image that can be read"):
        check_sources(stage, _ctx([pictured], small_processor), encode)

    rl = RLStage(name="r", kind="rl", steps=2, lr=1e-3, sources=["c"])
    check_problems(rl, _ctx([{**chat, "meta": {"gold": "4"}}], small_processor))
    answer, system = chat["messages"][1], {"role": "system", "content": "Be brief."}
    for record in (  # no gold; a gold but nothing to answer, or only a system turn before the answer
        {**chat, "meta": {"task": "x"}},
        {"messages": [], "meta": {"gold": "4"}},
        {"messages": [answer], "meta": {"gold": "4"}},
        {"messages": [system, answer], "meta": {"gold": "4"}},
    ):
        with pytest.raises(DataError, match="record 1 is no RL problem: it needs a user prompt and meta.gold"):
            check_problems(rl, _ctx([record], small_processor))
    for meta, words in (  # what the reward would fail on mid-run is found before training
        ({"task": "reasoning", "gold": "n/a"}, "the reasoning reward cannot check .ValueError: could not convert"),
        ({"task": "reasoning", "gold": None}, "the reasoning reward cannot check .TypeError"),
    ):
        with pytest.raises(DataError, match=f"record 1 has a meta.gold {words}"):
            check_problems(rl, _ctx([{**chat, "meta": meta}], small_processor))
    # a box is checked in full: the stand-in click (0, 0) never reached the "a" of the second, which an answer
    # left of 0.5 would have met mid-run; no click hits a NaN or reversed box
    for box in ("missing", [0.5, "a", 1, 1], [0, 0, float("nan"), 1], [0.6, 0, 0.4, 1]):
        meta = {"task": "gui", "gold": "x"} | ({} if box == "missing" else {"box": box})
        with pytest.raises(DataError, match=r"record 1 is a gui problem whose meta.box is .* 4 finite numbers"):
            check_problems(rl, _ctx([{**chat, "meta": meta}], small_processor))
    check_problems(rl, _ctx([{**chat, "meta": {"task": "gui", "gold": "x", "box": [0, 0, 1, 1]}}], small_processor))


def _sharded_checkpoints(small_model, small_processor, tmp_path):
    """Two checkpoints of the sharded path (DCP), written by one process."""
    model, _, opt, _ = setup(small_model, small_processor)
    opt.init_state()
    for step in (2, 4):
        save_state_sharded(tmp_path, model, opt, {"step": step}, World())
    return model, opt


@pytest.mark.parametrize(
    "name, damage, named",
    [
        ("__0_0.distcp", lambda f: f.write_bytes(f.read_bytes()[:1000]), r".*step-0000004.__0_0\.distcp: damaged"),
        ("__0_0.distcp", lambda f: f.write_bytes(b"\1" * f.stat().st_size), r"the files of .*step-0000004: damaged"),
        (".metadata", lambda f: f.write_bytes(b""), r".*step-0000004.\.metadata: damaged"),
        ("rng-0.pt", lambda f: f.write_bytes(b""), r".*step-0000004.rng-0\.pt: it is damaged"),
    ],
)
def test_a_damaged_sharded_checkpoint_is_named_with_the_checkpoint_to_resume_from(
    small_model, small_processor, tmp_path, name, damage, named
):
    model, opt = _sharded_checkpoints(small_model, small_processor, tmp_path)
    damage(tmp_path / "step-0000004" / name)
    with pytest.raises(TrainingError, match=rf"cannot read {named}.*writing step-0000002 into .*latest"):
        load_state_sharded(tmp_path / "step-0000004", model, opt, World())
    load_state_sharded(tmp_path / "step-0000002", model, opt, World())


def test_a_sharded_checkpoint_the_disk_refuses_is_named_and_removed(
    small_model, small_processor, tmp_path, file_size_limit
):
    model, opt = _sharded_checkpoints(small_model, small_processor, tmp_path)
    file_size_limit(100_000)  # DCP raises its CheckpointException, a BaseException
    with pytest.raises(TrainingError, match=r"checkpoint .*step-0000006 not written: cannot write .*step-0000006\.tmp"):
        save_state_sharded(tmp_path, model, opt, {"step": 6}, World())
    file_size_limit(None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000002", "step-0000004"]


def test_a_metrics_write_the_disk_refuses_is_named_and_the_writer_thread_stays_quiet(
    tmp_path, file_size_limit, monkeypatch
):
    printed = []  # what the default threading.excepthook would print
    monkeypatch.setattr(threading, "excepthook", printed.append)
    log = MetricsLog(tmp_path, "s")
    log.write(1, {"loss": 1.0})
    file_size_limit((tmp_path / "metrics.jsonl").stat().st_size + 5000)
    with pytest.raises(OSError, match=r"cannot write .*tensorboard.s: File too large"):
        for step in range(2, 200):  # TensorBoard's events grow faster than the JSON lines
            log.write(step, {f"value{i}": 1.0 for i in range(20)})
    log.close()  # the failure was told once
    assert threading.excepthook == printed.append  # the process's hook is back (it was left replaced for good)
    file_size_limit(None)
    for thread in threading.enumerate():
        if type(thread).__name__ == "_AsyncWriterThread":
            thread.join(5)
    assert printed == []


def test_only_the_tensorboard_writer_s_os_errors_are_kept_quiet(tmp_path, monkeypatch):
    """While a log is open the process's hook still gets every other thread's errors, and the writer thread's other
    errors (a bug is no full disk)."""
    printed = []
    monkeypatch.setattr(threading, "excepthook", printed.append)

    class _AsyncWriterThread(threading.Thread):  # named as TensorBoard's
        pass

    def fail(error):
        raise error

    with MetricsLog(tmp_path, "s"):
        for thread in (
            threading.Thread(target=fail, args=(OSError(errno.ENOSPC, "another thread's"),)),
            _AsyncWriterThread(target=fail, args=(ValueError("a bug"),)),
            _AsyncWriterThread(target=fail, args=(OSError(errno.ENOSPC, "a full disk"),)),
        ):
            thread.start()
            thread.join()
    assert [(a.exc_type, str(a.exc_value)) for a in printed] == [
        (OSError, "[Errno 28] another thread's"),
        (ValueError, "a bug"),
    ]


def test_the_error_that_ends_a_metrics_block_is_raised_rather_than_a_failed_close(tmp_path):
    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    log = MetricsLog(tmp_path, "s")
    close, log._tb.close = log._tb.close, full
    with pytest.raises(RuntimeError, match="the block's error"), log:
        raise RuntimeError("the block's error")
    close()
    log = MetricsLog(tmp_path, "s")
    close, log._tb.close = log._tb.close, full
    with pytest.raises(OSError, match=r"the disk is full: writing .*tensorboard.s failed"), log:
        pass  # a block that ended well: the failed close is the error
    close()


def test_a_publish_stopped_between_its_renames_leaves_each_directory_whole(tmp_path, monkeypatch):
    """The previous directory was removed file by file before the new one was renamed in, so a kill during the removal
    left part of it (a config without weights) at the path. Now it is renamed aside first, and removed after."""
    from kimivl import files

    path = tmp_path / "export"
    path.mkdir()
    (path / "config.json").write_text("old config")
    (path / "model.safetensors").write_text("old weights")
    new = files.temporary_dir(path)
    new.mkdir()
    (new / "config.json").write_text("new config")
    replace = os.replace

    def stopped(src, dst):  # the process dies after moving the previous directory aside
        if Path(src) == new:
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(files.os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        files.publish_dir(path)
    old = tmp_path / ".export.old"
    assert not path.exists() and sorted(p.name for p in old.iterdir()) == ["config.json", "model.safetensors"]
    assert (new / "config.json").read_text() == "new config"
    monkeypatch.setattr(files.os, "replace", replace)
    files.publish_dir(path)  # the next run's publish (--resume exports again)
    assert [p.name for p in path.iterdir()] == ["config.json"] and (path / "config.json").read_text() == "new config"
    assert not old.exists() and not new.exists()


def test_a_whole_sharded_checkpoint_of_another_model_is_not_called_damaged(small_model, small_processor, tmp_path):
    """A DCP load that failed on whole files of other shapes (another model's) said 'damaged or cut short' and advised
    rolling latest back; it now says the checkpoint does not fit the model, naming the tensor."""
    _sharded_checkpoints(small_model, small_processor, tmp_path)
    cfg = dataclasses.replace(small_model.config)
    moe = cfg.text_config.moe_intermediate_size
    cfg.text_config = dataclasses.replace(cfg.text_config, moe_intermediate_size=moe * 2)
    other, _, opt, _ = setup(KimiVL(cfg), small_processor)
    opt.init_state()
    with pytest.raises(CheckpointError, match=r"step-0000004 does not fit this model \(rank 0: Size mismatch") as e:
        load_state_sharded(tmp_path / "step-0000004", other, opt, World())
    assert "damaged" not in str(e.value) and "experts.down_proj" in str(e.value)


def test_curves_leave_matplotlibs_backend_and_draw_only_stages_with_their_keys(tmp_path):
    """plot_curves switched the process to Agg (a notebook lost its inline plots), and an rl stage's reward plot
    drew an empty panel for the sft stage before it, warning 'No artists with labels found' (a crash under -W
    error) at every rl checkpoint."""
    import warnings

    import matplotlib
    from PIL import Image

    from kimivl.train.metrics import plot_curves

    rows = [{"stage": "sft", "step": s, "loss": 2.0 / s} for s in (1, 2)]
    rows += [{"stage": "rl", "step": s, "loss": 0.5, "reward": 0.1 * s} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # as a notebook's inline backend: another than Agg
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plot_curves(tmp_path / "metrics.jsonl", tmp_path / "rewards.png", ("reward",))
            plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png", ("loss", "val_loss"))
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(backend)
    assert Image.open(tmp_path / "rewards.png").size == (400, 300)  # one panel: rl's
    assert Image.open(tmp_path / "curves.png").size == (800, 300)  # sft's and rl's
    with pytest.raises(ValueError, match="holds no metrics of kl_ref"):
        plot_curves(tmp_path / "metrics.jsonl", tmp_path / "kl.png", ("kl_ref",))


def test_a_metric_that_is_not_finite_is_logged_as_standard_json_null(tmp_path, caplog):
    """A kl_ref whose exp overflowed was written as Infinity, which JSON readers other than Python's refuse."""
    with caplog.at_level(logging.WARNING, logger="kimivl.train.metrics"), MetricsLog(tmp_path, "rl") as log:
        log.write(1, {"kl_ref": math.inf, "loss": 0.5, "reward": math.nan})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}")) == {
        "stage": "rl",
        "step": 1,
        "kl_ref": None,
        "loss": 0.5,
        "reward": None,
    }
    assert "rl step 1: kl_ref, reward not finite, logged as null" in caplog.text
    plot_curves(tmp_path / "metrics.jsonl", tmp_path / "kl.png", ("kl_ref", "loss"))  # a null is left out of a curve
