"""The RL loop: online policy mirror descent (or GRPO) on rule-rewarded problems, resumable.

Each iteration: draw problems (curriculum + priority); sample k responses per problem from the policy as it stands,
the reference pi_i; score them (plus the length reward after its warm-up); compute pi_i's log-probs; check that
the policy did not change meanwhile; then take ``updates`` optimizer steps on shuffled minibatches of the samples,
each with the policy's log-probs recomputed with gradients. pi_i is used only before the first update, so it needs
no copy of the model. One LR-scheduler step per iteration.

Data-parallel over a sharded ``world``: every rank draws the same problems and takes its share (problem i goes to
rank i mod size), samples and scores its answers and takes pi_i's log-probs with the weights gathered whole (no
collective, so each rank generates at its own pace), then all ranks take the same optimiser steps on their own
answers, gradients averaged as one process would over all of them. Successes, rewards and lengths are gathered,
so the sampler and the logged metrics see every answer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from kimivl.distributed.parallelize import gathered
from kimivl.distributed.vision_sync import has_images, pad_embeddings, vision_pad
from kimivl.distributed.world import World, max_over_ranks
from kimivl.eval.synthetic import box_error
from kimivl.inference.sampling import SamplingParams, seeded_generator
from kimivl.kernels import training_attention
from kimivl.precision import autocast, use_bf16
from kimivl.processing.processor import Encoded, KimiVLProcessor
from kimivl.progress import progress_bar
from kimivl.rl.objectives import group_baseline, group_normalised, grpo_loss, kl_estimate, length_reward, opmd_loss
from kimivl.rl.rewards import REWARDS, binary, correctness, point_in_box
from kimivl.rl.rollouts import pack_rows, rollout, token_logprobs
from kimivl.rl.sampler import PRIORITIES, ProblemSampler, check_curriculum, check_rates
from kimivl.train.interrupt import stop_on_interrupt
from kimivl.train.loop import NoMetrics, agreed
from kimivl.train.metrics import MetricsLog, plot_curves
from kimivl.train.recipe import integer, number
from kimivl.train.state import TrainState
from kimivl.train.step import TrainingError, UntrainedRows, check_loss, optimizer_step

log = logging.getLogger(__name__)
OBJECTIVES = ("opmd", "grpo")
OBJECTIVE_SETTINGS = {"opmd": ("tau",), "grpo": ("clip_eps", "grpo_level", "kl_coef")}  # read by that objective only
# seconds before a phase's bar shows: a short phase writes nothing (no flicker on a terminal; in a log, where a bar
# refreshes every 30 s, only a phase that long writes)
PHASE_DELAY = 1.0


@dataclass
class RLConfig:
    """One RL stage. In a recipe, a stage of kind ``rl`` gives these under ``rl:``; ``iterations``, ``budget``,
    ``clip``, ``ckpt_every`` and ``seed`` come from the stage (``steps``, ...) and the recipe."""

    iterations: int = 40
    problems: int = 16  # problems per iteration
    samples: int = 8  # k responses per problem
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 160
    stop: list[str] = field(default_factory=lambda: ["<|im_end|>", "[EOS]"])
    objective: str = "opmd"  # or "grpo"
    tau: float = 0.5  # OPMD: weight of log(pi_theta / pi_ref)
    clip_eps: float = 0.2  # GRPO ratio clip
    grpo_level: str = "token"  # GRPO ratio per "token" or per "sequence"
    kl_coef: float = 0.0  # GRPO: k3 KL to the reference
    length_weight: float = 0.0  # 0 turns the length reward off
    length_warmup: int = 0  # iterations before the length reward starts
    updates: int = 2  # optimizer steps (minibatches) per iteration
    rollout_batch: int = 64  # rows per generation batch
    curriculum: dict[float, dict[str, float]] | None = None  # progress -> weight per difficulty
    priority: str = "failure"  # "failure": max(floor, 1 - s); "signal": max(floor, 4 s (1 - s)) (kimivl.rl.sampler)
    priority_floor: float = 0.05
    success_decay: float = 0.5
    budget: int = 4096  # tokens per packed log-prob forward
    clip: float = 1.0  # gradient-norm clip
    bf16: bool | None = None  # autocast the log-prob forwards; None: where bf16 is fast (kimivl.precision)
    ckpt_every: int = 10
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self):
        for f in fields(self):  # the annotations are strings (``from __future__ import annotations``)
            value = getattr(self, f.name)
            if f.type == "int" and not integer(value):
                raise ValueError(f"rl {f.name} must be an integer, got {value!r}")
            if f.type == "float" and not number(value):
                raise ValueError(f"rl {f.name} must be a finite number, got {value!r}")
        if not (isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop)):
            raise ValueError(f"rl stop must be a list of special-token names, got {self.stop!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"rl objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if min(self.iterations, self.problems, self.samples, self.updates, self.max_new_tokens) < 1:
            raise ValueError("rl iterations, problems, samples, updates and max_new_tokens must be >= 1")
        if self.samples < 2:
            raise ValueError("rl samples must be >= 2: the baseline is the mean reward of a problem's samples")
        if self.tau <= 0:
            raise ValueError(f"rl tau must be > 0, got {self.tau}")
        if min(self.rollout_batch, self.ckpt_every, self.keep_checkpoints) < 1:
            raise ValueError("rl rollout_batch, ckpt_every and keep_checkpoints must be >= 1")
        if min(self.length_weight, self.length_warmup, self.kl_coef) < 0 or self.clip_eps <= 0:
            raise ValueError("rl length_weight, length_warmup and kl_coef must be >= 0, clip_eps > 0")
        if self.grpo_level not in ("token", "sequence"):
            raise ValueError(f"rl grpo_level is 'token' or 'sequence', got {self.grpo_level!r}")
        if self.priority not in PRIORITIES:
            raise ValueError(
                f"rl priority is 'signal' (most weight to problems sometimes solved) or 'failure' (most to problems "
                f"never solved), got {self.priority!r}"
            )
        check_rates(self.priority_floor, self.success_decay)  # the sampler's, when the recipe loads
        check_curriculum(self.curriculum)
        check_updates(self, 1)
        SamplingParams(self.max_new_tokens, self.temperature, top_p=self.top_p)  # its own checks, named


def check_updates(cfg: RLConfig, ranks: int) -> None:
    """A ``ValueError`` unless each of ``ranks`` ranks has at least ``updates`` answers an iteration (one per
    minibatch): ``problems`` / ``ranks`` x ``samples``."""
    answers = cfg.problems // ranks * cfg.samples
    if cfg.updates > answers:
        per = f"{cfg.problems} problems / {ranks} ranks x {cfg.samples} samples" if ranks > 1 else "problems x samples"
        raise ValueError(
            f"rl updates ({cfg.updates} optimizer steps, one minibatch of answers each) is more than the {answers} "
            f"answers a rank has per iteration ({per}): lower updates, or draw more problems or samples"
        )


@torch.no_grad()
def fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """Per-parameter sums of values and of magnitudes, accumulated in float64 (no float64 copy of a weight), enough to
    notice any update."""
    return torch.stack(
        [torch.stack([p.sum(dtype=torch.float64), p.abs().sum(dtype=torch.float64)]) for p in model.parameters()]
    )


def prompt_of(record: dict) -> list[dict]:
    """A problem record's messages up to (not including) a final assistant turn."""
    messages = record["messages"]
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def problem_error(record: dict) -> str | None:
    """What makes ``record`` no RL problem (no user prompt, a ``meta.gold`` or ``meta.box`` its task's reward cannot
    read, or a ``meta.difficulty`` that is no string, which the sampler and pass@k could not group by), worded to
    follow where it is; None when it is one."""
    meta = record.get("meta", {})
    if "gold" not in meta or not any(m["role"] == "user" for m in prompt_of(record)):
        return "is no RL problem: it needs a user prompt and meta.gold, the answer its reward checks"
    if not isinstance(meta.get("difficulty", ""), str):
        return (
            f"has a meta.difficulty of type {type(meta['difficulty']).__name__}: a difficulty is a label, a string "
            'such as "easy" (or none: leave it out)'
        )
    return gold_error(meta)


def gold_error(meta: dict) -> str | None:
    """What in ``meta`` its task's reward (``correctness``) cannot read, worded to follow "problem N"; None when
    nothing."""
    task = meta.get("task")
    check = REWARDS.get(task, binary)
    if task == "gui" and check in (point_in_box, binary) and (why := box_error(meta)):
        return f"is a gui problem whose {why}"  # checked in full: stand-in clicks need not reach every coordinate
    try:  # the reward's checker on stand-in answers: a gold (or box) it cannot read fails here, not mid-run
        for answer in ("0", "(0, 0)"):
            check(answer, meta)
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing meta.{e.args[0]}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        return f"has a meta.gold the {task or 'default'} reward cannot check ({what})"
    return None


def _images(encoded: list[Encoded]):
    have = [e for e in encoded if len(e.image_grid_hws)]
    if not have:
        return None, None
    return torch.cat([e.pixel_values for e in have]), torch.cat([e.image_grid_hws for e in have])


def difficulties_of(problems: Sequence[dict]) -> list[str]:
    """Each problem's ``meta.difficulty`` ("any" where it has none)."""
    return [p["meta"].get("difficulty", "any") for p in problems]


def check_sampling(
    cfg: RLConfig, difficulties: Sequence[str], tokenizer, warn: Callable[..., None] | None = None
) -> tuple[ProblemSampler, list[int]]:
    """The sampler of problems of ``difficulties`` (a ``ValueError`` if a curriculum phase weighs none of them; a
    warning through ``warn``, by default the sampler's log, of problems it never draws) and the ids of the ``stop``
    tokens (a ``KeyError`` naming one the tokenizer lacks)."""
    sampler = ProblemSampler(
        difficulties,
        cfg.curriculum,
        cfg.priority_floor,
        cfg.success_decay,
        cfg.seed,
        cfg.priority,
        warn,
    )
    return sampler, [tokenizer.special_id(s) for s in cfg.stop]


class RLTrainer:
    """``problems``: records ``{"messages": [...], "meta": {"task", "gold", "difficulty", ...}}``; ``reward_fn``
    ``(response text, meta) -> float`` (default: ``kimivl.rl.rewards.correctness``); ``settings`` and ``sources``: what
    a resume compares (``TrainState``'s); ``difficulties``: the problems' ``meta.difficulty`` where the caller has
    read them already (default: read from ``problems``); ``warn``: what tells of problems the curriculum never draws
    (``check_sampling``'s)."""

    def __init__(
        self,
        policy,
        processor: KimiVLProcessor,
        problems: Sequence[dict],
        cfg: RLConfig,
        optimizer: torch.optim.Optimizer,
        scheduler,
        run_dir: str | Path,
        stage: str = "rl",
        reward_fn: Callable[[str, dict], float] = correctness,
        world: World | None = None,
        settings: dict[str, Any] | None = None,
        sources: dict[str, dict[str, Any]] | None = None,
        difficulties: Sequence[str] | None = None,
        warn: Callable[..., None] | None = None,
    ):
        if not problems:
            raise ValueError("RL needs at least one problem")
        self.policy, self.processor, self.problems, self.cfg = policy, processor, problems, cfg
        self._untrained = UntrainedRows()
        self.optimizer, self.scheduler, self.reward_fn = optimizer, scheduler, reward_fn
        self.run_dir, self.stage, self.world = Path(run_dir), stage, world or World()
        if cfg.problems % self.world.size:
            raise ValueError(
                f"rl: problems ({cfg.problems} per iteration) must be a multiple of the {self.world.size} ranks"
            )
        check_updates(cfg, self.world.size)
        difficulties = difficulties_of(problems) if difficulties is None else difficulties
        if len(difficulties) != len(problems):
            raise ValueError(f"rl: {len(difficulties)} difficulties given for {len(problems)} problems")
        self.sampler, self.stop_ids = check_sampling(cfg, difficulties, processor.tokenizer, warn)
        # nothing of pi_i is saved: checkpoints fall between iterations, where pi_i is the policy as it is then
        self.state = TrainState(
            self.run_dir / stage / "checkpoints",
            stage,
            policy,
            optimizer,
            scheduler,
            {"sampler": self.sampler},
            keep=cfg.keep_checkpoints,
            world=self.world,
            bf16=use_bf16(policy.device, cfg.bf16),
            settings=settings,
            sources=sources,
        )

    def _reward(self, text: str, meta: dict) -> float:
        """The reward function's value for one answer, as a float (a bool or an int is a number too); a value that is
        no finite number is a ``TrainingError`` naming the task, before it reaches an update."""
        value = self.reward_fn(text, meta)
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):  # None, a list, an int of hundreds of digits
            number = math.nan
        if isinstance(value, str) or not math.isfinite(number):
            raise TrainingError(
                f"rl: the reward of a {meta.get('task') or 'default'}-task answer is {value!r}, not a finite number: "
                "a reward function returns a float (a bool or an int counts as one)"
            )
        return number

    @property
    def iteration(self) -> int:
        return self.state.step

    def encode(self, i: int) -> Encoded:
        """Problem ``i``'s prompt (encoded afresh each time: caching every visited problem's pixels would grow)."""
        return self.processor.encode(prompt_of(self.problems[i]))

    def _autocast(self):
        return autocast(self.policy.device, self.cfg.bf16)

    def _phase(self, name: str, total: int, shown: bool):
        """A bar over this rank's ``total`` answers in phase ``name`` of an iteration, under the stage's bar and
        cleared when the phase ends. Any update may refresh it (within its interval), one of 0 answers too."""
        return progress_bar(
            total=total,
            desc=name,
            unit="answer",
            leave=False,
            delay=PHASE_DELAY,
            miniters=0,
            disable=not shown,
            dynamic_ncols=True,
        )

    def step(self, progress: bool = False) -> dict[str, float]:
        """One iteration; returns its metrics. ``progress``: show its rollouts, log-probs and updates on bars."""
        cfg, it, k = self.cfg, self.iteration, self.cfg.samples
        start = time.perf_counter()
        world = self.world
        everyone = self.sampler.sample(cfg.problems, it / cfg.iterations)
        # fewer problems than asked may hold weight now (a curriculum phase): the ranks share as many as divide evenly
        everyone = everyone[: len(everyone) // world.size * world.size]
        if not everyone:
            raise TrainingError(
                f"rl iteration {it + 1}: fewer problems can be drawn now than the {world.size} ranks (the curriculum "
                "phase's difficulties hold too few): add problems of those difficulties, or run on fewer ranks"
            )
        chosen = everyone[world.rank :: world.size]  # this rank's problems
        # pi_i is the policy now: its rollouts and log-probs are all taken before the first update
        reference = self.policy.eval()
        encoded = [self.encode(i) for i in chosen]
        base_seed = (cfg.seed * 1_000_003 + it) * 1000
        params = SamplingParams(
            cfg.max_new_tokens, cfg.temperature, top_p=cfg.top_p, seed=(base_seed + 7919 * world.rank) % 2**64
        )
        with gathered(reference) if world.active else contextlib.nullcontext():
            ref_print = fingerprint(reference)
            rollout_start = time.perf_counter()
            with self._phase("rollouts", len(chosen) * k, progress) as bar:
                rolls = rollout(
                    reference,
                    self.processor,
                    [e.input_ids for e in encoded],
                    *_images(encoded),
                    k,
                    params,
                    self.stop_ids,
                    cfg.rollout_batch,
                    bar.update,
                )
            rollout_s = time.perf_counter() - rollout_start

            correct = torch.tensor([self._reward(r.text, self.problems[chosen[r.prompt]]["meta"]) for r in rolls])
            lengths = torch.tensor([r.length for r in rolls], dtype=torch.float32)
            reward = correct.clone()
            length_on = cfg.length_weight > 0 and it >= cfg.length_warmup
            if length_on:
                reward = reward + cfg.length_weight * length_reward(lengths, correct >= 0.5, k)
            advantage = group_baseline(reward, k) if cfg.objective == "opmd" else group_normalised(reward, k)
            advantage = advantage.to(self.policy.device)  # beside the log-probs it weighs

            prompts = [encoded[r.prompt].input_ids for r in rolls]
            responses = [r.ids for r in rolls]
            sample_images = [encoded[r.prompt] for r in rolls]
            with torch.no_grad(), self._autocast(), self._phase("log-probs", len(rolls), progress) as bar:
                ref_tokens = token_logprobs(
                    reference, prompts, responses, *_images(sample_images), cfg.budget, bar.update
                )
            if not torch.equal(fingerprint(reference), ref_print):
                raise AssertionError("the policy changed while the reference pi_i's samples and log-probs were taken")
        ref_seq = torch.stack([t.sum() for t in ref_tokens])

        lr = self.scheduler.get_last_lr()[0]  # the rate this iteration's update uses (the scheduler moves on next)
        order = torch.randperm(len(rolls), generator=seeded_generator((base_seed + 999) % 2**64))
        with self._phase("updates", len(rolls), progress) as bar:
            losses, seen, seen_ref, grad_norm = self._update(
                order, prompts, responses, sample_images, ref_tokens, ref_seq, advantage, bar.update
            )
        self.scheduler.step()

        # every rank's answers, in the order of the problems drawn (one process: its own, as they are)
        mine = (correct, lengths, reward, torch.cat(losses), torch.stack(seen), torch.stack(seen_ref))
        parts = world.gather(([t.tolist() for t in mine], [r.stopped for r in rolls]))
        whole = [torch.tensor([x for part, _ in parts for x in part[j]], dtype=t.dtype) for j, t in enumerate(mine)]
        order_back = torch.cat([torch.arange(r, len(everyone), world.size) for r in range(world.size)]).argsort()
        correct, lengths, reward = (t.view(-1, k)[order_back].flatten() for t in whole[:3])
        correct_PK = correct.view(-1, k) >= 0.5
        stopped = [s for _, part in parts for s in part]
        losses, seen, seen_ref = [whole[3]], list(whole[4]), list(whole[5])
        self.sampler.update(everyone, correct_PK.float().mean(1).tolist())
        self.state.advance()
        tokens = int(lengths.sum())
        values = {
            "reward": reward.mean().item(),
            "accuracy": correct.mean().item(),
            "mean_length": lengths.mean().item(),
            "truncated": 1 - sum(stopped) / len(stopped),
            "kl_ref": kl_estimate(torch.stack(seen).cpu(), torch.stack(seen_ref).cpu()).item(),
            "all_correct": correct_PK.all(1).float().mean().item(),
            "all_wrong": (~correct_PK).all(1).float().mean().item(),
            "loss": torch.cat(losses).mean().item(),
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "rollout_tokens_per_s": tokens / rollout_s,
            "seconds": time.perf_counter() - start,
        }
        if length_on:
            values["length_reward"] = (reward - correct).mean().item() / cfg.length_weight
        return values

    def _update(self, order, prompts, responses, images, ref_tokens, ref_seq, advantage, advance=lambda n: None):
        """``updates`` optimizer steps, one per part of ``order`` (parts differ in size by at most one); the policy's
        log-probs are recomputed with gradients row by packed row (each row back-propagated at once, so memory holds
        one row's graph), ``advance(n)`` told of each row's ``n`` answers. Fewer answers than ``updates`` (a
        curriculum phase drawing fewer problems than asked) take one step per answer, and say so. Returns the
        per-sample losses, the policy's and reference's sequence log-probs seen, the last grad norm."""
        cfg, where, world = self.cfg, f"{self.stage}: iteration {self.iteration + 1}", self.world
        self.policy.train()
        losses, seen, seen_ref, grad_norm = [], [], [], torch.tensor(0.0)
        minibatches = [m for m in order.tensor_split(cfg.updates) if len(m)]
        if len(minibatches) < cfg.updates:
            log.warning(
                "%s: %d answers per rank, fewer than updates (%d): %d optimizer steps this iteration",
                where,
                len(order),
                cfg.updates,
                len(minibatches),
            )
        for minibatch in minibatches:
            mb = minibatch.tolist()
            self.optimizer.zero_grad(set_to_none=True)
            rows = pack_rows([len(prompts[i]) + len(responses[i]) for i in mb], cfg.budget)
            # a sharded forward and backward are collective: every rank runs as many rows (repeats weigh 0), and the
            # loss is over the whole minibatch of every rank, times the size that FSDP's gradient mean divides by
            total = int(world.sum(torch.tensor(len(mb), device=world.device))) if world.active else len(mb)
            extra = max_over_ranks(len(rows), world) - len(rows) if world.active else 0
            for n, row in enumerate(rows + rows[:1] * extra):
                idx = [mb[j] for j in row]
                pixel_values, grids = _images([images[i] for i in idx])
                with self._autocast(), training_attention():
                    pad = vision_pad(self.policy, world, has_images(pixel_values))
                    with pad_embeddings(self.policy, pad):
                        tokens = token_logprobs(
                            self.policy,
                            [prompts[i] for i in idx],
                            [responses[i] for i in idx],
                            pixel_values,
                            grids,
                            cfg.budget,
                        )
                if cfg.objective == "opmd":
                    seq = torch.stack([t.sum() for t in tokens])
                    loss = opmd_loss(seq, ref_seq[idx], advantage[idx], cfg.tau)
                else:
                    loss = grpo_loss(
                        tokens, [ref_tokens[i] for i in idx], advantage[idx], cfg.clip_eps, cfg.grpo_level, cfg.kl_coef
                    )
                check_loss(loss, where, self._last_good, world)
                weight = (0.0 if n >= len(rows) else world.size) if world.active else 1
                self._untrained.backward(loss.sum() * weight / total + pad, f"{where}: a row of answers")
                if n < len(rows):
                    losses.append(loss.detach())
                    seen += [t.detach().sum() for t in tokens]
                    seen_ref += [ref_seq[i] for i in idx]
                    advance(len(idx))
            grad_norm = optimizer_step(self.policy, self.optimizer, cfg.clip, where, self._last_good, world)
        return losses, seen, seen_ref, grad_norm

    def _last_good(self, weights_ok: bool) -> str:
        # within an iteration an earlier minibatch may have updated the policy: only a checkpoint is a good state
        return self.state.last_good(False)

    def _plot(self) -> None:
        metrics, out = self.run_dir / "metrics.jsonl", self.run_dir / self.stage
        for name, keys in (
            ("rewards", ("reward", "accuracy", "all_correct", "all_wrong")),
            ("length", ("mean_length",)),
            ("kl", ("kl_ref",)),
        ):
            plot_curves(metrics, out / f"{name}.png", keys)

    def run(self, resume: bool = True, progress: bool = True) -> dict[str, float]:
        """Run the remaining iterations (resuming from the latest checkpoint); returns the last metrics."""
        if resume:
            self.state.resume()
        last: dict[str, Any] = {}
        main = self.world.main
        bar = progress_bar(
            total=self.cfg.iterations,
            initial=self.iteration,
            desc=self.stage,
            unit="it",
            disable=not (progress and main),
            dynamic_ncols=True,
        )
        log_to = MetricsLog(self.run_dir, self.stage, start=self.iteration) if main else NoMetrics()
        with bar, log_to as metrics, stop_on_interrupt() as stop:  # the bar closed however the run ends
            while self.iteration < self.cfg.iterations:
                last = self.step(progress and main)
                metrics.write(self.iteration, last)
                bar.set_postfix(
                    reward=f"{last['reward']:.2f}",
                    acc=f"{last['accuracy']:.2f}",
                    len=f"{last['mean_length']:.0f}",
                    refresh=False,  # shown by update's refresh, which keeps the bar's interval
                )
                bar.update(1)
                if self.iteration % self.cfg.ckpt_every == 0 or self.iteration == self.cfg.iterations:
                    self.state.save()
                    if main:
                        self._plot()
                self.state.stop_if_asked(agreed(stop, self.world), self.cfg.iterations)
        return last
