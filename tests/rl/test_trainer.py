import copy
import io
import json
import logging
import re
import sys

import pytest
import torch

import kimivl.rl.trainer as trainer_mod
from kimivl.distributed.world import World
from kimivl.rl.objectives import group_baseline, length_reward, opmd_loss
from kimivl.rl.rollouts import token_logprobs
from kimivl.rl.trainer import RLConfig, RLTrainer
from kimivl.train.optim import build_optimizer
from kimivl.train.schedule import scheduler_at
from kimivl.train.step import TrainingError

PROBLEMS = [
    {"messages": [{"role": "user", "content": f"question {i}"}], "meta": {"task": "toy", "gold": i}} for i in range(4)
]


def starts_with_a_letter(text: str, meta: dict) -> float:
    """A trivially learnable reward: about 3% of the untrained model's first tokens are letters."""
    return float(text[:1].isalpha())


def make_trainer(model, processor, run_dir, reward_fn=starts_with_a_letter, difficulties=None, **overrides):
    settings = {
        "iterations": 12,
        "problems": 4,
        "samples": 8,
        "max_new_tokens": 3,
        "temperature": 1.0,
        "updates": 2,
        "bf16": False,
        "budget": 2048,
        "ckpt_every": 1,
        **overrides,
    }
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.0)
    scheduler = scheduler_at(optimizer, lambda step: 1.0)
    return RLTrainer(
        model,
        processor,
        PROBLEMS,
        RLConfig(**settings),
        optimizer,
        scheduler,
        run_dir,
        reward_fn=reward_fn,
        difficulties=difficulties,
    )


@pytest.mark.parametrize("objective", ["opmd", "grpo"])
def test_a_short_run_raises_the_reward(small_model, small_processor, tmp_path, objective):
    trainer = make_trainer(copy.deepcopy(small_model), small_processor, tmp_path, objective=objective)
    trainer.run(progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    first, last = sum(r["reward"] for r in rows[:3]) / 3, sum(r["reward"] for r in rows[-3:]) / 3
    assert first < 0.3 and last > first + 0.3, (first, last)
    for key in ("accuracy", "mean_length", "kl_ref", "all_correct", "all_wrong", "loss", "truncated"):
        assert key in rows[-1]
    assert (tmp_path / "rl" / "rewards.png").is_file() and (tmp_path / "rl" / "length.png").is_file()


def test_the_reference_is_the_policy_before_its_first_update(small_model, small_processor, tmp_path, monkeypatch):
    policy = copy.deepcopy(small_model)
    seen = []  # (grad enabled, the model's weights) at every log-prob pass

    def recording(model, *args, **kwargs):
        seen.append((torch.is_grad_enabled(), model, {k: v.clone() for k, v in model.state_dict().items()}))
        return token_logprobs(model, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "token_logprobs", recording)
    trainer = make_trainer(policy, small_processor, tmp_path)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer.step()
    reference = [s for s in seen if not s[0]]
    assert len(reference) == 1 and reference[0][1] is policy  # pi_i's log-probs: the policy itself, no copy
    assert all(torch.equal(v, before[k]) for k, v in reference[0][2].items())  # as it was when the step began
    assert any(not torch.equal(v, before[k]) for k, v in seen[-1][2].items())  # the last update saw it moved
    assert any(not torch.equal(v, before[k]) for k, v in policy.state_dict().items())

    def meddling_reward(text, meta):  # runs after the rollouts, before pi_i's log-probs
        with torch.no_grad():
            next(policy.parameters()).add_(1.0)
        return 0.0

    trainer.reward_fn = meddling_reward
    with pytest.raises(AssertionError, match="the policy changed while the reference pi_i's samples"):
        trainer.step()


def test_resume_after_a_crash_matches_an_uninterrupted_run(small_model, small_processor, tmp_path):
    straight = make_trainer(copy.deepcopy(small_model), small_processor, tmp_path / "a", iterations=4)
    straight.run(progress=False)

    calls = []

    def crashing(text, meta):
        calls.append(1)
        if len(calls) > 2 * 32:  # dies in iteration 3, after two checkpointed iterations
            raise KeyboardInterrupt
        return starts_with_a_letter(text, meta)

    first = make_trainer(copy.deepcopy(small_model), small_processor, tmp_path / "b", crashing, iterations=4)
    with pytest.raises(KeyboardInterrupt):
        first.run(progress=False)
    resumed = make_trainer(copy.deepcopy(small_model), small_processor, tmp_path / "b", iterations=4)
    resumed.run(progress=False)
    assert resumed.sampler.visits.sum() == 4 * 4
    for k, v in straight.policy.state_dict().items():
        assert torch.equal(v, resumed.policy.state_dict()[k]), k
    a = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    drop = ("seconds", "rollout_tokens_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [
        {k: v for k, v in r.items() if k not in drop} for r in b
    ]


def test_config_checks():
    with pytest.raises(ValueError, match="objective"):
        RLConfig(objective="ppo")
    with pytest.raises(ValueError, match="samples must be >= 2"):
        RLConfig(samples=1)
    for settings, match in (
        ({"rollout_batch": 0}, "rollout_batch, ckpt_every and keep_checkpoints must be >= 1"),
        ({"length_weight": -0.5}, "length_weight, length_warmup and kl_coef must be >= 0"),
        ({"clip_eps": 0}, "clip_eps > 0"),
        ({"tau": 0}, "tau must be > 0, got 0"),
        ({"grpo_level": "batch"}, "grpo_level is 'token'"),
        ({"priority": "success"}, "rl priority is 'signal' .* or 'failure' .*, got 'success'"),
        ({"priority_floor": 1.5}, r"priority_floor must lie in \(0, 1\], got 1.5"),
        ({"priority_floor": 0}, r"priority_floor must lie in \(0, 1\], got 0: .* would never draw again"),
        ({"success_decay": 1}, r"success_decay must lie in \[0, 1\), got 1: .* first visit for ever"),
        ({"success_decay": -0.1}, r"success_decay must lie in \[0, 1\), got -0.1"),
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"top_p": 0}, "top_p must be in"),
    ):
        with pytest.raises(ValueError, match=match):
            RLConfig(**settings)


def test_an_iteration_takes_updates_optimizer_steps(small_model, small_processor, tmp_path, monkeypatch):
    """3 problems x 2 samples = 6 answers in 4 updates: 4 optimizer steps (torch.chunk gave 3 parts of 2, one step
    fewer than asked, silently)."""
    steps = []
    step = trainer_mod.optimizer_step
    monkeypatch.setattr(trainer_mod, "optimizer_step", lambda *a, **k: steps.append(1) or step(*a, **k))
    trainer = make_trainer(copy.deepcopy(small_model), small_processor, tmp_path, problems=3, samples=2, updates=4)
    trainer.step()
    assert len(steps) == 4


def test_a_phase_drawing_fewer_answers_than_updates_says_so(small_model, small_processor, tmp_path, caplog):
    """A curriculum phase weighing one problem of the two asked: 2 answers for 4 updates, one step per answer."""
    labels, curriculum = ["easy", "hard", "hard", "hard"], {0.0: {"easy": 1}}
    trainer = make_trainer(
        copy.deepcopy(small_model),
        small_processor,
        tmp_path,
        difficulties=labels,
        curriculum=curriculum,
        problems=2,
        samples=2,
        updates=4,
    )
    with caplog.at_level(logging.WARNING, logger="kimivl.rl.trainer"):
        trainer.step()
    assert (
        "rl: iteration 1: 2 answers per rank, fewer than updates (4): 2 optimizer steps this iteration" in caplog.text
    )


def test_more_updates_than_answers_is_refused():
    with pytest.raises(ValueError, match=r"updates \(7 .*\) is more than the 6 answers .*\(problems x samples\)"):
        RLConfig(problems=3, samples=2, updates=7)
    assert RLConfig(problems=3, samples=2, updates=6).updates == 6


def test_the_priority_setting_reaches_the_sampler(small_model, small_processor, tmp_path):
    trainer = make_trainer(small_model, small_processor, tmp_path, priority="signal", priority_floor=0.1)
    trainer.sampler.update([0, 1, 2], [0.0, 0.5, 1.0])
    assert trainer.sampler.priorities().tolist() == pytest.approx([0.1, 1.0, 0.1, 1.0])
    assert make_trainer(small_model, small_processor, tmp_path).sampler.priority == "failure"


def test_difficulties_of_another_length_than_the_problems_are_refused(small_model, small_processor, tmp_path):
    with pytest.raises(ValueError, match="rl: 1 difficulties given for 4 problems"):
        make_trainer(small_model, small_processor, tmp_path, difficulties=["any"])


def test_a_phase_drawing_fewer_problems_than_ranks_is_named(small_model, small_processor, tmp_path):
    """Two ranks, and the phase in force weighs one problem: no rank would get a problem to answer."""
    labels, curriculum = ["easy", "hard", "hard", "hard"], {0.0: {"easy": 1}}
    trainer = make_trainer(
        small_model, small_processor, tmp_path, difficulties=labels, problems=2, curriculum=curriculum
    )
    trainer.world = World(rank=0, size=2)
    with pytest.raises(TrainingError, match="rl iteration 1: fewer problems can be drawn now than the 2 ranks"):
        trainer.step()


def test_each_iteration_takes_one_scheduler_step(small_model, small_processor, tmp_path):
    """The rate an iteration's updates use (logged as lr) follows the schedule one step per iteration."""
    trainer = make_trainer(copy.deepcopy(small_model), small_processor, tmp_path, problems=2, samples=2, updates=1)
    trainer.scheduler = scheduler_at(trainer.optimizer, lambda step: 1 / (1 + step))
    assert [trainer.step()["lr"] for _ in range(3)] == pytest.approx([1e-2, 5e-3, 1e-2 / 3])


def test_the_largest_seed_runs(small_model, small_processor, tmp_path):
    """Rollout seeds grow from the recipe's seed (x 1,000,003,000): past 2**64 they were refused at the first
    iteration; they now wrap."""
    trainer = make_trainer(copy.deepcopy(small_model), small_processor, tmp_path, iterations=1, seed=2**64 - 1)
    trainer.run(progress=False)
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 1


def _reward_by_call(values):
    """A reward stub: the i-th answer scored in an iteration gets ``values[i]`` (answers are scored problem by
    problem, k at a time)."""
    calls = []

    def reward(text, meta):
        calls.append(1)
        return values[(len(calls) - 1) % len(values)]

    return reward


@pytest.mark.parametrize("objective", ["opmd", "grpo"])
def test_each_objective_gets_its_own_advantage(small_model, small_processor, tmp_path, monkeypatch, objective):
    """OPMD weighs r - mean(r) of the problem's k answers; GRPO (r - mean) / (population std + 1e-6)."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5, 1.0, 1.0, 0.25, 0.0])  # 2 problems x 4 answers
    given = []
    for name in ("opmd_loss", "grpo_loss"):
        real = getattr(trainer_mod, name)
        monkeypatch.setattr(trainer_mod, name, lambda *a, real=real: given.append(a[2].cpu()) or real(*a))
    trainer = make_trainer(
        copy.deepcopy(small_model),
        small_processor,
        tmp_path,
        _reward_by_call(rewards.tolist()),
        problems=2,
        samples=4,
        objective=objective,
    )
    trainer.step()
    r = rewards.view(2, 4)
    centred = r - r.mean(1, keepdim=True)
    want = centred if objective == "opmd" else centred / (r.std(1, unbiased=False, keepdim=True) + 1e-6)
    # the minibatches take the answers shuffled: compare the advantages given, sorted
    got = torch.cat(given).sort().values
    torch.testing.assert_close(got, want.flatten().sort().values, atol=1e-6, rtol=0)


def test_an_answer_of_reward_one_half_counts_as_correct(small_model, small_processor, tmp_path):
    """all_correct, all_wrong and the sampler's success rates count answers of reward >= 0.5 correct."""
    rewards = [1.0, 0.5, 0.25, 0.0] + [0.5] * 4  # 2 problems x 4 answers
    trainer = make_trainer(
        copy.deepcopy(small_model), small_processor, tmp_path, _reward_by_call(rewards), problems=2, samples=4
    )
    values = trainer.step()
    assert (values["all_correct"], values["all_wrong"], values["accuracy"]) == pytest.approx((0.5, 0.0, 0.46875))
    assert sorted(trainer.sampler.success[trainer.sampler.visits > 0].tolist()) == [0.5, 1.0]


@pytest.mark.parametrize("objective", ["opmd", "grpo"])
def test_a_non_finite_loss_or_gradient_norm_stops_rl_naming_the_last_checkpoint(
    small_model, small_processor, tmp_path, monkeypatch, objective
):
    """A NaN loss in an iteration's second minibatch (after its first update) stops before its backward, and a
    non-finite gradient in the first stops before the update (the weights as they were); both name the checkpoint of
    the last iteration, not the half-updated weights, and write none."""
    trainer = make_trainer(copy.deepcopy(small_model), small_processor, tmp_path, objective=objective, iterations=1)
    trainer.run(progress=False)
    checkpoint = tmp_path / "rl" / "checkpoints" / "step-0000001"
    assert trainer.iteration == 1 and checkpoint.is_dir()
    names = lambda: sorted(p.name for p in checkpoint.parent.iterdir())  # noqa: E731
    before = names()
    last_good = rf"the last good state is the checkpoint {re.escape(str(checkpoint))}$"

    name = f"{objective}_loss"
    real, calls = getattr(trainer_mod, name), []
    nan_second = lambda *a: real(*a) * (float("nan") if calls.append(1) or len(calls) == 2 else 1.0)  # noqa: E731
    monkeypatch.setattr(trainer_mod, name, nan_second)
    with pytest.raises(TrainingError, match="^rl: iteration 2: loss is not finite; " + last_good):
        trainer.step()
    assert len(calls) == 2  # the NaN loss went no further
    monkeypatch.undo()

    weights = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    embed = trainer.policy.language_model.model.embed_tokens.weight
    hook = embed.register_hook(lambda grad: grad * float("inf"))
    try:
        with pytest.raises(TrainingError, match="^rl: iteration 2: gradient norm is (nan|inf); " + last_good):
            trainer.step()
    finally:
        hook.remove()
    assert all(torch.equal(v, weights[k]) for k, v in trainer.policy.state_dict().items())
    assert trainer.iteration == 1 and names() == before


def _cut_rollouts(monkeypatch) -> list:
    """Rollouts cut to at most 1, 2, 3, 1, 2, 3, ... tokens, so the k answers of a problem differ in length; returns
    the list they are put in."""
    real, rolls = trainer_mod.rollout, []

    def cut(*args, **kwargs):
        rolls.extend(real(*args, **kwargs))
        for j, r in enumerate(rolls):
            r.ids = r.ids[: 1 + j % 3]
        return rolls

    monkeypatch.setattr(trainer_mod, "rollout", cut)
    return rolls


def test_the_length_reward_is_weighed_by_length_weight(small_model, small_processor, tmp_path, monkeypatch):
    """With length_weight 0.5 the reward is correct + 0.5 x Kimi's length reward, which is logged unweighed."""
    rolls = _cut_rollouts(monkeypatch)
    correct = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    trainer = make_trainer(
        copy.deepcopy(small_model),
        small_processor,
        tmp_path,
        _reward_by_call(correct),
        problems=2,
        samples=4,
        max_new_tokens=3,
        length_weight=0.5,
    )
    values = trainer.step()
    lengths = torch.tensor([r.length for r in rolls], dtype=torch.float32)
    bonus = length_reward(lengths, torch.tensor(correct) >= 0.5, 4)
    assert len(rolls) == 8 and bonus.mean() != 0
    assert values["length_reward"] == pytest.approx(bonus.mean().item(), abs=1e-6)
    assert values["reward"] == pytest.approx((torch.tensor(correct) + 0.5 * bonus).mean().item(), abs=1e-6)


def test_the_update_is_the_gradient_of_the_minibatch_mean_loss(small_model, small_processor, tmp_path, monkeypatch):
    """One minibatch of all 8 answers: the gradient (its norm logged, before clipping) is that of the mean OPMD loss
    over them, not of their sum."""
    rewards = [1.0, 0.0, 0.0, 0.5, 1.0, 1.0, 0.25, 0.0]
    rolls, prompts = [], []  # the answers, and the prompts they answer
    real_rollout = trainer_mod.rollout
    monkeypatch.setattr(
        trainer_mod, "rollout", lambda *a, **k: prompts.extend(a[2]) or rolls.extend(real_rollout(*a, **k)) or rolls
    )
    want = []
    real_step = trainer_mod.optimizer_step

    def step(model, *args, **kwargs):  # the weights are still those the answers were sampled from
        with trainer_mod.training_attention():
            tokens = token_logprobs(model, [prompts[r.prompt] for r in rolls], [r.ids for r in rolls])
        logp = torch.stack([t.sum() for t in tokens])
        advantage = group_baseline(torch.tensor(rewards), 4)
        loss = opmd_loss(logp, logp.detach(), advantage, trainer.cfg.tau).mean()
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        want.append(torch.stack([g.double().norm() for g in grads if g is not None]).norm())  # a float32 sum drifts
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "optimizer_step", step)
    trainer = make_trainer(
        copy.deepcopy(small_model),
        small_processor,
        tmp_path,
        _reward_by_call(rewards),
        problems=2,
        samples=4,
        updates=1,
    )
    values = trainer.step()
    assert len(want) == 1 and want[0] > 0
    assert values["grad_norm"] == pytest.approx(want[0].item(), rel=1e-5)


def test_a_reward_of_bools_trains_as_floats_and_one_that_is_no_number_is_named(small_model, small_processor, tmp_path):
    """A checker returning bools (or ints) crashed at ``reward.mean()`` once every answer of an iteration got one (a
    mix with 0.0 became floats), after the update; None or NaN gave a deep error or 'loss is not finite'."""
    runs = {}
    for kind, reward_fn in (("float", starts_with_a_letter), ("bool", lambda text, meta: text[:1].isalpha())):
        trainer = make_trainer(copy.deepcopy(small_model), small_processor, tmp_path / kind, reward_fn=reward_fn)
        runs[kind] = {k: v for k, v in trainer.step().items() if k != "seconds" and not k.endswith("_per_s")}
    assert runs["float"]["reward"] > 0 and runs["bool"] == pytest.approx(runs["float"], rel=1e-6, abs=1e-7)
    for value in (None, float("nan"), float("inf"), float("-inf"), "1", 10**400):
        policy = copy.deepcopy(small_model)
        before = [p.clone() for p in policy.parameters()]
        trainer = make_trainer(policy, small_processor, tmp_path / "bad", reward_fn=lambda text, meta: value)
        with pytest.raises(TrainingError, match=rf"the reward of a toy-task answer is {re.escape(repr(value))}, not a"):
            trainer.step()
        assert all(torch.equal(p, q) for p, q in zip(policy.parameters(), before))  # found before any update


def _recorded_bars(monkeypatch) -> list:
    """Every bar the trainer opens, as ``[kwargs, bar, increments]``, the bars themselves real."""
    bars, real = [], trainer_mod.progress_bar

    def recorded(*args, **kwargs):
        bar = real(*args, **kwargs)
        increments = []
        update = bar.update
        bar.update = lambda n=1: increments.append(n) or update(n)
        bars.append([kwargs, bar, increments])
        return bar

    monkeypatch.setattr(trainer_mod, "progress_bar", recorded)
    return bars


def test_an_iteration_shows_its_rollouts_log_probs_and_updates_on_bars_of_their_own(
    small_model, small_processor, tmp_path, monkeypatch
):
    """The stage's bar moved once an iteration: the rollouts, pi_i's log-probs and the updates (8-35 s an iteration
    for kimivl-tiny, minutes at A3B scale) showed `rl: 0/48` throughout. Each phase now has a transient bar over the
    iteration's answers: 2 problems x 4 samples, generated in batches of 3 (3, 3, 2)."""
    bars = _recorded_bars(monkeypatch)
    small = {"problems": 2, "samples": 4, "ckpt_every": 2}
    trainer = make_trainer(
        copy.deepcopy(small_model), small_processor, tmp_path, iterations=2, rollout_batch=3, **small
    )
    trainer.run(progress=True)
    stage, *phases = bars
    assert (stage[0]["total"], stage[0]["desc"], stage[1].n) == (2, "rl", 2)
    shown = [(kw["desc"], kw["total"], bar.n, sum(steps), kw["leave"]) for kw, bar, steps in phases]
    assert shown == [(phase, 8, 8, 8, False) for phase in ("rollouts", "log-probs", "updates")] * 2
    # no answer stops within its 3 tokens: each batch tells of its 3 tokens (none finished), then of its answers cut
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["truncated"] == 1
    assert phases[0][2] == [0, 0, 0, 3, 0, 0, 0, 3, 0, 0, 0, 2]
    assert all(not kw["disable"] for kw, _, _ in phases)
    del bars[:]
    trainer.step()  # no bars asked for
    assert len(bars) == 3 and all(kw["disable"] for kw, _, _ in bars)
    del bars[:]
    trainer.world, trainer.cfg.iterations = _OtherRank(), trainer.iteration + 1
    trainer.run(resume=False, progress=True)  # a rank but the first shows none
    assert len(bars) == 4 and all(kw["disable"] for kw, _, _ in bars)


class _OtherRank(World):
    """A rank but the first, computing as one process does."""

    main = False


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_rl_is_the_same_with_its_bars_on_a_terminal_and_in_a_log(small_model, small_processor, tmp_path, monkeypatch):
    """The phases' bars change nothing the RL computes: the same metrics and weights whether stderr is a terminal
    (refreshed often) or a log (refreshed every 30 s)."""
    runs = {}
    for where in ("terminal", "log"):
        stream = _Terminal() if where == "terminal" else io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setattr(trainer_mod, "PHASE_DELAY", 0.0, raising=False)  # short phases shown too
        trainer = make_trainer(
            copy.deepcopy(small_model),
            small_processor,
            tmp_path / where,
            iterations=2,
            problems=2,
            samples=4,
            updates=1,
        )
        trainer.run(progress=True)
        monkeypatch.undo()
        rows = [json.loads(line) for line in (tmp_path / where / "metrics.jsonl").read_text().splitlines()]
        drop = ("seconds", "rollout_tokens_per_s")
        runs[where] = trainer.policy.state_dict(), [{k: v for k, v in r.items() if k not in drop} for r in rows]
        text = stream.getvalue()
        assert "rl: 100%" in text and all(f"{phase}: " in text for phase in ("rollouts", "log-probs", "updates"))
    assert runs["terminal"][1] == runs["log"][1] and len(runs["log"][1]) == 2
    assert all(torch.equal(v, runs["log"][0][k]) for k, v in runs["terminal"][0].items())


def test_rl_training_only_the_vision_side_on_text_problems_adds_no_gradient_and_says_so(
    small_model, small_processor, tmp_path, caplog
):
    """An rl stage training only the projector on text-only problems died in the update's backward ("element 0 of
    tensors does not require grad"): no trained weight is on a text row's path. Now such a row adds no gradient, the
    weights stay as they were, and the run says so once."""
    import logging

    from kimivl.train.trainable import set_trainable

    policy = copy.deepcopy(small_model)
    set_trainable(policy, ["multi_modal_projector"])
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainer = make_trainer(policy, small_processor, tmp_path, iterations=2, problems=2, samples=2)
    with caplog.at_level(logging.WARNING, logger="kimivl.train.step"):
        trainer.run(progress=False)
    said = [m for m in caplog.messages if "reaches no trained weight" in m]
    assert len(said) == 1 and said[0].startswith("rl: iteration 1: a row of answers reaches no trained weight")
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] == 0.0 for r in rows)
