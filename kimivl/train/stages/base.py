"""What every stage kind shares: the settings all stages take (and their checks), the settings of stages that train
parts of the model, what a stage's ``prepare()`` gets and returns."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import nn

from kimivl.data.formats import DataError
from kimivl.data.indexed import PROGRESS_BYTES, locate
from kimivl.distributed.world import World
from kimivl.processing.image import ImageError, open_image
from kimivl.processing.video import VideoError, check_video_file
from kimivl.progress import progress_bar
from kimivl.train.loop import LoopConfig
from kimivl.train.recipe import PARTS, RecipeError, StageNameError, check_integer, check_names, integer, number
from kimivl.train.trainable import set_trainable

RESUME_FREE = ("name", "kind", "ckpt_every", "log_every", "val", "recompute")  # a resume may change them
STAGE_NAME = re.compile(
    r"[A-Za-z0-9_][A-Za-z0-9._-]{0,98}[A-Za-z0-9_-]|[A-Za-z0-9_]"
)  # no trailing '.' (Windows drops it)
# other folders and files of a run, and the name of the base model's evaluation under out/eval; compared case-folded,
# as macOS's and Windows' filesystems compare names; nor can a folder take a Windows device's name, with or without a
# suffix
RESERVED = {"world", "tokenizer", "eval", "tensorboard", "base", "initial", "seed.json", "metrics.jsonl", "curves.png"}
DEVICES = {"con", "prn", "aux", "nul"} | {f"{port}{n}" for port in ("com", "lpt") for n in range(1, 10)}

if TYPE_CHECKING:
    from kimivl.processing.processor import KimiVLProcessor
    from kimivl.train.pipeline import Sources
    from kimivl.train.recipe import Recipe


@dataclass
class StageSettings:
    """Settings every stage kind takes; a kind's own dataclass adds its fields and checks (``check``)."""

    name: str
    kind: str
    steps: int
    lr: float
    schedule: str = "continue"  # or "cosine"
    warmup: int = 0  # for schedule "cosine"
    weight_decay: float = 0.1
    ns_dtype: str = "float32"  # Muon's Newton-Schulz: "bfloat16" is several times faster on CPU and GPU
    recompute: bool = False  # activation checkpointing: layer-boundary activations only, recomputed in backward
    clip: float = 1.0
    ckpt_every: int = 100
    rope_theta: float | None = None  # the LM's RoPE base from this stage on (long-context activation)

    def __post_init__(self):
        self.check(f"stage {self.name!r}")

    def check(self, where: str) -> None:
        name = self.name.casefold() if isinstance(self.name, str) else ""
        if not STAGE_NAME.fullmatch(self.name if name else "") or name in RESERVED or name.split(".")[0] in DEVICES:
            raise StageNameError(
                f"stage name {self.name!r}: use letters, digits, '.', '_' and '-' (not starting with '.' or '-', not "
                f"ending with '.'), other than {sorted(RESERVED)} and Windows' device names (con, nul, com1, ...) in "
                "any letter case: it names the stage's folder under out",
                [self.name],
            )
        if not integer(self.steps) or self.steps < 1 or not number(self.lr) or self.lr <= 0:
            raise RecipeError(f"{where}: steps >= 1 and lr > 0 are required, got {self.steps!r}, {self.lr!r}")
        for key, low in (("ckpt_every", 1), ("warmup", 0)):
            check_integer(f"{where}: {key}", getattr(self, key), low)
        for key in ("clip", "weight_decay"):
            if not number(getattr(self, key)) or getattr(self, key) < 0 or (key == "clip" and not self.clip):
                raise RecipeError(
                    f"{where}: {key} must be a number >= 0{' (and not 0)' if key == 'clip' else ''}, "
                    f"got {getattr(self, key)!r}"
                )
        if self.ns_dtype not in ("float32", "bfloat16"):
            raise RecipeError(f"{where}: ns_dtype is 'float32' or 'bfloat16', got {self.ns_dtype!r}")
        if self.rope_theta is not None and (not number(self.rope_theta) or self.rope_theta <= 0):
            raise RecipeError(f"{where}: rope_theta must be a number > 0, got {self.rope_theta!r}")
        if self.schedule not in ("continue", "cosine"):
            raise RecipeError(f"{where}: schedule must be 'continue' or 'cosine', got {self.schedule!r}")
        if self.schedule != "cosine" and self.warmup:
            raise RecipeError(
                f"{where}: warmup ({self.warmup} steps) is the warm-up of a stage's own schedule, and this stage "
                f"continues the recipe-wide one: set schedule: cosine to give the stage its own warm-up + cosine, or "
                "warm the recipe-wide curve up with the recipe's schedule.warmup"
            )
        if self.schedule == "cosine" and self.warmup >= self.steps:
            raise RecipeError(f"{where}: warmup ({self.warmup} steps) must be below steps ({self.steps})")
        if not isinstance(self.recompute, bool):
            raise RecipeError(f"{where}: recompute is true or false, got {self.recompute!r}")

    def sources_used(self) -> set[str]:
        """The recipe sources this stage reads."""
        return set()

    def record(self) -> dict[str, Any]:
        """The settings a resume of the stage must find unchanged (``TrainState.settings``): all but those of
        ``RESUME_FREE``, which change how often it saves, logs and validates, or its memory, not what it trains."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RESUME_FREE}

    def check_recipe(self, recipe: Recipe) -> None:
        """Checks that need the whole recipe, when it loads."""

    def check_model(self, model: nn.Module) -> None:
        """Checks that need the model, before the first stage runs (a meta-device model will do)."""

    def check_data(self, ctx: StageContext) -> None:
        """Checks of the records the stage reads, before the first stage runs (a later stage's bad record surfaced
        only when it started, after the stages before it trained) and again when it starts (sources checked once)."""


@dataclass
class PartsSettings(StageSettings):
    """A stage that trains whole parts of the model (``train``), less the parameters its ``freeze`` globs name, each
    part at ``lr`` times its ``lr_scale``, on packed rows of ``budget`` tokens."""

    train: list[str] = field(default_factory=lambda: list(PARTS))
    freeze: list[str] = field(default_factory=list)  # globs of parameter names kept frozen within ``train``
    lr_scale: dict[str, float] = field(default_factory=dict)  # part -> multiplier of lr
    budget: int = 1024

    def check(self, where: str) -> None:
        super().check(where)
        if not integer(self.budget) or self.budget < 16:
            raise RecipeError(f"{where}: budget (tokens of a packed row) must be an integer >= 16, got {self.budget!r}")
        check_names(f"{where}: train", self.train, "parts", PARTS)
        if not isinstance(self.freeze, list) or not all(isinstance(g, str) and g for g in self.freeze):
            raise RecipeError(f"{where}: freeze is a list of parameter-name patterns, got {self.freeze!r}")
        if (
            not isinstance(self.lr_scale, dict)
            or set(self.lr_scale) - set(PARTS)
            or not all(number(f) and f > 0 for f in self.lr_scale.values())
        ):
            raise RecipeError(f"{where}: lr_scale maps parts of {PARTS} to factors > 0, got {self.lr_scale}")

    def check_model(self, model: nn.Module) -> None:
        if self.freeze:  # a pattern that matches nothing fails now, not stages later
            self.freeze_model(model)
            model.requires_grad_(True)

    def freeze_model(self, model: nn.Module) -> None:
        """``set_trainable`` with the stage's ``train`` and ``freeze``; a mistake is a ``RecipeError`` naming it."""
        try:
            set_trainable(model, self.train, self.freeze)
        except ValueError as e:
            raise RecipeError(f"stage {self.name!r}: {e}") from None


def check_records(ctx: StageContext, names: list[str], problem: Callable[[dict], str | None]) -> None:
    """Before training, read every record of the conversation sources ``names`` once (a source checked for the same
    ``problem`` by an earlier stage is not read again): ``problem(record)`` says what is wrong with one, and the first
    found is a ``DataError`` naming its source, file and line. Media named by path must open: images and video frames
    as images (their headers are read; a path many records share is opened once), video files as containers holding
    a video stream (nothing is decoded). With the sources' ``progress``, files of ``PROGRESS_BYTES`` or more show a
    progress bar while they are checked."""
    for name in names:
        if (name, problem) in ctx.sources.checked or ctx.sources.is_text[name]:
            continue
        items = ctx.sources.items[name]
        path = getattr(items, "path", None)  # a JsonlRecords' file
        large = path is not None and os.path.getsize(path) >= PROGRESS_BYTES
        unreadable_image = functools.lru_cache(maxsize=4096)(_unreadable_image)  # this check's images, by path
        with progress_bar(
            total=len(items),
            unit="record",
            unit_scale=True,
            desc=f"checking {name}",
            disable=not (ctx.sources.progress and large),
        ) as bar:
            for i in range(len(items)):
                record = items[i]
                why = problem(record) or _unreadable_media(record, unreadable_image)
                if why:
                    raise DataError(f"data source {name!r}: {locate(items, i)} {why}")
                bar.update()
        ctx.sources.checked.add((name, problem))


def _unreadable_media(record: dict, unreadable_image: Callable[[str], str | None]) -> str | None:
    for message in record["messages"]:
        parts = message["content"] if isinstance(message["content"], list) else ()
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            images = [part["image"]] if kind == "image" else part.get("frames", []) if kind == "video" else []
            for path in images:
                if isinstance(path, str) and (why := unreadable_image(path)):
                    return why
            if kind == "video" and isinstance(part.get("video"), str) and (why := _unreadable_video(part["video"])):
                return why
    return None


def _unreadable_image(path: str) -> str | None:
    try:
        with open(path, "rb") as f, open_image(f, path):
            return None
    except (ImageError, OSError, Image.DecompressionBombError) as e:
        return f"names {path}, which is no image that can be read ({e})"


def _unreadable_video(path: str) -> str | None:
    try:
        check_video_file(path)
    except VideoError as e:
        return f"names {path}, which is no video that can be read ({e})"
    return None


def loop_config(stage: StageSettings, recipe: Recipe, **more) -> LoopConfig:
    """The ``train_loop`` settings of a vit or joint stage (``more``: its kind's own, e.g. bias balancing, and its
    ``source_record``), the stage's ``record`` among them."""
    return LoopConfig(
        steps=stage.steps,
        ckpt_every=stage.ckpt_every,
        log_every=stage.log_every,
        clip=stage.clip,
        bf16=recipe.bf16,
        accum=stage.accum,
        settings=stage.record(),
        **more,
    )


def source_record(ctx: StageContext, names) -> dict[str, dict[str, Any]]:
    """Each of the sources ``names``: its number of records, its index's ``digest`` (None for records held
    otherwise than as a ``JsonlRecords``) and whether it trains on answers only, which a resume compares
    (``TrainState.sources``)."""
    items = ctx.sources.items
    return {
        name: {
            "records": len(items[name]),
            "index": items[name].digest() if hasattr(items[name], "digest") else None,
            "answers_only": name in ctx.sources.answers_only,
        }
        for name in sorted(names)
    }


def once(ctx: StageContext, warn: Callable[..., None]) -> Callable[..., None]:
    """``warn`` (a logger's ``warning``) that gives each message once a run: a stage's data is checked before the
    first stage trains and again when it starts, and what a check warns of is said the first time only (the run's
    ``ctx.sources.checked`` keeps the messages given)."""

    def warn_once(message: str, *args) -> None:
        key = ("warned", message % args)
        if key not in ctx.sources.checked:
            ctx.sources.checked.add(key)
            warn(message, *args)

    return warn_once


@dataclass
class StageContext:
    """What a stage prepares from besides the model: the recipe, its data sources, the processor and the ranks."""

    recipe: Recipe
    sources: Sources
    processor: KimiVLProcessor
    world: World = field(default_factory=World)
    context: int | None = None  # the model's max_position_embeddings, where known: the most tokens a prompt may hold


@dataclass
class Prepared:
    """A stage ready to run: ``trainee`` (what the optimizer trains), ``data_line`` (how much data its steps hold, as
    logged and planned), ``run(optimizer, scheduler, progress)`` (trains, resuming; returns the last metrics),
    ``setup()`` (work that changes the model before the optimizer is built; ``--plan`` skips it), and whether frozen
    weights of a bf16 checkpoint may be held in bf16 under autocast (everything the stage runs is autocast)."""

    trainee: nn.Module
    data_line: str
    run: Callable[[torch.optim.Optimizer, Any, bool], dict[str, float]]
    setup: Callable[[], None] = lambda: None
    hold_frozen_bf16: bool = False
