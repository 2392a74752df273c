"""The rl stage kind: online policy mirror descent (or GRPO) on rule-rewarded problems (``kimivl.rl.trainer``)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kimivl.data.formats import DataError
from kimivl.data.indexed import Concat, locate
from kimivl.rl.sampler import log as sampler_log
from kimivl.rl.trainer import OBJECTIVE_SETTINGS, RLConfig, RLTrainer, check_sampling, problem_error, prompt_of
from kimivl.train.recipe import Recipe, RecipeError, check_names
from kimivl.train.stages.base import PartsSettings, Prepared, StageContext, check_records, once, source_record

log = logging.getLogger(__name__)


@dataclass
class RLStage(PartsSettings):
    """``steps`` RL iterations on the problems of ``sources``; ``budget`` is the packed log-prob row length; ``rl``
    holds the ``kimivl.rl.trainer.RLConfig`` settings."""

    sources: list[str] = field(default_factory=list)  # problem sources
    rl: dict[str, Any] = field(default_factory=dict)

    def check(self, where: str) -> None:
        super().check(where)
        self.rl = {} if self.rl is None else self.rl  # an empty `rl:` in YAML
        if not self.sources:
            raise RecipeError(f"{where}: an rl stage needs problem 'sources'")
        check_names(f"{where}: sources", self.sources, "source names")
        if not isinstance(self.rl, dict):
            raise RecipeError(f"{where}: 'rl' settings are a mapping, got {self.rl!r}")

    def sources_used(self) -> set[str]:
        return set(self.sources)

    def check_recipe(self, recipe: Recipe) -> None:
        rl_config(recipe, self)

    def check_data(self, ctx: StageContext) -> None:
        """Every problem has a prompt, a ``meta.gold`` its reward can check and readable images; every curriculum
        phase weighs a difficulty the problems hold, and the tokenizer has each ``stop`` token. Where the model's
        context is known, every prompt fits it (``check_prompts``)."""
        check_problems(self, ctx)
        cfg = rl_config(ctx.recipe, self)
        if ctx.context is not None:
            check_prompts(self, ctx, ctx.context, cfg.max_new_tokens)
        try:
            check_sampling(
                cfg, ctx.sources.difficulties(self.sources), ctx.processor.tokenizer, sampler_warning(self, ctx)
            )
        except (KeyError, ValueError) as e:
            raise RecipeError(f"stage {self.name!r}: rl: {e.args[0]}") from None

    def record_with(self, cfg: RLConfig) -> dict[str, Any]:
        """``record`` with each of the ``RLConfig`` ``cfg``'s settings in place of the ``rl`` given (``rl.tau``, ...,
        defaults included), less those taken from the stage or the recipe and ``keep_checkpoints``, and less the
        ``budget``: here only the length of the rows its log-prob forwards pack (memory, not the update)."""
        own = {f"rl.{k}": v for k, v in asdict(cfg).items() if k not in (*FROM_STAGE, "bf16", "keep_checkpoints")}
        return {k: v for k, v in self.record().items() if k not in ("rl", "budget")} | own


# RLConfig's settings that an rl stage does not give under ``rl:``: where they come from
FROM_STAGE = {
    "iterations": "the stage's steps",
    "budget": "the stage's budget",
    "clip": "the stage's clip",
    "ckpt_every": "the stage's ckpt_every",
    "seed": "the recipe's seed",
}


def rl_config(recipe: Recipe, stage: RLStage) -> RLConfig:
    """The ``RLConfig`` of an rl stage: its ``rl`` settings plus the stage's steps, budget, clip and ckpt_every, and
    the recipe's bf16. Its seed is the recipe's plus the number of rl stages before it, so a later rl stage draws
    other problems and rollouts than the first. A setting of the objective the stage does not train with is an error
    (it would be ignored)."""
    earlier = [s.name for s in recipe.stages if isinstance(s, RLStage)].index(stage.name)
    if "bf16" in stage.rl:
        raise RecipeError(f"stage {stage.name!r}: rl: bf16 is set for the whole recipe (its top-level 'bf16')")
    names = {f.name for f in fields(RLConfig)}
    unknown = sorted(set(stage.rl) - names, key=str)
    if unknown:
        taken = sorted(names - set(FROM_STAGE) - {"bf16"})
        raise RecipeError(f"stage {stage.name!r}: rl has unknown keys {unknown}; it takes {taken}")
    given = [k for k in FROM_STAGE if k in stage.rl]
    if given:
        where = ", ".join(f"{k} from {FROM_STAGE[k]}" for k in given)
        raise RecipeError(
            f"stage {stage.name!r}: rl: {', '.join(given)} set, which the stage takes elsewhere ({where})"
        )
    try:
        config = RLConfig(
            iterations=stage.steps,
            budget=stage.budget,
            clip=stage.clip,
            ckpt_every=stage.ckpt_every,
            seed=(recipe.seed + earlier) % 2**64,
            bf16=recipe.bf16,
            **stage.rl,
        )
    except (TypeError, ValueError) as e:
        raise RecipeError(f"stage {stage.name!r}: rl: {e}") from None
    for objective, keys in OBJECTIVE_SETTINGS.items():
        unread = [k for k in keys if k in stage.rl]
        if objective != config.objective and unread:
            raise RecipeError(
                f"stage {stage.name!r}: rl: {', '.join(unread)} set, which only objective {objective} reads, and the "
                f"stage trains with objective {config.objective}: remove them, or set objective: {objective}"
            )
    last = (config.iterations - 1) / config.iterations  # the progress of the last iteration
    late = sorted(start for start in config.curriculum or {} if start > last)
    if late:
        raise RecipeError(
            f"stage {stage.name!r}: rl: curriculum phase {late[0]} starts after the stage's last iteration (its "
            f"{config.iterations} iterations reach progress {last:.4g}), so it would never apply: start it earlier, "
            "or give the stage more steps"
        )
    return config


def sampler_warning(stage: RLStage, ctx: StageContext) -> Callable[..., None]:
    """The sampler's warning of problems the curriculum never draws, naming the stage and given once a run: the check
    before the first stage, the one when the stage starts and the trainer each build a sampler."""
    warn = once(ctx, sampler_log.warning)
    return lambda message, *args: warn("stage %s: " + message, stage.name, *args)


def check_problems(stage: RLStage, ctx: StageContext) -> None:
    """Every problem has a prompt, a ``meta.gold`` answer to reward against and readable images."""
    check_records(ctx, stage.sources, problem_error)


def check_prompts(stage: RLStage, ctx: StageContext, context: int, max_new_tokens: int) -> None:
    """Every problem's prompt, encoded as rollouts encode it (generation prompt and images included), holds fewer
    than ``context`` tokens: a longer one would end the run when first drawn, maybe hours in. A ``DataError`` names
    the first that does not; a warning counts those that leave under ``max_new_tokens`` of room (their answers are
    cut short). A prompt whose text alone takes ``context`` (``fewest_tokens``) is refused unencoded; the others are
    encoded once per source, context and ``max_new_tokens`` (problem sets are small next to training corpora), so a
    run warns once, and again for a stage that answers at other lengths."""
    for name in stage.sources:
        if (name, ("prompt fits", context, max_new_tokens)) in ctx.sources.checked:
            continue
        items, cramped = ctx.sources.items[name], 0
        for i in range(len(items)):
            prompt = prompt_of(items[i])
            fewest = ctx.processor.fewest_tokens(prompt)
            n = fewest if fewest >= context else len(ctx.processor.encode(prompt).input_ids)
            if n >= context:
                at_least = "at least " if n == fewest else ""
                raise DataError(
                    f"data source {name!r}: {locate(items, i)} is a problem whose prompt takes {at_least}{n} tokens, "
                    f"which does not fit the model's context of {context} tokens: shorten it, "
                    "or leave the problem out"
                )
            cramped += context - n < max_new_tokens
        if cramped:
            log.warning(
                "data source %r: %d problems leave fewer than max_new_tokens (%d) of the %d-token context to answer "
                "in: their answers are cut short",
                name,
                cramped,
                max_new_tokens,
                context,
            )
        ctx.sources.checked.add((name, ("prompt fits", context, max_new_tokens)))


def prepare(stage: RLStage, ctx: StageContext, model) -> Prepared:
    cfg = rl_config(ctx.recipe, stage)
    ctx = dataclasses.replace(ctx, context=model.config.text_config.max_position_embeddings)
    stage.check_data(ctx)
    stage.freeze_model(model)
    line = f"stage {stage.name}: {stage.steps} iterations of {cfg.problems} problems x {cfg.samples} answers"

    def run(optimizer, scheduler, progress: bool) -> dict[str, float]:
        problems = Concat([ctx.sources.items[name] for name in stage.sources])
        trainer = RLTrainer(
            model,
            ctx.processor,
            problems,
            cfg,
            optimizer,
            scheduler,
            ctx.recipe.out,
            stage.name,
            world=ctx.world,
            settings=stage.record_with(cfg),
            sources=source_record(ctx, stage.sources),
            difficulties=ctx.sources.difficulties(stage.sources),
            warn=sampler_warning(stage, ctx),
        )
        return trainer.run(progress=progress)

    return Prepared(model, line, run)
