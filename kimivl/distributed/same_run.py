"""Every rank runs the same recipe with the same flags.

A rank launched with another learning rate or ``--seed`` would train silently wrong; one with another ``--ep`` or
stage length would stop later with an opaque collective error or a timeout. Before anything runs, the ranks
exchange their settings (the recipe as resolved, command-line overrides included, and the layout) and every rank
stops with a ``RecipeError`` naming those that differ.
"""

from __future__ import annotations

import dataclasses
import json

import torch

from kimivl.distributed.world import World
from kimivl.train.recipe import Recipe, RecipeError

SHOWN = 5  # differing settings named in the message
WIDTH = 40  # characters of each value shown


def run_settings(recipe: Recipe, world: World) -> dict[str, str]:
    """The settings every rank must share, each as JSON text: the recipe's fields (each stage's apart, as ``stage
    NAME: FIELD``), the device kind (not its index: rank r trains on ``cuda:LOCAL_RANK``) and the layout."""
    fields = dataclasses.asdict(recipe)
    fields["device"] = torch.device(fields["device"]).type
    settings = {}
    for key, value in fields.items():
        if key == "stages":
            settings["stages"] = [stage["name"] for stage in value]
            settings.update({f"stage {stage['name']}: {k}": v for stage in value for k, v in stage.items()})
        else:
            settings[key] = value
    settings.update(dp_shard=world.dp_shard, ep=world.ep, dp_replicate=world.dp_replicate)
    return {key: json.dumps(value, sort_keys=True, default=str) for key, value in settings.items()}


def check_same_run(recipe: Recipe, world: World) -> None:
    """On a sharded ``world``: a ``RecipeError`` on every rank unless every rank's ``run_settings`` are the same; it
    names the settings that differ and which ranks hold which value."""
    if not world.active:
        return
    every: list[dict[str, str]] = world.gather(run_settings(recipe, world))
    keys = list(dict.fromkeys(k for settings in every for k in settings))
    differ = [k for k in keys if len({settings.get(k) for settings in every}) > 1]
    if not differ:
        return
    named = "; ".join(f"{key}: {_holders(every, key)}" for key in differ[:SHOWN])
    more = f" and {len(differ) - SHOWN} more" if len(differ) > SHOWN else ""
    raise RecipeError(
        f"the ranks were launched with different recipes or flags ({named}{more}): launch every rank with the same "
        "recipe and options"
    )


def _holders(every: list[dict[str, str]], key: str) -> str:
    """``VALUE on ranks 0, 2 vs VALUE on rank 1``: each value of ``key`` and the ranks that hold it."""
    ranks: dict[str, list[int]] = {}
    for rank, settings in enumerate(every):
        ranks.setdefault(settings.get(key, "(none)"), []).append(rank)
    parts = []
    for value, holders in ranks.items():
        shown = value if len(value) <= WIDTH else value[: WIDTH - 3] + "..."
        listed = ", ".join(map(str, holders[:4])) + (f" and {len(holders) - 4} more" if len(holders) > 4 else "")
        parts.append(f"{shown} on rank{'s' if len(holders) > 1 else ''} {listed}")
    return " vs ".join(parts)
