"""Run a recipe: prepare data, tokenizer and base model, then each stage in order, each starting from the one
before. A stage's result is an official-format checkpoint (``out/<stage>/final``) that any later stage, or any other
recipe, can start from; a re-run skips finished stages and resumes an interrupted one."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kimivl.checkpoint import EXPORT_RECORD, convert_checkpoint, load_checkpoint, weights_size
from kimivl.config import KimiVLConfig
from kimivl.data.formats import content_text, is_text_file, iter_texts
from kimivl.data.indexed import JsonlRecords
from kimivl.data.world import ensure_world
from kimivl.distributed.gather import save_gathered
from kimivl.distributed.load import load_sharded_checkpoint, local_rows
from kimivl.distributed.parallelize import parallelize
from kimivl.distributed.plan import rank_memory_plan
from kimivl.distributed.recompute import apply_recompute, remove_recompute
from kimivl.distributed.same_run import check_same_run
from kimivl.distributed.world import World, main_first
from kimivl.eval.position_loss import position_loss
from kimivl.eval.synthetic import evaluate, heldout_records
from kimivl.files import publish_dir, temporary_dir, unwritable, write_text_atomic
from kimivl.inference.generation_config import write_generation_config
from kimivl.model.kimivl import KimiVL, check_checkpoint
from kimivl.precision import use_bf16
from kimivl.processing.chat_template import THINK_CLOSE, THINK_OPEN, parse_thinking
from kimivl.processing.processor import KimiVLProcessor, check_media_pad, model_image_processor
from kimivl.processing.tokenizer import MODEL_FILE, KimiTokenizer, load_ranks, train_bpe
from kimivl.rl.trainer import difficulties_of
from kimivl.train.lock import export_lock, run_lock
from kimivl.train.metrics import plot_curves
from kimivl.train.optim import build_optimizer
from kimivl.train.recipe import ExportRefused, Recipe, RecipeError
from kimivl.train.schedule import WSD, WarmupCosine, WSDFrom, scheduler_at
from kimivl.train.stages import check_layout, prepare
from kimivl.train.stages.base import StageContext, StageSettings
from kimivl.train.state import LATEST
from kimivl.train.trainable import hold_frozen_in_bf16, memory_plan, restore_float32

log = logging.getLogger(__name__)
FINAL = "final"


class Sources:
    """The recipe's data sources, validated once and read on demand (``JsonlRecords``): conversation records or plain
    texts, by name. A source given as ``{path: FILE, answers_only: true}`` drops the ``◁think▷…◁/think▷`` part of
    assistant turns; ``{path: FILE, difficulty: [easy, ...]}`` keeps the records whose ``meta.difficulty`` is
    listed (a curriculum). A source without records is an error."""

    def __init__(self, recipe: Recipe, progress: bool = False):
        self.items: dict[str, JsonlRecords] = {}
        self.is_text: dict[str, bool] = {}
        self.checked: set[tuple[str, Any]] = set()  # (conversation source, problem) every record was checked for
        self.answers_only: set[str] = set()  # the sources trained on their answers alone
        self.progress = progress  # bars while large files are indexed and checked
        self._difficulties: dict[str, list[str]] = {}
        for name, spec in recipe.sources.items():
            path = recipe.source_path(name)
            if not path.is_file():
                raise FileNotFoundError(f"data source {name!r}: {path} does not exist")
            self.is_text[name] = is_text_file(path)
            spec = spec if isinstance(spec, dict) else {}
            levels = spec.get("difficulty")
            if levels is not None and self.is_text[name]:
                raise RecipeError(
                    f"data source {name!r}: {path} holds text documents, and difficulty keeps conversation records "
                    "by their meta.difficulty: remove difficulty, or split the file by difficulty yourself"
                )
            keep = None if levels is None else _of_difficulty(name, path, levels)
            if spec.get("answers_only"):
                self.answers_only.add(name)
            self.items[name] = JsonlRecords(
                path, self.is_text[name], keep, _answers_only if name in self.answers_only else None, progress
            )
            log.info("data source %s: %d records from %s", name, len(self.items[name]), path)
            if levels is not None and not self.items[name]:
                raise RecipeError(f"data source {name!r}: no record of {path} has difficulty {levels}")
            if not self.items[name]:  # a stage's passes over its sources divided by their records
                raise RecipeError(f"data source {name!r}: {path} holds no records")

    def difficulties(self, names: list[str]) -> list[str]:
        """The ``meta.difficulty`` of every problem of the sources ``names`` in turn ("any" where one has none), each
        source read once per run however many checks and stages ask."""
        for name in names:
            if name not in self._difficulties:
                self._difficulties[name] = difficulties_of(self.items[name])
        return [d for name in names for d in self._difficulties[name]]

    def encoder(self, processor: KimiVLProcessor):
        def encode(name: str, item):
            if self.is_text[name]:
                return processor.encode_text(item)
            return processor.encode_for_training(item["messages"])

        return encode

    def fewest(self, processor: KimiVLProcessor):
        """``encoder``'s floor: at least how many tokens a record encodes to, read without encoding it
        (``KimiVLProcessor.fewest_tokens``), so that a record over a stage's budget is skipped untokenized."""

        def fewest(name: str, item) -> int:
            return processor.fewest_tokens(item if self.is_text[name] else item["messages"])

        return fewest


def _of_difficulty(name: str, path: Path, levels: list[str]):
    """``JsonlRecords``' ``keep``: records whose ``meta.difficulty`` is one of ``levels``."""

    def keep(lineno: int, record: dict) -> bool:
        level = record.get("meta", {}).get("difficulty")
        if level is None:
            raise RecipeError(f"data source {name!r}: {path}:{lineno} has no meta.difficulty to filter on")
        return level in levels

    return keep


def _answers_only(record: dict) -> dict:
    """``record`` with each assistant turn's answer alone (``parse_thinking``): a text content, or each text part of a
    list content that holds a think marker (the other parts, images among them, as they are)."""

    def answer(content):
        if isinstance(content, str):
            return parse_thinking(content)[1]
        if not isinstance(content, list):  # a malformed turn, which encoding names
            return content
        return [
            {**part, "text": parse_thinking(part["text"])[1]}
            if isinstance(part, dict) and part.get("type") == "text" and _has_think_marker(part.get("text"))
            else part
            for part in content
        ]

    messages = [{**m, "content": answer(m["content"])} if m["role"] == "assistant" else m for m in record["messages"]]
    return {**record, "messages": messages}


def _has_think_marker(text) -> bool:
    return isinstance(text, str) and (THINK_OPEN in text or THINK_CLOSE in text)


TOKENIZER_RECORD = "trained_with.json"  # in out/tokenizer: the train_vocab and sources the BPE was trained on


def recipe_tokenizer(recipe: Recipe, sources: Sources, base_dir: Path | None, save: bool = True) -> KimiTokenizer:
    """The recipe's tokenizer: from ``path``, trained on the sources (``train_vocab``; saved under ``out`` with a
    record of what it was trained on, unless ``save`` is false), or the base checkpoint's. The one saved is used again
    when the recipe asks for the same (``keep_tokenizer``)."""
    spec = recipe.tokenizer
    if "path" in spec:
        return KimiTokenizer.from_pretrained(spec["path"])
    if "train_vocab" in spec:
        out = recipe.out / "tokenizer"
        trained_with = {"train_vocab": spec["train_vocab"], "sources": _bpe_sources(sources)}
        if (out / "tiktoken.model").is_file() and keep_tokenizer(recipe, trained_with, save):
            return KimiTokenizer.from_pretrained(out)
        log.info("training a %d-rank BPE on the texts of %d sources", spec["train_vocab"], len(sources.items))
        read = itertools.count()  # advanced once per text train_bpe takes: next(read) is how many it read
        tok = train_bpe((t for t, _ in zip(_source_texts(sources), read)), vocab_size=spec["train_vocab"])
        log.info("trained the BPE on %d texts", next(read))
        if save:
            tok.save_pretrained(out)
            write_text_atomic(out / TOKENIZER_RECORD, json.dumps(trained_with) + "\n")
        return tok
    if base_dir is None:
        raise ValueError("a preset base needs tokenizer: {path: DIR} or {train_vocab: N}")
    return KimiTokenizer.from_pretrained(base_dir)


def _bpe_sources(sources: Sources) -> dict[str, dict[str, Any]]:
    """What the BPE reads of each source: its number of records, its index's digest, whether answers only."""
    return {
        name: {"records": len(items), "index": items.digest(), "answers_only": name in sources.answers_only}
        for name, items in sorted(sources.items.items())
    }


def keep_tokenizer(recipe: Recipe, trained_with: dict[str, Any], save: bool = True) -> bool:
    """Whether the BPE saved under ``out/tokenizer`` is the one the recipe asks for (``trained_with``: its
    ``train_vocab`` and sources, as its record says). When not, and nothing was trained with it yet, it is trained
    again (False); once stages were, a ``RecipeError`` names the change: another ``train_vocab``, or sources with
    other records (another number, or other sources, or ``answers_only`` toggled). Records changed in place, as many
    as before (a bad record fixed), keep it with a warning; a tokenizer saved with no record (by a kimivl before it
    kept one) is kept and recorded (``save``) when it holds ``train_vocab`` ranks, and refused naming its size when
    not."""
    out = recipe.out / "tokenizer"
    path = out / TOKENIZER_RECORD
    then = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if then == trained_with:
        return True
    if not begun(recipe.out):
        log.info("%s is not the BPE the recipe asks for, and nothing was trained with it yet: training it again", out)
        return False
    if then is None:
        ranks = len(load_ranks(out / MODEL_FILE))
        if ranks != trained_with["train_vocab"]:  # train_bpe learns train_vocab ranks exactly (specials come after)
            raise RecipeError(
                f"{out} holds a BPE of {ranks} ranks (no record of what it was trained on: a run begun before kimivl "
                f"kept one), not the {trained_with['train_vocab']} of the recipe's train_vocab: the run's stages were "
                f"trained with that tokenizer (their embeddings are its tokens), so resume with train_vocab {ranks}, "
                f"or give another --out to train with {trained_with['train_vocab']}"
            )
        log.warning(
            "%s holds no record of what it was trained on (a run begun before kimivl kept one): going on with it, "
            "which must be the BPE of train_vocab %d on the recipe's sources",
            out,
            trained_with["train_vocab"],
        )
        if save:
            write_text_atomic(path, json.dumps(trained_with) + "\n")
        return True
    trained = "the run's stages were trained with that tokenizer (their embeddings are its tokens)"
    if then["train_vocab"] != trained_with["train_vocab"]:
        raise RecipeError(
            f"{out} was trained with train_vocab {then['train_vocab']}, not {trained_with['train_vocab']}: {trained}, "
            f"so resume with train_vocab {then['train_vocab']}, or give another --out to train with "
            f"{trained_with['train_vocab']}"
        )
    was, now = then["sources"], trained_with["sources"]
    changed = [
        f"{name}: {was[name]['records'] if name in was else 'no'} records then, "
        f"{now[name]['records'] if name in now else 'no'} now"
        for name in sorted(was.keys() | now.keys())
        if name not in was or name not in now or was[name]["records"] != now[name]["records"]
    ] + [
        f"{name}: answers_only {was[name]['answers_only']} then, {now[name]['answers_only']} now"
        for name in sorted(was.keys() & now.keys())
        if was[name]["answers_only"] != now[name]["answers_only"]
    ]
    if changed:
        raise RecipeError(
            f"{out} was trained on other records than the recipe's sources hold now ({'; '.join(changed)}): "
            f"{trained}, so resume with the sources it was trained on, keep it under this recipe by naming it "
            f"(tokenizer: {{path: {out}}}), or give another --out to train a new one"
        )
    log.warning(
        "%s was trained on data sources %s before they changed (as many records, other bytes): going on with it, "
        "which is right for a bad record fixed in place",
        out,
        ", ".join(name for name in sorted(now) if now[name]["index"] != was[name]["index"]),
    )
    return True


def _source_texts(sources: Sources) -> Iterator[str]:
    """Stream every text of the sources once: the text sources' documents, then each conversation record's text. A
    record that another source gives too (sources over one file: named twice, or with other ``difficulty`` levels or
    ``answers_only``) is given once, as a source without ``answers_only`` reads it where one does: naming a file
    twice weighs nothing twice."""
    items, is_text = sources.items, sources.is_text
    earlier: dict[Path, list[JsonlRecords]] = {}  # resolved file -> the sources over it given so far
    for name in sorted(items, key=lambda n: (not is_text[n], items[n].transform is not None)):
        records = items[name]
        before = earlier.setdefault(records.path.resolve(), [])
        for i in range(len(records)):
            if not any(r.holds(records.offset(i)) for r in before):
                yield records[i] if is_text[name] else _record_text(records[i])
        before.append(records)


def _record_text(record: dict) -> str:
    return " ".join(content_text(m["content"]) for m in record["messages"])


def base_checkpoint(recipe: Recipe) -> Path | None:
    """The directory of the recipe's base checkpoint (None for a preset), which must hold a ``config.json``."""
    if "checkpoint" not in recipe.base:
        return None
    path = Path(recipe.base["checkpoint"])
    if not (path / "config.json").is_file():
        raise RecipeError(
            f"base checkpoint {path} has no config.json: give the directory of an official-format "
            "checkpoint (config.json, safetensors, tokenizer files)"
        )
    return path


def base_config(recipe: Recipe, tokenizer: KimiTokenizer) -> KimiVLConfig:
    """The base checkpoint's configuration, or the preset's sized to ``tokenizer``."""
    if "checkpoint" in recipe.base:
        return KimiVLConfig.from_pretrained(recipe.base["checkpoint"])
    config = KimiVLConfig.from_preset(recipe.base["preset"])
    n = tokenizer.n_ranks
    text = dataclasses.replace(
        config.text_config,
        vocab_size=n + 256,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=[tokenizer.eos_id, tokenizer.im_end_id],
        pad_token_id=tokenizer.pad_id,
    )
    return dataclasses.replace(
        config, text_config=text, media_placeholder_token_id=tokenizer.media_pad_id, pad_token_id=tokenizer.pad_id
    )


def _base_model(recipe: Recipe, tokenizer: KimiTokenizer) -> KimiVL:
    if "checkpoint" in recipe.base:
        return KimiVL.from_pretrained(recipe.base["checkpoint"], dtype=torch.float32, device=recipe.device)
    model = _meta_model(base_config(recipe, tokenizer)).to_empty(device="cpu")
    model.init_weights(recipe.seed)  # on the CPU, so every device starts from the same weights
    return model.to(recipe.device)


def _initial_checkpoint(recipe: Recipe, processor: KimiVLProcessor, world: World) -> Path:
    """A sharded run from a preset: its fresh weights (those of one process, ``recipe.seed``) written once to
    ``out/initial``, each rank drawing only the rows it holds; the first stage reads its shards from there."""
    path = recipe.out / "initial"
    if not (path / "config.json").is_file():  # (rank 0 writes nothing before every rank is in _finish_stage)
        model = _meta_model(base_config(recipe, processor.tokenizer))
        parallelize(model, world).to_empty(device=world.device)
        model.init_weights(recipe.seed, shard=local_rows)
        log.info("initial weights of preset %s drawn shard by shard (seed %d)", recipe.base["preset"], recipe.seed)
        _finish_stage(model, processor, path, world)
    return path


def global_schedule(recipe: Recipe) -> tuple[WSD, dict[str, int]]:
    """The recipe-wide warm-up/stable/decay curve over 'continue' stages, and each such stage's start step."""
    offsets, step, decay_start, decay_steps = {}, 0, None, 0
    for s in recipe.stages:
        if s.schedule != "continue":
            continue
        offsets[s.name] = step
        if s.name in recipe.schedule.get("decay_stages", []):
            decay_start = step if decay_start is None else decay_start
            decay_steps += s.steps
        step += s.steps
    warmup = int(recipe.schedule.get("warmup", 0))
    decay_start = step if decay_start is None else decay_start
    return WSD(  # the recipe has checked that the decay starts after the warm-up
        warmup, decay_start - warmup, decay_steps, min_ratio=float(recipe.schedule.get("min_ratio", 0.1))
    ), offsets


def stage_scheduler(recipe: Recipe, stage: StageSettings, optimizer: torch.optim.Optimizer):
    """The stage's LR scheduler: its place on the recipe-wide curve (``schedule: continue``), or its own warm-up +
    cosine."""
    if stage.schedule == "continue":
        schedule, offsets = global_schedule(recipe)
        return scheduler_at(optimizer, WSDFrom(**dataclasses.asdict(schedule), offset=offsets[stage.name]))
    return scheduler_at(optimizer, WarmupCosine(stage.warmup, stage.steps, min_ratio=0.1))


def compute_line(recipe: Recipe, bf16: bool) -> str:
    """What the run computes in (under bf16 autocast or not), as it logs it (the weights train in float32 either
    way)."""
    autocast = "bf16 autocast" if bf16 else "float32, no bf16 autocast"
    return f"training on {recipe.device} in {autocast}"


def export_line(recipe: Recipe, path: Path) -> str:
    """Where the run exports, as it logs it at its start and ``--plan`` prints it."""
    return f"the last stage's model is exported in {recipe.export.get('dtype', 'bfloat16')} to {path.resolve()}"


def memory_line(
    stage: StageSettings, trainee: torch.nn.Module, model: KimiVL, layout: tuple[int, int] | None, bf16: bool
) -> str:
    """What a stage holds, as the run logs it and ``--plan`` prints it: in one process, or per rank of a
    ``layout`` (dp_shard, ep), where the weights (and a vit stage's tower) are sharded. A sharded layout is planned
    on the whole model, before it is sharded."""
    plan = memory_plan(trainee)
    if layout is None:
        return f"stage {stage.name} {plan}"
    if not isinstance(trainee, KimiVL):
        return f"stage {stage.name} {plan}, before FSDP shards it over {layout[0]} ranks"
    dtype = torch.bfloat16 if bf16 else torch.float32
    per_rank = rank_memory_plan(model, *layout, getattr(stage, "budget", 4096), dtype, stage.recompute)
    return f"stage {stage.name} {plan.counts}; {per_rank}"


def run_stage(
    recipe: Recipe,
    stage: StageSettings,
    model: KimiVL,
    processor: KimiVLProcessor,
    sources: Sources,
    progress: bool = True,
    world: World | None = None,
    source: Path | None = None,
) -> dict[str, float]:
    """Train ``model`` through one stage (resuming it if interrupted). With a sharded ``world`` what the stage trains
    is sharded first (``kimivl.distributed.parallelize``), and ``model`` stays sharded afterwards. A ``model`` still
    on the meta device holds the weights of the checkpoint ``source``: in one process it is read whole first; on
    sharded ranks a joint or rl stage reads each rank's shards of it only, and a vit stage the vision tower alone."""
    world = world or World()
    if stage.rope_theta is not None:
        model.config.text_config.rope_theta = float(stage.rope_theta)
    if _unloaded(model) and not world.active:
        model.to_empty(device=recipe.device)
        load_checkpoint(model, source)
    elif _unloaded(model) and stage.kind == "vit":  # the tower alone, whole on each rank; the rest stays unloaded
        log.info("stage %s: every rank reads only the vision tower of %s", stage.name, source)
        model.vision_tower.to_empty(device=world.device)
        load_sharded_checkpoint(model.vision_tower, source, world, prefix="vision_tower.")
    prepared = prepare(stage, StageContext(recipe, sources, processor, world), model)
    log.info("%s", prepared.data_line)
    bf16 = use_bf16(recipe.device, recipe.bf16)
    sharded_line = memory_line(stage, prepared.trainee, model, (world.dp_shard, world.ep), bf16) if world.active else ""
    if prepared.trainee is model and _unloaded(model):
        log.info("stage %s: every rank reads only its shards of %s", stage.name, source)
        parallelize(model, world, recompute=stage.recompute)
        model.to_empty(device=world.device)
        load_sharded_checkpoint(model, source, world)
        prepared.setup()
    else:
        prepared.setup()
        if world.active:
            parallelize(prepared.trainee, world, recompute=stage.recompute)
        elif stage.recompute:
            apply_recompute(prepared.trainee)
    optimizer = build_optimizer(
        prepared.trainee,
        lr=stage.lr,
        weight_decay=stage.weight_decay,
        ns_dtype=stage.ns_dtype,
        lr_scale=getattr(stage, "lr_scale", None),
    )
    scheduler = stage_scheduler(recipe, stage, optimizer)
    # under bf16 autocast, frozen weights of a bfloat16 checkpoint train as they would in float32, in half the memory
    hold = prepared.hold_frozen_bf16 and not world.active and use_bf16(model.device, recipe.bf16)
    held = hold_frozen_in_bf16(model) if hold else []
    try:
        log.info("%s", sharded_line or memory_line(stage, prepared.trainee, model, None, bf16))
        return prepared.run(optimizer, scheduler, progress)
    finally:  # the model leaves the stage as it came, even when the stage stops with an error
        optimizer.zero_grad(set_to_none=True)  # gradients and optimiser state go before held weights grow back
        optimizer.state.clear()
        restore_float32(held)
        model.requires_grad_(True)
        remove_recompute(prepared.trainee)


def _evaluated(out: Path, stage: str) -> bool:
    """Whether ``stage`` (or ``base``) was evaluated in full: a kill may cut ``evaluate_stage`` short, and then it
    runs again (its position-loss file comes last)."""
    return (out / "eval" / f"{stage}.position_loss.json").is_file()


def evaluate_stage(
    recipe: Recipe, stage: str, model: KimiVL, processor: KimiVLProcessor, progress: bool = True
) -> dict[str, float]:
    """Held-out accuracy per task after ``stage``, written to ``out/eval/<stage>.json``; beside it the predictions,
    ``<stage>.lengths.json``, the mean answer length in tokens per task (re-encoded text), and
    ``<stage>.position_loss.json``, the loss by position range on each text-only file of the split."""
    spec = recipe.eval
    split = recipe.out / spec["split"]
    records = heldout_records(split, spec.get("limit"))
    model.eval()
    losses = {
        p.stem: position_loss(model, processor, list(itertools.islice(iter_texts(p), spec.get("limit"))))
        for p in sorted(split.glob("*.jsonl"))
        if is_text_file(p)
    }
    accuracy, rows = evaluate(
        model, processor, records, max_new_tokens=spec.get("max_new_tokens", 160), progress=progress
    )
    out = recipe.out / "eval"
    out.mkdir(exist_ok=True)
    write_text_atomic(out / f"{stage}.json", json.dumps(accuracy, indent=1) + "\n")
    write_text_atomic(out / f"{stage}.predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    tokens = {
        task: statistics.mean(
            len(processor.tokenizer.encode(r["prediction"])) for r in rows if task in ("all", r["task"])
        )
        for task in accuracy
    }
    write_text_atomic(out / f"{stage}.lengths.json", json.dumps(tokens, indent=1) + "\n")
    write_text_atomic(out / f"{stage}.position_loss.json", json.dumps(losses, indent=1) + "\n")
    log.info("held-out accuracy after %s: %s", stage, accuracy)
    for name, loss in losses.items():
        log.info(
            "held-out %s loss by position after %s: %s", name, stage, ", ".join(f"{k} {v:.3f}" for k, v in loss.items())
        )
    return accuracy


def stage_outputs(out: Path, name: str) -> list[Path]:
    """What the stage ``name`` wrote under the run directory ``out`` by its name: its folder, its TensorBoard log
    (``MetricsLog``) and its evaluation (``evaluate_stage``), those that exist. (Its rows of ``metrics.jsonl`` name it
    too.)"""
    evaluation = (".json", ".predictions.jsonl", ".lengths.json", ".position_loss.json")
    paths = [out / name, out / "tensorboard" / name, *(out / "eval" / f"{name}{end}" for end in evaluation)]
    return [path for path in paths if path.exists()]


def renamed_stage_advice(out: Path, names: list[Any]) -> str:
    """What to add to the refusal of the stage names ``names`` where ``out`` holds the work of a stage so named (a
    kimivl that took the name trained it): to rename the stage and move its work along, not to rename it alone."""
    held = [
        name
        for name in names
        if isinstance(name, str)
        and Path(name).name == name
        and name not in (".", "..")
        and ((out / name / "checkpoints").is_dir() or (out / name / FINAL).is_dir())
    ]
    if not held:
        return ""
    found = "; ".join(", ".join(os.path.relpath(p, out) for p in stage_outputs(out, name)) for name in held)
    first = held[0]
    evaluation = " (where eval.after names it; else it is the base model's)" if first.casefold() == "base" else ""
    whose = "stages of those names" if len(held) > 1 else "a stage of that name"
    return (
        f". {out} holds the work of {whose}, from a kimivl that took it ({found}): rename the stage in the recipe (and "
        f"where eval.after and schedule.decay_stages name it) and move what it wrote under its name to the new one "
        f"({out / first} to {out}/NEW, tensorboard/{first} and eval/{first}.*{evaluation} likewise), and the stage "
        "goes on, or stays finished, as it was; renamed in the recipe alone, it would train again from scratch"
    )


ELSEWHERE = "export elsewhere (export.path, or --out, which moves a relative export path under it)"


def check_export(recipe: Recipe, elsewhere: str = ELSEWHERE) -> Path | None:
    """The export directory, refused (before anything runs, and again before the export, with the advice
    ``elsewhere``) when it cannot be written, or when it holds anything but this run's export (the export
    replaces the directory as a whole): another run's model, a model with no record of its run, other files, or the
    run's own ``out``."""
    if not recipe.export:
        return None
    path = Path(recipe.export["path"])
    if path.exists() and not path.is_dir():
        raise RecipeError(f"export path {path} exists and is not a directory: {elsewhere} or remove it")
    if recipe.out.resolve().is_relative_to(path.resolve()):
        raise RecipeError(
            f"export path {path} holds the run's out directory {recipe.out}, and an export replaces its directory "
            f"as a whole: {elsewhere}"
        )
    if why := unwritable(path):
        raise RecipeError(f"export path {path} cannot be written: {why}; {elsewhere}")
    held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if not held:
        return path
    try:
        wrote = json.loads((path / EXPORT_RECORD).read_text(encoding="utf-8"))["out"]
    except (OSError, ValueError, KeyError, TypeError):
        wrote = None
    if wrote is not None and (path / wrote).resolve() == recipe.out.resolve():
        return path
    if (path / "config.json").is_file():
        who = f"the run in {(path / wrote).resolve()}" if wrote else "no recorded run"
        raise RecipeError(
            f"export path {path} holds a model written by {who}, not by this run ({recipe.out}); "
            f"{elsewhere} or remove it"
        )
    raise RecipeError(
        f"export path {path} holds {', '.join(held[:5])}{', ...' if len(held) > 5 else ''} and no export of this "
        f"run, and an export replaces its directory as a whole: {elsewhere}, or into a new or empty directory"
    )


def _export(recipe: Recipe, final: Path, processor: KimiVLProcessor, path: Path) -> None:
    """The last stage's checkpoint in the export dtype, converted file by file (no process holds the whole model),
    with the tokenizer files, the recommended sampling (``export.generation``) and the run's record, written under a
    temporary name beside ``path`` (one left by a killed export is written again) and renamed into place once whole:
    an export cut short by a kill or a full disk leaves the previous export (or none), never new weights beside an old
    config, and ``--resume`` exports again. Runs sharing the export path take turns: the run holds its export lock
    from before the temporary directory to the rename, and checks again under it, once trained, that the path holds
    no other run's export (one written while this run trained); either refusal is an ``ExportRefused`` saying where
    the trained model is kept."""
    path = path.resolve()  # a link to a folder elsewhere: the export is written and renamed there
    kept = (
        f"this run's trained model is kept in {final}, not exported (resuming the run keeps its finished stages and "
        "exports it): export elsewhere (export.path)"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with export_lock(path, recipe.out, kept):
        try:
            check_export(recipe, kept)
        except RecipeError as e:
            raise ExportRefused(str(e)) from None
        tmp = temporary_dir(path)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed export (the lock rules out one under way)
        try:
            dtype = recipe.export.get("dtype", "bfloat16")
            log.info("exporting %s (%.1f GB) to %s in %s", final, weights_size(final)[1] / 1e9, path, dtype)
            convert_checkpoint(final, tmp, getattr(torch, dtype))
            processor.save_pretrained(tmp)
            if recipe.export.get("generation"):
                write_generation_config(tmp, recipe.export["generation"])
            record = {"out": os.path.relpath(recipe.out.resolve(), path)}
            write_text_atomic(tmp / EXPORT_RECORD, json.dumps(record) + "\n")
            publish_dir(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk gets its space back
            raise
    log.info("exported %s", path)


def run_recipe(recipe: Recipe, progress: bool = True, world: World | None = None) -> KimiVL:
    """Run every stage not yet finished; export the final model when the recipe asks for it. One run at a time holds
    ``recipe.out``. Under torchrun every rank calls this with its ``world``: rank 0 alone builds data, evaluates,
    writes checkpoints in the official format, exports, logs and plots; the others wait for it where they must.
    Returns the last stage's model: whole in one process, unloaded (meta device) on the ranks of a sharded run."""
    world = world or World()
    base_dir = base_checkpoint(recipe)
    export = check_export(recipe)
    if export is not None and world.main:
        log.info("%s", export_line(recipe, export))
    refused = None
    with run_lock(recipe.out, world):  # taken by rank 0; a refusal stops every rank
        model, source, processor = _run_stages(recipe, base_dir, progress and world.main, world)
        if world.main and export is not None:
            try:
                _export(recipe, source, processor, export)
            except ExportRefused as e:
                refused = str(e)
    refused = world.wait_for_main(refused)  # the export may outlast the collective timeout; every rank stops alike
    if refused is not None:
        raise ExportRefused(refused)
    return model.eval()


SEED_RECORD = "seed.json"  # in out: the seed the run's stages were trained with


def finished(out: Path, stage: str) -> bool:
    """Whether the stage ``stage`` of the run directory ``out`` has finished: its final model (published whole, by a
    rename) holds its config."""
    return (out / stage / FINAL / "config.json").is_file()


def begun(out: Path) -> bool:
    """Whether anything was trained in the run directory ``out``: a stage's checkpoint or final model, or a sharded
    run's initial weights (drawn from its seed, sized to its tokenizer)."""
    return (
        any(out.glob("*/checkpoints/*")) or any(out.glob(f"*/{FINAL}")) or (out / "initial" / "config.json").is_file()
    )


def keep_seed(recipe: Recipe, world: World) -> None:
    """Refuse to go on with a run under another seed than the one its stages began with (each stage's data stream,
    and a preset's initial weights, follow it: resuming under a new seed would silently change the rest of the
    stream). Rank 0 records the seed; a run with nothing trained yet may still change it."""
    path = recipe.out / SEED_RECORD
    started = begun(recipe.out)
    if started and path.is_file() and (then := json.loads(path.read_text(encoding="utf-8"))["seed"]) != recipe.seed:
        raise RecipeError(
            f"{recipe.out} was trained with seed {then}, not {recipe.seed}: the rest of the run follows its seed, "
            f"so resume with --seed {then}, or give another --out to train with seed {recipe.seed}"
        )
    if started and not path.is_file():
        log.warning(
            "%s holds no record of its seed (a run begun before kimivl kept one): going on with seed %d, which must be "
            "the seed it was begun with",
            recipe.out,
            recipe.seed,
        )
    if world.main:
        write_text_atomic(path, json.dumps({"seed": recipe.seed}) + "\n")


def recipe_processor(recipe: Recipe, sources: Sources, base_dir: Path | None, save: bool = True) -> KimiVLProcessor:
    """The run's processor: the recipe's tokenizer (``recipe_tokenizer``; ``save`` as there) and the base checkpoint's
    image processor (its ``preprocessor_config.json``, which the exports keep), or a preset's default one. A tokenizer
    from elsewhere must write the base model's image placeholder."""
    tokenizer = recipe_tokenizer(recipe, sources, base_dir, save=save)
    if base_dir is None:
        return KimiVLProcessor(tokenizer)
    config = KimiVLConfig.from_pretrained(base_dir)
    where = recipe.tokenizer.get("path", recipe.out / "tokenizer" if recipe.tokenizer else base_dir)
    check_media_pad(config, tokenizer, base_dir, where)
    return KimiVLProcessor(tokenizer, model_image_processor(base_dir, config))


def _run_stages(
    recipe: Recipe, base_dir: Path | None, progress: bool, world: World
) -> tuple[KimiVL, Path | None, KimiVLProcessor]:
    """The stages in order; returns the last model and the checkpoint it came from (a sharded run's model is left
    unloaded, on the meta device, between stages: each stage reads its shards from the checkpoint before it)."""
    if world.active:
        check_same_run(recipe, world)
        check_layout(recipe, world.size, world.ep)
    check_trained_in_order(recipe)
    recipe.out.mkdir(parents=True, exist_ok=True)
    with main_first(world, recipe.out / ".prepare.lock"):  # the others then reuse the world and tokenizer built
        if recipe.world is not None:
            ensure_world(recipe.out / "world", progress=progress, **recipe.world)
        sources = Sources(recipe, progress)
        if recipe.eval:  # a held-out split that cannot be scored fails now, not after the first stage
            heldout_records(recipe.out / recipe.eval["split"], recipe.eval.get("limit"))
        processor = recipe_processor(recipe, sources, base_dir)
        keep_seed(recipe, world)
    context = base_config(recipe, processor.tokenizer).text_config.max_position_embeddings
    ctx = StageContext(recipe, sources, processor, world, context)
    for stage in recipe.stages:  # every stage's records before the first trains (each stage checks its own again)
        if not finished(recipe.out, stage.name):
            stage.check_data(ctx)
    source = base_dir
    if world.active:  # every stage reads its shards from a checkpoint: a preset's fresh weights are written first
        source = source or _initial_checkpoint(recipe, processor, world)
        model = _unloaded_model(source)
    else:
        model = _base_model(recipe, processor.tokenizer)
    log.info("%s", compute_line(recipe, use_bf16(recipe.device, recipe.bf16)))
    for stage in recipe.stages:
        stage.check_model(model)
    with main_first(world, recipe.out / ".eval.lock") as first:
        if first and (recipe.eval or {}).get("base") and not _evaluated(recipe.out, "base"):
            evaluate_stage(recipe, "base", _whole(model, source, recipe.device), processor, progress)
    for stage in recipe.stages:
        final = recipe.out / stage.name / FINAL
        done = finished(recipe.out, stage.name)
        world.barrier()  # every rank has looked before rank 0 may write it
        if done:
            log.info("stage %s already finished; loading %s", stage.name, final)
            model = _unloaded_model(final) if world.active else _whole(_unloaded_model(final), final, recipe.device)
        else:
            log.info("stage %s: %d steps", stage.name, stage.steps)
            run_stage(recipe, stage, model, processor, sources, progress, world, source)
            model = _finish_stage(model, processor, final, world, source)
        source = final
        evaluated = done and _evaluated(recipe.out, stage.name)
        with main_first(world, recipe.out / ".eval.lock") as first:
            if first and stage.name in (recipe.eval or {}).get("after", []) and not evaluated:
                evaluate_stage(recipe, stage.name, _whole(model, source, recipe.device), processor, progress)
    metrics = recipe.out / "metrics.jsonl"
    if metrics.is_file() and world.main:
        plot_curves(metrics, recipe.out / "curves.png", keys=("loss", "val_loss"))
    return model, source, processor


def check_trained_in_order(recipe: Recipe) -> None:
    """Refuse a run where a stage still to train comes before one that trained (finished, or begun: its checkpoints):
    the later stage was trained from something else (an earlier version of the stage, or a stage since renamed), and
    the run would train the earlier stage anew and keep, or resume, the later one as it is: its stages no longer one
    chain."""
    finals = [finished(recipe.out, stage.name) for stage in recipe.stages]
    if all(finals):
        return
    first = finals.index(False)
    later = [
        stage.name
        for stage, done in zip(recipe.stages[first + 1 :], finals[first + 1 :])
        if done or (recipe.out / stage.name / "checkpoints" / LATEST).exists()
    ]
    if later:
        name, has = recipe.stages[first].name, "have" if len(later) > 1 else "has"
        raise RecipeError(
            f"stage {name} is still to train, and {', '.join(later)} after it {has} trained already: trained from "
            f"something else than this {name} (an earlier one, or a stage since renamed), they would be kept, or "
            f"resumed, as they are while {name} trains anew. Remove {', '.join(str(recipe.out / n) for n in later)} "
            f"to train them again after the new {name}, or restore {recipe.out / name} (a stage renamed: move its "
            "folder there)"
        )


def _finish_stage(
    model: KimiVL, processor: KimiVLProcessor, final: Path, world: World, source: Path | None = None
) -> KimiVL:
    """Write the stage's official-format checkpoint; a sharded model is gathered file by file (rank 0 writes; what
    it left unloaded comes from ``source``), and every rank goes on with the model unloaded: the next stage reads
    its shards from that checkpoint."""
    tmp = temporary_dir(final)
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("writing the stage's model to %s", final)  # minutes at scale: the step bar is done by then
    world.barrier()
    if world.active:
        save_gathered(model, tmp, world, source=source)
    else:
        model.save_pretrained(tmp)
    if world.main:
        processor.save_pretrained(tmp)
        publish_dir(final)
    world.wait_for_main()  # rank 0 also copies what no rank holds (after a vit stage, the language model)
    return _unloaded_model(final) if world.active else model


def _meta_model(config: KimiVLConfig) -> KimiVL:
    with torch.device("meta"):
        return KimiVL(config)


def _unloaded_model(path: Path) -> KimiVL:
    """The model of the checkpoint at ``path`` on the meta device, no weight read yet; its shapes are compared with
    the weights' headers first (``check_checkpoint``), so a config of absurd sizes is refused before any rank
    allocates it."""
    model = _meta_model(KimiVLConfig.from_pretrained(path))
    check_checkpoint(model, path)
    return model


def _unloaded(model: KimiVL) -> bool:
    return model.device.type == "meta"


def _whole(model: KimiVL, source: Path | None, device: str) -> KimiVL:
    """``model`` itself, or, when it is unloaded, the whole model read from ``source`` (float32)."""
    return KimiVL.from_pretrained(source, dtype=torch.float32, device=device) if _unloaded(model) else model
