"""Stage kinds, one module each (its settings dataclass and ``prepare()``), in a registry by kind. A recipe's stage
mapping becomes its kind's settings (``parse_stage``); ``kimivl train`` and ``kimivl train --plan`` both start a stage
with ``prepare(stage, ctx, model)``."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from kimivl.rl.trainer import check_updates
from kimivl.train.loop import check_accum
from kimivl.train.recipe import RecipeError
from kimivl.train.stages import joint, rl, vit
from kimivl.train.stages.base import Prepared, StageContext, StageSettings

KINDS = {"vit": (vit.ViTStage, vit.prepare), "joint": (joint.JointStage, joint.prepare), "rl": (rl.RLStage, rl.prepare)}


def parse_stage(raw: Any) -> StageSettings:
    """A recipe's stage mapping as the settings of its kind; unknown keys, and keys of another kind, are named."""
    if not isinstance(raw, dict):
        raise RecipeError(f"a stage is a mapping with a name, kind, steps and lr, got {raw!r}")
    where = f"stage {raw.get('name', '?')!r}"
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        names = [repr(k) for k in KINDS]
        raise RecipeError(f"{where}: kind must be {', '.join(names[:-1])} or {names[-1]}, got {kind!r}")
    settings = KINDS[kind][0]
    taken = {f.name for f in fields(settings)}
    elsewhere = sorted(
        k for k in raw if k not in taken and any(k in {f.name for f in fields(s)} for s, _ in KINDS.values())
    )
    if elsewhere:
        raise RecipeError(
            f"{where}: {', '.join(elsewhere)} {'does' if len(elsewhere) == 1 else 'do'} not apply to {_a(kind)} stage"
        )
    unknown = sorted(set(raw) - taken, key=str)
    if unknown:
        raise RecipeError(f"{where}: unknown keys {unknown}; {_a(kind)} stage takes {sorted(taken)}")
    missing = sorted(f.name for f in fields(settings) if f.name in ("name", "steps", "lr") and f.name not in raw)
    if missing:
        raise RecipeError(f"{where}: missing {missing}")
    return settings(**raw)


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeioru" else f"a {kind}"


def prepare(stage: StageSettings, ctx: StageContext, model) -> Prepared:
    """What ``stage`` needs to run on ``model`` (a meta-device model plans it), by its kind's ``prepare()``."""
    return KINDS[stage.kind][1](stage, ctx, model)


def check_layout(recipe, ranks: int, ep: int) -> None:
    """Every stage of ``recipe`` fits ``ranks`` data-parallel ranks and ``ep``, checked before the first stage
    (a later stage's misfit had surfaced only when it started, after the stages before it trained): a vit or joint
    stage's ``accum`` is a multiple of the ranks, an rl stage's problems too, its ``updates`` at most the answers of a
    rank, and rl runs with ep 1."""
    for stage in recipe.stages:
        if stage.kind == "rl":
            problems = rl.rl_config(recipe, stage).problems
            if ep > 1 or problems % ranks:
                raise RecipeError(
                    f"stage {stage.name!r}: an rl stage runs data-parallel without expert parallelism (ep 1), its "
                    f"problems ({problems}) a multiple of the {ranks} ranks"
                )
            try:
                check_updates(rl.rl_config(recipe, stage), ranks)
            except ValueError as e:
                raise RecipeError(f"stage {stage.name!r}: {e}") from None
        else:
            try:
                check_accum(f"stage {stage.name!r}", stage.accum, ranks)
            except ValueError as e:  # a recipe's misfit, named as the other recipe errors are
                raise RecipeError(str(e)) from None
