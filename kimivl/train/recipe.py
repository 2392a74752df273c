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
export: {path: models/kimivl-tiny, dtype: bfloat16, generation: {temperature: 0.2}}   # -> generation_config.json
parallel: {dp_shard: 2, ep: 2}        # optional, under torchrun: shard weights over 2 ranks, split experts over 2
eval: {after: [sft], split: world/heldout, limit: 50}   # held-out accuracy -> out/eval/<stage>.json
                                      # (base: true also evaluates the base model first -> out/eval/base.json)
stages:
  - {name: vit, kind: vit, steps: 300, lr: 2.0e-3, sources: [caption, ocr], images_per_batch: 32}
  - {name: pretrain, kind: joint, steps: 800, lr: 3.0e-3, mix: {text: 3, caption: 1}, mix_end: {text: 1, caption: 3}}
  - {name: sft, kind: joint, steps: 300, lr: 1.0e-3, schedule: cosine, mix: {caption: 1}}
  - {name: rl, kind: rl, steps: 40, lr: 2.0e-4, sources: [reasoning], rl: {problems: 16, samples: 8}}
```
Each stage kind takes its own settings, defined and checked in its module under ``kimivl.train.stages``: the
settings every kind takes in ``base.StageSettings`` (``steps``, ``lr``, ``schedule``, ``clip``, ``rope_theta``, ...),
``vit.ViTStage``, ``joint.JointStage`` and ``rl.RLStage``. ``schedule: continue`` (the default) takes the LR multiplier
of the recipe-wide schedule at the global step where the stage starts, so stages resume the curve of the one before;
``cosine`` gives the stage its own warm-up + cosine."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kimivl.data.synthetic.sample import DIFFICULTIES
from kimivl.files import unencodable
from kimivl.finite import finite

if TYPE_CHECKING:
    from kimivl.train.stages.base import StageSettings

PARTS = ("vision_tower", "multi_modal_projector", "language_model")
MAPPINGS = {
    "tokenizer": {"path", "train_vocab"},
    "schedule": {"warmup", "decay_stages", "min_ratio"},
    "export": {"path", "dtype", "generation"},
    "eval": {"after", "split", "limit", "max_new_tokens", "base"},
}
PATH_KEYS = (("base", "checkpoint"), ("tokenizer", "path"), ("export", "path"), ("eval", "split"))


class RecipeError(ValueError):
    """A recipe that cannot run."""


class StageNameError(RecipeError):
    """A stage name a recipe cannot take (``names``: those refused), which ``load_recipe`` says more of when the run
    directory holds the work of a stage so named (an earlier kimivl took the name)."""

    def __init__(self, message: str, names: list[Any]):
        super().__init__(message)
        self.names = names


class ExportRefused(RecipeError):
    """A trained run's export path, taken by another run meanwhile: the model stays in the run's ``out``."""


@dataclass
class Recipe:
    name: str
    out: Path
    stages: list[StageSettings]
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
    parallel: dict[str, int] | None = None  # {dp_shard: N, ep: M, dp_replicate: R, timeout: s} (kimivl.distributed)

    def __post_init__(self):
        if not (integer(self.seed) and 0 <= self.seed < 2**64):  # first: the stages' checks add to it
            raise RecipeError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if not (isinstance(self.name, str) and self.name):
            raise RecipeError(f"name must be the run's name, a string, got {self.name!r}")
        self.tokenizer = {} if self.tokenizer is None else self.tokenizer  # an empty `tokenizer:` in YAML
        self.schedule = {} if self.schedule is None else self.schedule
        self.sources = {} if self.sources is None else self.sources
        if not isinstance(self.sources, dict):
            raise RecipeError(f"sources must be a mapping of source names to paths, got {self.sources!r}")
        for name, spec in self.sources.items():
            _check_source(name, spec)
        for key, allowed in MAPPINGS.items():
            _check_keys(key, getattr(self, key), allowed)
        _check_base(self.base, self.tokenizer)
        _check_tokenizer(self.tokenizer)
        _check_world(self.world)
        if self.export is not None:
            _check_export(self.export)
        names = [s.name for s in self.stages]
        if len({name.casefold() for name in names}) != len(names):  # macOS's and Windows' disks: one folder
            cased = [n for n in names if any(m != n and m.casefold() == n.casefold() for m in names)]
            raise StageNameError(f"stage names must be unique, letter case aside, got {names}", cased)
        if self.eval is not None:
            _check_eval(self.eval, names)
        for s in self.stages:
            missing = s.sources_used() - set(self.sources)
            if missing:
                raise RecipeError(f"stage {s.name!r} uses sources {sorted(missing)} that 'sources' does not define")
        self._check_schedule(names)
        continued = sum(s.steps for s in self.stages if s.schedule == "continue")
        if continued and not self.schedule.get("warmup", 0) < continued:
            raise RecipeError(
                f"schedule.warmup ({self.schedule['warmup']} steps) must be below the steps of the stages "
                f"that continue the recipe-wide schedule ({continued})"
            )
        _check_device(self.device)

    def _check_schedule(self, names: list[str]) -> None:
        """``schedule``'s values: a warm-up of whole steps, a floor in [0, 1], and decay stages that continue the
        curve one after another (the decay runs over their steps in a row), after the warm-up has ended."""
        warmup, floor = self.schedule.get("warmup", 0), self.schedule.get("min_ratio", 0.1)
        if not (integer(warmup) and warmup >= 0):
            raise RecipeError(f"schedule.warmup must be a whole number of steps >= 0, got {warmup!r}")
        if not (number(floor) and 0 <= floor <= 1):
            raise RecipeError(f"schedule.min_ratio must be a number in [0, 1] (the LR's floor), got {floor!r}")
        decay = self.schedule.get("decay_stages", [])
        if not (isinstance(decay, list) and all(isinstance(n, str) for n in decay)):
            raise RecipeError(f"schedule.decay_stages must be a list of stage names, got {decay!r}")
        unknown = set(decay) - set(names)
        if unknown:
            raise RecipeError(f"schedule.decay_stages names unknown stages {sorted(unknown)}")
        continued = [s.name for s in self.stages if s.schedule == "continue"]
        own = sorted(set(decay) - set(continued))
        if own:
            raise RecipeError(f"schedule.decay_stages names {own}, which run their own schedule, not the shared curve")
        at = sorted(continued.index(n) for n in set(decay))
        if at and at != list(range(at[0], at[-1] + 1)):
            raise RecipeError(
                f"schedule.decay_stages {decay} must follow one another among the stages that continue the curve "
                f"({continued}): the decay runs over their steps in a row"
            )
        steps = {s.name: s.steps for s in self.stages}
        start = sum(steps[n] for n in continued[: at[0]]) if at else 0  # the global step where the decay begins
        if at and warmup > start:
            raise RecipeError(
                f"schedule.warmup ({warmup} steps) must end before the decay begins: schedule.decay_stages {decay} "
                f"start at step {start} of the recipe-wide curve, so the LR would still rise there. Shorten "
                f"schedule.warmup to at most {start} steps, or decay later stages"
            )
        if not (self.bf16 is None or isinstance(self.bf16, bool)):
            raise RecipeError(f"bf16 is true, false or null (where the device multiplies bf16 fast), got {self.bf16!r}")
        check_parallel(self.parallel)
        for s in self.stages:
            s.check_recipe(self)

    def source_path(self, name: str) -> Path:
        spec = self.sources[name]
        return self.out / (spec["path"] if isinstance(spec, dict) else spec)


def integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def number(value: Any) -> bool:
    """A finite int or float (not a bool, NaN, an infinity or an int too large for a float)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and finite(value)


def check_integer(what: str, value: Any, low: int) -> None:
    """A ``RecipeError`` naming ``what`` (the key, with its stage) unless ``value`` is an integer >= ``low``."""
    if not integer(value) or value < low:
        raise RecipeError(f"{what} must be an integer >= {low}, got {value!r}")


def check_names(what: str, value: Any, kind: str = "names", known: Any = None, empty: bool = False) -> None:
    """A ``RecipeError`` naming ``what`` unless ``value`` is a list of ``kind`` (strings), each one of ``known`` when
    given, and not empty unless ``empty``."""
    if not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
        raise RecipeError(f"{what} must be a list of {kind}, got {value!r}")
    choose = "" if known is None else f"; choose from {list(known)}"
    if not (value or empty):
        raise RecipeError(f"{what} is empty{choose}")
    unknown = [] if known is None else sorted(set(value) - set(known))
    if unknown:
        raise RecipeError(f"{what} names unknown {kind} {unknown}{choose}")


PARALLEL_KEYS = ("dp_shard", "ep", "dp_replicate", "timeout")
MAX_TIMEOUT = 365 * 24 * 3600  # parallel.timeout's most seconds: a year (torch's limit, in nanoseconds, is ~292 years)


def check_parallel(parallel: Any) -> None:
    """A recipe's ``parallel`` mapping: positive integers under the known keys (``kimivl.distributed.world``), the
    timeout at most ``MAX_TIMEOUT`` seconds."""
    if parallel is None:
        return
    if not isinstance(parallel, dict) or set(parallel) - set(PARALLEL_KEYS):
        raise RecipeError(f"parallel is a mapping of {list(PARALLEL_KEYS)}, got {parallel!r}")
    for key, value in parallel.items():
        if value is not None:
            check_integer(f"parallel.{key}", value, 1)
    if (parallel.get("timeout") or 0) > MAX_TIMEOUT:
        raise RecipeError(
            f"parallel.timeout must be at most {MAX_TIMEOUT:,} seconds (one year), got {parallel['timeout']}: it is "
            "how long a collective waits for a stuck rank before the job ends (default 600); give fewer seconds"
        )


def _check_device(name: Any) -> None:
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise RecipeError(f"device must name a torch device such as 'cpu' or 'cuda', got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise RecipeError(f"device {name!r}: training runs on 'cpu' or 'cuda'")


def device_here(name: str) -> bool:
    """Whether the training device ``name`` (``cpu``, ``cuda`` or ``cuda:N``) exists on this machine."""
    import torch

    device = torch.device(name)
    return device.type == "cpu" or (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count())


def _check_keys(key: str, value: Any, allowed: set[str]) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise RecipeError(f"{key} must be a mapping, got {value!r}")
    unknown = set(value) - allowed
    if unknown:
        raise RecipeError(f"{key} has unknown keys {sorted(unknown, key=str)}; it takes {sorted(allowed)}")


def _check_generation(settings: Any) -> None:
    """``export.generation``: the sampling the export recommends in its ``generation_config.json``."""
    from kimivl.inference.generation_config import KEYS, checked_settings
    from kimivl.inference.sampling import SamplingError

    _check_keys("export.generation", settings, set(KEYS))
    if "temperature" not in (settings or {}):  # Hugging Face reads a file without one as greedy decoding
        raise RecipeError(f"export.generation needs a temperature (0 for greedy), got {settings}")
    try:
        checked_settings(settings, "export.generation")
    except SamplingError as e:
        raise RecipeError(str(e)) from None


def _check_base(base: Any, tokenizer: dict) -> None:
    """``base``: ``{preset: NAME}`` (one of ``kimivl.config.PRESETS``, which has no tokenizer: the recipe gives
    one), or ``{checkpoint: PATH}``."""
    from kimivl.config import PRESETS

    if not (isinstance(base, dict) and len(base) == 1 and next(iter(base)) in ("preset", "checkpoint")):
        raise RecipeError(f"base must be {{preset: NAME}} or {{checkpoint: PATH}}, got {base!r}")
    if "checkpoint" in base and not (isinstance(base["checkpoint"], str) and base["checkpoint"]):
        raise RecipeError(f"base.checkpoint must be a checkpoint directory, got {base['checkpoint']!r}")
    if "preset" in base and not (isinstance(base["preset"], str) and base["preset"] in PRESETS):
        raise RecipeError(f"base.preset {base['preset']!r} is unknown; choose one of {sorted(PRESETS)}")
    if "preset" in base and not tokenizer:
        raise RecipeError(
            f"base {{preset: {base['preset']}}} needs a tokenizer: give tokenizer: {{path: DIR}} or "
            "{train_vocab: N} (a preset has no tokenizer of its own)"
        )


def _check_tokenizer(tokenizer: dict) -> None:
    """``tokenizer``: ``{path: DIR}``, or ``{train_vocab: N}`` BPE ranks (the 256 single bytes among them)."""
    if len(tokenizer) > 1:
        raise RecipeError(f"tokenizer takes one of {{path: DIR}} or {{train_vocab: N}}, got {tokenizer}")
    if "path" in tokenizer and not (isinstance(tokenizer["path"], str) and tokenizer["path"]):
        raise RecipeError(f"tokenizer.path must be a tokenizer directory, got {tokenizer['path']!r}")
    if "train_vocab" in tokenizer:
        check_integer("tokenizer.train_vocab", tokenizer["train_vocab"], 256)


def _check_world(world: Any) -> None:
    """``world``: the synthetic world's ``seed``, ``tasks`` and the samples per task of its splits, ``train`` and
    ``heldout`` (``kimivl.data.world``)."""
    if world is None:
        return
    from kimivl.data.synthetic import TASKS
    from kimivl.data.world import DEFAULT_SIZES

    _check_keys("world", world, {"seed", "tasks", *DEFAULT_SIZES})
    check_integer("world.seed", world.get("seed", 0), 0)
    tasks = world.get("tasks", list(TASKS))
    check_names("world.tasks", tasks, "tasks", TASKS)
    if len(set(tasks)) != len(tasks):
        raise RecipeError(f"world.tasks names a task twice, got {tasks}")
    for split in DEFAULT_SIZES:
        if split in world:
            check_integer(f"world.{split}", world[split], 0)


def _check_export(export: dict) -> None:
    """``export``: the directory the last stage's model is written to, its dtype and the sampling it recommends."""
    if "path" not in export or export.get("dtype", "bfloat16") not in ("bfloat16", "float32"):
        raise RecipeError(f"export needs a path and a dtype of bfloat16 (default) or float32, got {export}")
    if not (isinstance(export["path"], str) and export["path"].strip()):
        raise RecipeError(f"export.path must be the directory to write the model to, got {export['path']!r}")
    if "generation" in export:
        _check_generation(export["generation"])


def _check_eval(spec: dict, stages: list[str]) -> None:
    """``eval``: a held-out ``split`` directory, the stages to evaluate after (``after``; ``base``: the base model
    too), at most ``limit`` records per task (all without one) and ``max_new_tokens`` per answer."""
    if "split" not in spec:
        raise RecipeError(f"eval needs a split (a directory of held-out <task>.jsonl files), got {spec}")
    if not (isinstance(spec["split"], str) and spec["split"]):
        raise RecipeError(f"eval.split must be a directory of held-out <task>.jsonl files, got {spec['split']!r}")
    check_names("eval.after", spec.get("after", []), "stages", stages, empty=True)
    if spec.get("limit") is not None:
        check_integer("eval.limit", spec["limit"], 1)
    check_integer("eval.max_new_tokens", spec.get("max_new_tokens", 160), 1)
    if not isinstance(spec.get("base", False), bool):
        raise RecipeError(f"eval.base is true or false (evaluate the base model first), got {spec['base']!r}")


def _check_source(name: Any, spec: Any) -> None:
    """A source is a path, or ``{path, answers_only: bool, difficulty: [levels]}``, under a name."""
    where = f"data source {name!r}"
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{where}: a source's name is a string, as the stages name it")
    if isinstance(spec, str) and spec:
        return
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str) or not spec["path"]:
        raise RecipeError(
            f"{where}: give a path, or a mapping with a 'path' (and optionally 'answers_only', "
            f"'difficulty'), got {spec!r}"
        )
    unknown = set(spec) - {"path", "answers_only", "difficulty"}
    if unknown:
        raise RecipeError(
            f"{where}: unknown keys {sorted(unknown, key=str)}; a source takes 'path', 'answers_only', 'difficulty'"
        )
    if not isinstance(spec.get("answers_only", False), bool):
        raise RecipeError(f"{where}: answers_only must be true or false, got {spec['answers_only']!r}")
    levels = spec.get("difficulty", list(DIFFICULTIES))
    if not isinstance(levels, list) or not levels or set(levels) - set(DIFFICULTIES):
        raise RecipeError(f"{where}: difficulty must be a list of some of {list(DIFFICULTIES)}, got {levels!r}")


@functools.cache
def _recipe_loader() -> type:
    """PyYAML's safe loader, with YAML 1.2's floats (``1e-3`` is a number, not the string YAML 1.1 makes it) and
    a duplicate key as an error (YAML 1.1 lets the last one win silently), and so a key that is a list or a
    mapping."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (list, dict)):
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, "a key is a list or a mapping", key_node.start_mark
                    )
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"key {key!r} appears twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    exponent = r"[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+"
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(f"^{exponent}$"), list("-+0123456789"))
    return Loader


def _paths(raw: dict[str, Any]) -> Iterator[tuple[str, dict, str]]:
    """(name, mapping, key) of each path a raw recipe gives as a string: ``out``, ``base.checkpoint``,
    ``tokenizer.path``, ``sources``, ``export.path``, ``eval.split``."""
    places = [("out", raw, "out")]
    places += [(f"{k}.{key}", raw.get(k), key) for k, key in PATH_KEYS]
    sources = raw.get("sources")
    if isinstance(sources, dict):
        for name, spec in sources.items():
            places += [(f"sources.{name}", sources, name), (f"sources.{name}.path", spec, "path")]
    return ((name, m, key) for name, m, key in places if isinstance(m, dict) and isinstance(m.get(key), str))


def load_recipe(path: str | os.PathLike, overrides: dict[str, Any] | None = None, device_needed: bool = True) -> Recipe:
    """Read a recipe file; relative ``out`` and export paths are taken from the current directory, except that an
    ``out`` among the ``overrides`` (``kimivl train --out``) moves a relative export path under it: every output of
    the run then lands there (``~`` in a path is the home directory). The recipe's device must exist here unless
    ``device_needed`` is false (``--plan``, which plans for a device this machine lacks)."""
    import yaml

    try:
        raw = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_recipe_loader())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RecipeError(f"cannot read recipe {path}: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a mapping")
    raw.update(overrides or {})
    raw.setdefault("out", f"runs/{raw.get('name', 'run')}")
    raw["out"] = os.fspath(raw["out"]) if isinstance(raw["out"], os.PathLike) else raw["out"]
    if not isinstance(raw["out"], str) or not raw["out"].strip():  # " " would be a folder named by a space
        raise RecipeError(f"recipe {path}: out must be the run's directory, got {raw['out']!r}")
    for name, mapping, key in _paths(raw):
        mapping[key] = os.path.expanduser(mapping[key])  # as a shell would read ~: no shell sees these
        if why := unencodable(mapping[key]):
            raise RecipeError(f"recipe {path}: {name}: {why}")
    export = raw.get("export")
    if (
        (overrides or {}).get("out")
        and isinstance(export, dict)
        and isinstance(export.get("path"), str)
        and not Path(export["path"]).is_absolute()
    ):
        raw["export"] = {**export, "path": str(Path(raw["out"]) / export["path"])}
    known = {f.name for f in fields(Recipe)}
    unknown = set(raw) - known
    if unknown:
        raise RecipeError(f"recipe {path}: unknown keys {sorted(unknown, key=str)}")
    if "name" not in raw:
        raise RecipeError(f"recipe {path} has no name: give the run one (name: my-run)")
    stages = raw.pop("stages", None) or []
    if not isinstance(stages, list):
        raise RecipeError(
            f"recipe {path}: stages is a list of stage mappings, each starting '- name: ...', got {stages!r}"
        )
    from kimivl.train.stages import parse_stage  # the stage kinds build on this module

    out = Path(raw.pop("out"))
    try:
        stages = [parse_stage(s) for s in stages]
        if not stages:
            raise RecipeError(f"recipe {path} has no stages")
        recipe = Recipe(stages=stages, out=out, **raw)
    except StageNameError as e:
        from kimivl.train.pipeline import renamed_stage_advice

        raise StageNameError(f"{e}{renamed_stage_advice(out, e.names)}", e.names) from None
    except TypeError as e:
        raise RecipeError(f"recipe {path}: {e}") from None
    if device_needed and not device_here(recipe.device):
        import torch

        raise RecipeError(
            f"device {recipe.device!r} is not available here ({torch.cuda.device_count()} CUDA devices): give "
            "--device cpu, or --plan to plan the run for that device"
        )
    return recipe
