"""Training recipes: a YAML file naming the base model, the data, and the stages to run in order.

```yaml
name: kimivl-tiny
seed: 0
out: runs/tiny                        # stage checkpoints, metrics.jsonl, curves.png
base: {preset: tiny}                  # or {checkpoint: path/to/official/checkpoint}
tokenizer: {train_vocab: 3840}        # or {path: dir}; default: the base checkpoint's own
device: cpu                           # or cuda (kimivl train --device overrides it)
bf16: null                            # bf16 autocast: true, false, or null: where the device multiplies bf16 fast
world: {seed: 0, train: 4000, heldout: 300}   # optional: build the synthetic world under out/world
sources: {caption: world/train/caption.jsonl, text: world/train/text.jsonl}   # name -> JSONL (relative to out/)
schedule: {warmup: 50, decay_stages: [cooldown]}   # one warm-up/stable/decay LR curve over 'continue' stages
export: {path: models/kimivl-tiny, dtype: bfloat16}
eval: {after: [sft], split: world/heldout, limit: 50}   # held-out accuracy -> out/eval/<stage>.json
                                      # (base: true also evaluates the base model first -> out/eval/base.json)
stages:
  - {name: vit, kind: vit, steps: 300, lr: 2.0e-3, sources: [caption, ocr], images_per_batch: 32}
  - {name: pretrain, kind: joint, steps: 800, lr: 3.0e-3, mix: {text: 3, caption: 1}, mix_end: {text: 1, caption: 3}}
  - {name: sft, kind: joint, steps: 300, lr: 1.0e-3, schedule: cosine, mix: {caption: 1}}
  - {name: rl, kind: rl, steps: 40, lr: 2.0e-4, sources: [reasoning], rl: {problems: 16, samples: 8}}
```
Joint stages train parts named in ``train`` (``vision_tower``, ``multi_modal_projector``, ``language_model``;
default all), less the parameters matching a ``freeze`` glob (``freeze: ["*.mlp.experts.*"]`` keeps the routed
experts as they are; see ``kimivl.train.trainable``); ``lr_scale: {vision_tower: 0.1}`` multiplies a part's
learning rate; ``standardize_images: 1.0`` first rescales the projector so that the stage's image embeddings have
mean 0 and that std in every channel (``kimivl.train.calibrate``). ``schedule: continue`` (the default) takes the
LR multiplier of the recipe-wide schedule at the global step where the stage starts, so stages resume the curve of
the one before; ``cosine`` gives the stage its own warm-up + cosine. ``budget`` is the tokens of a packed row, a
step's batch; ``replacement: false`` draws each source's records in a shuffled order, every record once per pass
(the default draws them at random); ``accum: 4`` adds the gradients of 4 rows (or vit batches) before each
optimizer step; ``rope_theta`` changes the LM's RoPE base from that stage on (long-context activation);
``recompute: true`` checkpoints activations (memory of one layer at a time, about a third more compute); ``val``
logs a held-out loss (see ``Stage``). An ``rl`` stage runs ``steps`` RL iterations on the problems of its
``sources`` (see ``kimivl.rl.trainer.RLConfig`` for the ``rl`` settings; ``budget`` is its packed log-prob row
length)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kimivl.data.synthetic.sample import DIFFICULTIES

PARTS = ("vision_tower", "multi_modal_projector", "language_model")
MAPPINGS = {"tokenizer": {"path", "train_vocab"}, "schedule": {"warmup", "decay_stages", "min_ratio"},
            "export": {"path", "dtype"}, "eval": {"after", "split", "limit", "max_new_tokens", "base"}}


class RecipeError(ValueError):
    """A recipe that cannot run."""


@dataclass
class Stage:
    name: str
    kind: str  # "vit", "joint" or "rl"
    steps: int
    lr: float
    schedule: str = "continue"  # or "cosine"
    warmup: int = 0  # for schedule "cosine"
    train: list[str] = field(default_factory=lambda: list(PARTS))
    freeze: list[str] = field(default_factory=list)  # globs of parameter names kept frozen within ``train``
    lr_scale: dict[str, float] = field(default_factory=dict)  # part -> multiplier of lr (joint and rl stages)
    standardize_images: float | None = None  # joint: first set image embeddings to mean 0, this std per channel
    mix: dict[str, float] = field(default_factory=dict)
    mix_end: dict[str, float] | None = None
    sources: list[str] = field(default_factory=list)  # vit: caption sources; rl: problem sources
    images_per_batch: int = 32
    budget: int = 1024
    accum: int = 1  # vit and joint: batches (packed rows) whose gradients make one step
    replacement: bool = True  # joint: draw records at random; false: every record once per pass, reshuffled
    val: dict[str, Any] | None = None  # joint: {sources: [names], every: 100, rows: 16} -> val_loss in the metrics
    rope_theta: float | None = None
    weight_decay: float = 0.1
    ns_dtype: str = "float32"  # Muon's Newton-Schulz: "bfloat16" is several times faster on CPU and GPU
    recompute: bool = False  # activation checkpointing: layer-boundary activations only, recomputed in backward
    clip: float = 1.0
    bias_update_rate: float = 1e-3
    ckpt_every: int = 100
    log_every: int = 10
    rl: dict[str, Any] | None = None  # rl: kimivl.rl.trainer.RLConfig settings

    def __post_init__(self):
        where = f"stage {self.name!r}"
        if self.kind not in ("vit", "joint", "rl"):
            raise RecipeError(f"{where}: kind must be 'vit', 'joint' or 'rl', got {self.kind!r}")
        if not _number(self.lr) or not all(_integer(v) for v in (self.steps, self.budget)) \
                or self.steps < 1 or self.lr <= 0 or self.budget < 16:
            raise RecipeError(f"{where}: steps >= 1, lr > 0 and budget >= 16 are required, got {self.steps!r}, "
                              f"{self.lr!r}, {self.budget!r}")
        if not _integer(self.accum) or self.accum < 1:
            raise RecipeError(f"{where}: accum (batches per optimizer step) must be an integer >= 1, got "
                              f"{self.accum!r}")
        for key, low in (("ckpt_every", 1), ("log_every", 1), ("images_per_batch", 1), ("warmup", 0)):
            if not _integer(getattr(self, key)) or getattr(self, key) < low:
                raise RecipeError(f"{where}: {key} must be an integer >= {low}, got {getattr(self, key)!r}")
        for key, low in (("clip", 0.0), ("weight_decay", 0.0), ("bias_update_rate", 0.0)):
            if not _number(getattr(self, key)) or getattr(self, key) < low or (key == "clip" and not self.clip):
                raise RecipeError(f"{where}: {key} must be a number >= 0{' (and not 0)' if key == 'clip' else ''}, "
                                  f"got {getattr(self, key)!r}")
        if self.ns_dtype not in ("float32", "bfloat16"):
            raise RecipeError(f"{where}: ns_dtype is 'float32' or 'bfloat16', got {self.ns_dtype!r}")
        if self.rope_theta is not None and (not _number(self.rope_theta) or self.rope_theta <= 0):
            raise RecipeError(f"{where}: rope_theta must be a number > 0, got {self.rope_theta!r}")
        for key in ("mix", "mix_end"):
            weights = getattr(self, key) or {}
            if not isinstance(weights, dict) or not all(_number(w) and w >= 0 for w in weights.values()):
                raise RecipeError(f"{where}: {key} maps source names to weights >= 0, got {weights!r}")
        if self.accum > 1 and self.kind == "rl":
            raise RecipeError(f"{where}: an rl stage sets its batches with rl.problems and rl.updates; accum does "
                              "not apply")
        if self.val is not None:
            _check_val(where, self.kind, self.val)
        if self.schedule not in ("continue", "cosine"):
            raise RecipeError(f"{where}: schedule must be 'continue' or 'cosine', got {self.schedule!r}")
        bad = set(self.train) - set(PARTS)
        if bad or not self.train:
            problem = f"names unknown parts {sorted(bad)}" if bad else "is empty"
            raise RecipeError(f"{where}: train {problem}; choose from {PARTS}")
        if not isinstance(self.freeze, list) or not all(isinstance(g, str) and g for g in self.freeze):
            raise RecipeError(f"{where}: freeze is a list of parameter-name patterns, got {self.freeze!r}")
        if self.freeze and self.kind == "vit":
            raise RecipeError(f"{where}: a vit stage trains the vision tower alone; freeze does not apply")
        if set(self.lr_scale) - set(PARTS) or not all(isinstance(f, (int, float)) and f > 0
                                                       for f in self.lr_scale.values()):
            raise RecipeError(f"{where}: lr_scale maps parts of {PARTS} to factors > 0, got {self.lr_scale}")
        if self.lr_scale and self.kind == "vit":
            raise RecipeError(f"{where}: a vit stage trains the vision tower alone; lr_scale does not apply")
        if self.standardize_images is not None and (self.kind != "joint" or not self.standardize_images > 0):
            raise RecipeError(f"{where}: standardize_images (a target std > 0) applies to joint stages")
        if self.kind == "joint" and not self.mix:
            raise RecipeError(f"{where}: a joint stage needs a 'mix' of sources")
        if self.kind == "vit" and not self.sources:
            raise RecipeError(f"{where}: a vit stage needs caption 'sources'")
        if self.kind == "rl" and not self.sources:
            raise RecipeError(f"{where}: an rl stage needs problem 'sources'")
        if not isinstance(self.replacement, bool):
            raise RecipeError(f"{where}: replacement is true or false, got {self.replacement!r}")
        if not isinstance(self.recompute, bool):
            raise RecipeError(f"{where}: recompute is true or false, got {self.recompute!r}")
        if self.rl is not None and (self.kind != "rl" or not isinstance(self.rl, dict)):
            raise RecipeError(f"{where}: 'rl' settings are a mapping, for a stage of kind 'rl'")


@dataclass
class Recipe:
    name: str
    out: Path
    stages: list[Stage]
    seed: int = 0
    base: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    tokenizer: dict[str, Any] = field(default_factory=dict)
    world: dict[str, Any] | None = None
    sources: dict[str, str | dict[str, Any]] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=lambda: {"warmup": 0, "decay_stages": []})
    export: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None  # {after: [stage, ...], split: DIR of <task>.jsonl, limit: N per task, base}
    device: str = "cpu"  # where the model trains: "cuda", "cuda:1", ...
    bf16: bool | None = None  # bf16 autocast; None: where the device multiplies bf16 fast (kimivl.precision)

    def __post_init__(self):
        self.tokenizer = {} if self.tokenizer is None else self.tokenizer  # an empty `tokenizer:` in YAML
        self.schedule = {} if self.schedule is None else self.schedule
        for name, spec in self.sources.items():
            _check_source(name, spec)
        for key, allowed in MAPPINGS.items():
            _check_keys(key, getattr(self, key), allowed)
        if len(self.tokenizer) > 1:
            raise RecipeError(f"tokenizer takes one of {{path: DIR}} or {{train_vocab: N}}, got {self.tokenizer}")
        if self.export is not None and ("path" not in self.export
                                        or self.export.get("dtype", "bfloat16") not in ("bfloat16", "float32")):
            raise RecipeError(f"export needs a path and a dtype of bfloat16 (default) or float32, got {self.export}")
        if self.eval is not None and "split" not in self.eval:
            raise RecipeError(f"eval needs a split (a directory of held-out <task>.jsonl files), got {self.eval}")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise RecipeError(f"stage names must be unique, got {names}")
        for s in self.stages:
            used = set(s.mix) | set(s.mix_end or {}) | set(s.sources) | set((s.val or {}).get("sources", []))
            missing = used - set(self.sources)
            if missing:
                raise RecipeError(f"stage {s.name!r} uses sources {sorted(missing)} that 'sources' does not define")
        unknown = set(self.schedule.get("decay_stages", [])) - set(names)
        if unknown:
            raise RecipeError(f"schedule.decay_stages names unknown stages {sorted(unknown)}")
        unknown = set((self.eval or {}).get("after", [])) - set(names)
        if unknown:
            raise RecipeError(f"eval.after names unknown stages {sorted(unknown)}")
        if len(self.base) != 1 or next(iter(self.base)) not in ("preset", "checkpoint"):
            raise RecipeError(f"base must be {{preset: NAME}} or {{checkpoint: PATH}}, got {self.base}")
        _check_device(self.device)
        if not (self.bf16 is None or isinstance(self.bf16, bool)):
            raise RecipeError(f"bf16 is true, false or null (where the device multiplies bf16 fast), got {self.bf16!r}")

    def source_path(self, name: str) -> Path:
        spec = self.sources[name]
        return self.out / (spec["path"] if isinstance(spec, dict) else spec)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_val(where: str, kind: str, val: Any) -> None:
    """A stage's ``val``: ``{sources: [names], every: steps, rows: packed rows}`` on a joint stage."""
    if kind != "joint":
        raise RecipeError(f"{where}: val (a held-out loss) applies to joint stages")
    if not isinstance(val, dict) or set(val) - {"sources", "every", "rows"}:
        raise RecipeError(f"{where}: val is a mapping of 'sources', 'every' and 'rows', got {val!r}")
    sources = val.get("sources")
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
        raise RecipeError(f"{where}: val needs 'sources', a list of source names, got {sources!r}")
    for key in ("every", "rows"):
        if key in val and (not _integer(val[key]) or val[key] < 1):
            raise RecipeError(f"{where}: val {key} must be an integer >= 1, got {val[key]!r}")


def _check_device(name: Any) -> None:
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise RecipeError(f"device must name a torch device such as 'cpu' or 'cuda', got {name!r}") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise RecipeError(f"device {name!r} is not available here ({torch.cuda.device_count()} CUDA devices)")
    if device.type not in ("cpu", "cuda"):
        raise RecipeError(f"device {name!r}: training runs on 'cpu' or 'cuda'")


def _check_keys(key: str, value: Any, allowed: set[str]) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise RecipeError(f"{key} must be a mapping, got {value!r}")
    unknown = set(value) - allowed
    if unknown:
        raise RecipeError(f"{key} has unknown keys {sorted(unknown)}; it takes {sorted(allowed)}")


def _check_source(name: str, spec: Any) -> None:
    """A source is a path, or ``{path, answers_only: bool, difficulty: [levels]}``."""
    if isinstance(spec, str) and spec:
        return
    where = f"data source {name!r}"
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str) or not spec["path"]:
        raise RecipeError(f"{where}: give a path, or a mapping with a 'path' (and optionally 'answers_only', "
                          f"'difficulty'), got {spec!r}")
    unknown = set(spec) - {"path", "answers_only", "difficulty"}
    if unknown:
        raise RecipeError(f"{where}: unknown keys {sorted(unknown)}; a source takes 'path', 'answers_only', "
                          "'difficulty'")
    if not isinstance(spec.get("answers_only", False), bool):
        raise RecipeError(f"{where}: answers_only must be true or false, got {spec['answers_only']!r}")
    levels = spec.get("difficulty", list(DIFFICULTIES))
    if not isinstance(levels, list) or not levels or set(levels) - set(DIFFICULTIES):
        raise RecipeError(f"{where}: difficulty must be a list of some of {list(DIFFICULTIES)}, got {levels!r}")


def load_recipe(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a recipe file; relative ``out`` and export paths are taken from the current directory."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"cannot read recipe {path}: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a mapping")
    raw.update(overrides or {})
    known = {f.name for f in fields(Recipe)}
    unknown = set(raw) - known
    if unknown:
        raise RecipeError(f"recipe {path}: unknown keys {sorted(unknown)}")
    try:
        stages = [Stage(**s) for s in raw.pop("stages", [])]
        if not stages:
            raise RecipeError(f"recipe {path} has no stages")
        return Recipe(stages=stages, out=Path(raw.pop("out", f"runs/{raw.get('name', 'run')}")), **raw)
    except TypeError as e:
        raise RecipeError(f"recipe {path}: {e}") from None
