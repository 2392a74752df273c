"""``kimivl train RECIPE --plan``: what each stage will train, on how much data, in how much memory, found without
loading a weight, training or writing anything (the model is built on the meta device). Each stage is prepared by the
same ``prepare()`` as in the run, so the lines are those the run itself logs at each stage's start."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from kimivl.checkpoint import STORED_FLOATS, WEIGHT_DTYPES, _read_headers, checkpoint_files
from kimivl.data.world import world_built, world_wanted
from kimivl.model.kimivl import KimiVL
from kimivl.precision import use_bf16
from kimivl.train.pipeline import (
    Sources,
    base_checkpoint,
    base_config,
    check_export,
    check_trained_in_order,
    compute_line,
    export_line,
    memory_line,
    recipe_processor,
)
from kimivl.train.recipe import Recipe, device_here
from kimivl.train.stages import check_layout, prepare
from kimivl.train.stages.base import StageContext
from kimivl.train.trainable import hold_frozen_in_bf16, restore_float32

# torch's names of the weights' dtypes by their safetensors names ("BF16": "bfloat16")
STORED_DTYPES = {s: str(d).removeprefix("torch.") for s, d in zip(STORED_FLOATS, WEIGHT_DTYPES)}


def header_dtype(path: Path) -> str:
    """The dtype most tensors of the checkpoint at ``path`` are stored in (``bfloat16`` in released checkpoints,
    ``float32`` in a stage's ``final``), read from the headers only."""
    dtypes = Counter(dtype for _, _, dtype in _read_headers(checkpoint_files(path)).values())
    stored = dtypes.most_common(1)[0][0]
    return STORED_DTYPES.get(stored, stored)


def planned_bf16(recipe: Recipe) -> bool:
    """Whether the run trains under bf16 autocast (``use_bf16`` on its device); for a GPU this machine lacks, as the
    recipe's ``bf16`` says, else yes (kimivl's GPUs, NVIDIA from Ampere on and AMD, multiply bf16 fast)."""
    if device_here(recipe.device):
        return use_bf16(recipe.device, recipe.bf16)
    return recipe.bf16 is not False


def _device_lines(recipe: Recipe) -> list[str]:
    """What the run computes in, and, for a device this machine lacks, that the plan is for it all the same."""
    lines = [compute_line(recipe, planned_bf16(recipe))]
    if device_here(recipe.device):
        return lines
    absent = f"{recipe.device} is not present on this machine: planned for it"
    if recipe.bf16 is None:
        absent += ", in bf16 autocast as a GPU from Ampere on would choose (--no-bf16 plans float32)"
    return [*lines, absent]


def plan_recipe(recipe: Recipe, progress: bool = False) -> list[str]:
    """What the run computes in, then two lines per stage: its data (samples and passes over each source) and its
    memory plan, then where it exports. ``progress`` shows a bar while large sources are checked. The recipe's device
    need not be present here (``load_recipe(..., device_needed=False)``): the plan is for it."""
    base_dir = base_checkpoint(recipe)  # what the run refuses before anything runs, the plan refuses first too
    export = check_export(recipe)
    check_trained_in_order(recipe)
    exported = [export_line(recipe, export)] if export is not None else []
    if recipe.world is not None and world_built(recipe.out / "world") != world_wanted(**recipe.world):
        return _before_the_world(recipe) + exported
    sources = Sources(recipe, progress)
    processor = recipe_processor(recipe, sources, base_dir, save=False)
    with torch.device("meta"):
        model = KimiVL(base_config(recipe, processor.tokenizer))
    ctx = StageContext(recipe, sources, processor)
    trained: set[str] = set()  # trained by an earlier stage: float32 values, never held in bf16
    bf16_base = base_dir is not None and header_dtype(base_dir) == "bfloat16"

    def from_checkpoint(name: str, p) -> bool:
        return bf16_base and name not in trained

    bf16 = planned_bf16(recipe)
    parallel = recipe.parallel or {}
    layout = (parallel["dp_shard"], parallel.get("ep", 1)) if parallel.get("dp_shard") else None
    if layout is not None:
        check_layout(recipe, layout[0] * parallel.get("dp_replicate", 1), layout[1])
    lines = _device_lines(recipe)
    if parallel and layout is None:
        lines.append("memory is planned for one process: give --dp-shard N for the plan per rank of N")
    for stage in recipe.stages:
        prepared = prepare(stage, ctx, model)
        hold = prepared.hold_frozen_bf16 and bf16 and not parallel  # as the run: sharded ranks hold nothing in bf16
        held = hold_frozen_in_bf16(model, from_checkpoint) if hold else []
        lines += [prepared.data_line, memory_line(stage, prepared.trainee, model, layout, bf16)]
        restore_float32(held)
        trained |= {name for name, p in model.named_parameters() if p.requires_grad}
        model.requires_grad_(True)
    return lines + exported


def _before_the_world(recipe: Recipe) -> list[str]:
    """The plan of a recipe whose synthetic world is not built yet, or was built with other settings (seed, sizes,
    tasks or generator code) than the recipe's: what the run would build first, and the stages (their data and
    memory are planned from the world's files, so only once it exists)."""
    world = recipe.world
    again = world_built(recipe.out / "world") is not None
    sizes = ", ".join(f"{v} {k}" for k, v in world.items() if k not in ("seed", "tasks"))
    tasks = ", ".join(world.get("tasks", [])) or "every task"
    vocab = recipe.tokenizer.get("train_vocab")
    lines = [
        *_device_lines(recipe),
        f"kimivl train first {'rebuilds' if again else 'builds'} the synthetic world under {recipe.out / 'world'} "
        f"{'(the one there was built with other settings) ' if again else ''}(seed {world.get('seed', 0)}, "
        f"{sizes or 'the default sizes'} samples per task of {tasks})"
        + (f", then trains a {vocab}-rank tokenizer on it" if vocab else ""),
    ]
    lines += [
        f"stage {s.name}: {s.kind}, {s.steps} steps; its data and memory are planned once the world is built "
        "(run --plan again then)"
        for s in recipe.stages
    ]
    return lines
