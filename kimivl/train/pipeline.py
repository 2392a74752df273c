"""Run a recipe: prepare data, tokenizer and base model, then each stage in order, each starting from the one
before. A stage's result is an official-format checkpoint (``out/<stage>/final``) that any later stage, or any other
recipe, can start from; a re-run skips finished stages and resumes an interrupted one."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import random
import shutil
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from kimivl.config import KimiVLConfig
from kimivl.data.formats import content_text, is_text_file, iter_texts
from kimivl.data.indexed import Concat, JsonlRecords
from kimivl.data.mixture import Mixture
from kimivl.data.world import ensure_world
from kimivl.eval.position_loss import position_loss
from kimivl.eval.synthetic import evaluate, heldout_records
from kimivl.files import write_text_atomic
from kimivl.model.kimivl import KimiVL
from kimivl.precision import use_bf16
from kimivl.processing.chat_template import parse_thinking
from kimivl.processing.processor import KimiVLProcessor
from kimivl.processing.tokenizer import KimiTokenizer, train_bpe
from kimivl.train.calibrate import standardize_image_features
from kimivl.train.loop import LoopConfig, train_loop
from kimivl.train.metrics import plot_curves
from kimivl.train.optim import build_optimizer
from kimivl.train.recipe import Recipe, RecipeError, Stage
from kimivl.train.schedule import WSD, WarmupCosine, scheduler_at
from kimivl.train.trainable import hold_frozen_in_bf16, memory_plan, restore_float32, set_trainable
from kimivl.train.validation import heldout_loss, heldout_rows
from kimivl.train.vit import ViTPretrainer, caption_batch, vit_loss

log = logging.getLogger(__name__)
FINAL = "final"
CALIBRATION_SAMPLES = 32  # per image source, for standardize_images


class Sources:
    """The recipe's data sources, validated once and read on demand (``JsonlRecords``): conversation records or plain
    texts, by name. A source given as ``{path: FILE, answers_only: true}`` drops the ``◁think▷…◁/think▷`` part of
    assistant turns; ``{path: FILE, difficulty: [easy, ...]}`` keeps the records whose ``meta.difficulty`` is
    listed (a curriculum)."""

    def __init__(self, recipe: Recipe, progress: bool = False):
        self.items: dict[str, JsonlRecords] = {}
        self.is_text: dict[str, bool] = {}
        for name, spec in recipe.sources.items():
            path = recipe.source_path(name)
            if not path.is_file():
                raise FileNotFoundError(f"data source {name!r}: {path} does not exist")
            self.is_text[name] = is_text_file(path)
            spec = spec if isinstance(spec, dict) else {}
            levels = spec.get("difficulty")
            keep = None if levels is None else _of_difficulty(name, path, levels)
            self.items[name] = JsonlRecords(path, self.is_text[name], keep,
                                            _answers_only if spec.get("answers_only") else None, progress)
            log.info("data source %s: %d records from %s", name, len(self.items[name]), path)
            if levels is not None and not self.items[name]:
                raise RecipeError(f"data source {name!r}: no record of {path} has difficulty {levels}")

    def encoder(self, processor: KimiVLProcessor):
        def encode(name: str, item):
            if self.is_text[name]:
                return processor.encode_text(item)
            return processor.encode_for_training(item["messages"])
        return encode


def _of_difficulty(name: str, path: Path, levels: list[str]):
    """``JsonlRecords``' ``keep``: records whose ``meta.difficulty`` is one of ``levels``."""
    def keep(lineno: int, record) -> bool:
        level = record.get("meta", {}).get("difficulty") if isinstance(record, dict) else None
        if level is None:
            raise RecipeError(f"data source {name!r}: {path}:{lineno} has no meta.difficulty to filter on")
        return level in levels
    return keep


def _answers_only(record: dict) -> dict:
    messages = [{**m, "content": parse_thinking(m["content"])[1]} if m["role"] == "assistant"
                and isinstance(m["content"], str) else m for m in record["messages"]]
    return {**record, "messages": messages}


def recipe_tokenizer(recipe: Recipe, sources: Sources, base_dir: Path | None, save: bool = True) -> KimiTokenizer:
    """The recipe's tokenizer: from ``path``, trained on the sources (``train_vocab``; saved under ``out`` unless
    ``save`` is false), or the base checkpoint's."""
    spec = recipe.tokenizer
    if "path" in spec:
        return KimiTokenizer.from_pretrained(spec["path"])
    if "train_vocab" in spec:
        out = recipe.out / "tokenizer"
        if (out / "tiktoken.model").is_file():
            return KimiTokenizer.from_pretrained(out)
        texts = [t for n, items in sources.items.items() if sources.is_text[n] for t in items]
        texts += [_record_text(r) for n, items in sources.items.items() if not sources.is_text[n] for r in items]
        log.info("training a %d-rank BPE on %d texts", spec["train_vocab"], len(texts))
        tok = train_bpe(texts, vocab_size=spec["train_vocab"])
        if save:
            tok.save_pretrained(out)
        return tok
    if base_dir is None:
        raise ValueError("a preset base needs tokenizer: {path: DIR} or {train_vocab: N}")
    return KimiTokenizer.from_pretrained(base_dir)


def _record_text(record: dict) -> str:
    return " ".join(content_text(m["content"]) for m in record["messages"])


def base_checkpoint(recipe: Recipe) -> Path | None:
    """The directory of the recipe's base checkpoint (None for a preset), which must hold a ``config.json``."""
    if "checkpoint" not in recipe.base:
        return None
    path = Path(recipe.base["checkpoint"])
    if not (path / "config.json").is_file():
        raise RecipeError(f"base checkpoint {path} has no config.json: give the directory of an official-format "
                          "checkpoint (config.json, safetensors, tokenizer files)")
    return path


def base_config(recipe: Recipe, tokenizer: KimiTokenizer) -> KimiVLConfig:
    """The base checkpoint's configuration, or the preset's sized to ``tokenizer``."""
    if "checkpoint" in recipe.base:
        return KimiVLConfig.from_pretrained(recipe.base["checkpoint"])
    config = KimiVLConfig.from_preset(recipe.base["preset"])
    n = tokenizer.n_ranks
    text = dataclasses.replace(config.text_config, vocab_size=n + 256, bos_token_id=tokenizer.bos_id,
                               eos_token_id=[tokenizer.eos_id, tokenizer.im_end_id], pad_token_id=tokenizer.pad_id)
    return dataclasses.replace(config, text_config=text, media_placeholder_token_id=tokenizer.media_pad_id,
                               pad_token_id=tokenizer.pad_id)


def _base_model(recipe: Recipe, tokenizer: KimiTokenizer) -> KimiVL:
    if "checkpoint" in recipe.base:
        return KimiVL.from_pretrained(recipe.base["checkpoint"], dtype=torch.float32, device=recipe.device)
    torch.manual_seed(recipe.seed)
    # initialised on the CPU, so every device starts from the same weights
    return KimiVL(base_config(recipe, tokenizer)).to(recipe.device)


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
    return WSD(warmup, max(0, decay_start - warmup), decay_steps,
               min_ratio=float(recipe.schedule.get("min_ratio", 0.1))), offsets


class CaptionStream:
    """ViT-stage batches: ``images_per_batch`` (image, caption) pairs, sample i a pure function of (seed, i)."""

    def __init__(self, records: Sequence[dict], processor: KimiVLProcessor, per_batch: int, seed: int,
                 max_len: int = 64):
        self.records, self.processor, self.per_batch, self.seed, self.max_len = records, processor, per_batch, seed, max_len

    def pair(self, i: int):
        rec = self.records[random.Random(self.seed * 1_000_003 + i).randrange(len(self.records))]
        user, answer = rec["messages"][0]["content"], rec["messages"][-1]["content"]
        image = next(p["image"] for p in user if isinstance(p, dict) and p.get("type") == "image")
        question = content_text(user)
        return self.processor.image_processor(image), self.processor.tokenizer.encode(f"{question} {answer}")

    def batches(self, position: int) -> Iterator:
        tok = self.processor.tokenizer
        while True:
            pairs = [self.pair(i) for i in range(position, position + self.per_batch)]
            position += self.per_batch
            yield caption_batch([p[0] for p in pairs], [p[1] for p in pairs], tok.bos_id, tok.eos_id, tok.pad_id,
                                self.max_len), position


def freeze_stage(model: KimiVL, stage: Stage) -> None:
    """``set_trainable`` with the stage's ``train`` and ``freeze``; a mistake is a ``RecipeError`` naming it."""
    try:
        set_trainable(model, stage.train, stage.freeze)
    except ValueError as e:
        raise RecipeError(f"stage {stage.name!r}: {e}") from None


def stage_amount(recipe: Recipe, stage: Stage, sources: Sources) -> str:
    """What a vit or rl stage's steps hold: captioned images and passes over their sources, or RL problems."""
    if stage.kind == "vit":
        images = stage.steps * stage.accum * stage.images_per_batch
        records = sum(len(sources.items[name]) for name in stage.sources)
        return (f"stage {stage.name}: {images} captioned images, {images / records:.2f} passes over "
                f"{', '.join(stage.sources)}")
    cfg = rl_config(recipe, stage)
    return f"stage {stage.name}: {stage.steps} iterations of {cfg.problems} problems x {cfg.samples} answers"


def stage_mixture(recipe: Recipe, stage: Stage, sources: Sources, encode) -> tuple[Mixture, str]:
    """A joint stage's data, and a line saying about how many samples its steps hold (from the mean length of 32
    samples) and how many passes over each source they make (the weights move linearly from ``mix`` to
    ``mix_end``, so each source gets the mean of its two shares)."""
    probe = Mixture(sources.items, encode, stage.budget, stage.mix, stage.mix_end, seed=recipe.seed)
    mean_len = statistics.mean(len(probe.sample(i).input_ids) for i in range(32))
    horizon = int(stage.steps * stage.accum * stage.budget / mean_len)
    used = set(stage.mix) | set(stage.mix_end or {})
    data = Mixture({k: sources.items[k] for k in used}, encode, stage.budget, stage.mix, stage.mix_end,
                   horizon=horizon, seed=recipe.seed, replacement=stage.replacement)
    start, end = sum(data.start), sum(data.end)
    passes = ", ".join(f"{name} {horizon * (a / start + b / end) / 2 / len(sources.items[name]):.2f}"
                       for name, a, b in zip(data.names, data.start, data.end))
    return data, (f"stage {stage.name}: about {horizon} samples ({round(mean_len)} tokens each on average); "
                  f"passes over each source: {passes}")


def compute_line(recipe: Recipe) -> str:
    """What the run computes in, as it logs it (the weights train in float32 either way)."""
    autocast = "bf16 autocast" if use_bf16(recipe.device, recipe.bf16) else "float32, no bf16 autocast"
    return f"training on {recipe.device} in {autocast}"


def _loop_config(recipe: Recipe, stage: Stage) -> LoopConfig:
    return LoopConfig(steps=stage.steps, ckpt_every=stage.ckpt_every, log_every=stage.log_every, clip=stage.clip,
                      bf16=recipe.bf16, bias_update_rate=stage.bias_update_rate, accum=stage.accum,
                      val_every=(stage.val or {}).get("every", 100))


def rl_config(recipe: Recipe, stage: Stage):
    """The ``RLConfig`` of an rl stage: its ``rl`` settings plus the stage's steps, budget, clip and ckpt_every, and
    the recipe's bf16."""
    from kimivl.rl.trainer import RLConfig  # rl builds on train, so it is imported only when a stage needs it

    if "bf16" in (stage.rl or {}):
        raise RecipeError(f"stage {stage.name!r}: rl: bf16 is set for the whole recipe (its top-level 'bf16')")
    try:
        return RLConfig(iterations=stage.steps, budget=stage.budget, clip=stage.clip, ckpt_every=stage.ckpt_every,
                        seed=recipe.seed, bf16=recipe.bf16, **(stage.rl or {}))
    except (TypeError, ValueError) as e:
        raise RecipeError(f"stage {stage.name!r}: rl: {e}") from None


def joint_loss(model: KimiVL, batch) -> tuple[torch.Tensor, dict[str, float], int]:
    out = model(**batch.kwargs())
    return out.loss, {"packing_efficiency": batch.efficiency}, batch.n_tokens


def run_stage(recipe: Recipe, stage: Stage, model: KimiVL, processor: KimiVLProcessor, sources: Sources,
              progress: bool = True) -> dict[str, float]:
    """Train ``model`` through one stage (resuming it if interrupted)."""
    schedule, offsets = global_schedule(recipe)
    validate = None
    if stage.rope_theta is not None:
        model.config.text_config.rope_theta = float(stage.rope_theta)
    if stage.kind == "vit":
        records = Concat([sources.items[name] for name in stage.sources])
        trainee = ViTPretrainer(model.vision_tower, model.config.text_config.vocab_size).to(model.device)
        data, loss_fn = CaptionStream(records, processor, stage.images_per_batch, recipe.seed), vit_loss
        log.info("%s", stage_amount(recipe, stage, sources))
    elif stage.kind == "rl":
        freeze_stage(model, stage)
        trainee = model
        log.info("%s", stage_amount(recipe, stage, sources))
    else:
        freeze_stage(model, stage)
        encode = sources.encoder(processor)
        data, amount = stage_mixture(recipe, stage, sources, encode)
        log.info("%s", amount)
        used = set(data.names)
        trainee, loss_fn = model, joint_loss
        if stage.val:
            rows = heldout_rows({k: sources.items[k] for k in stage.val["sources"]}, encode, stage.budget,
                                stage.val.get("rows", 16), seed=recipe.seed)

            def validate(m):
                return {"val_loss": heldout_loss(m, rows, recipe.bf16)}
        if stage.standardize_images:
            names = sorted(n for n in used if not sources.is_text[n])
            samples = [encode(n, r) for n in names for r in sources.items[n][:CALIBRATION_SAMPLES]]
            standardize_image_features(model, samples, stage.standardize_images)
    optimizer = build_optimizer(trainee, lr=stage.lr, weight_decay=stage.weight_decay, ns_dtype=stage.ns_dtype,
                                lr_scale=stage.lr_scale)
    if stage.schedule == "continue":
        offset = offsets[stage.name]
        scheduler = scheduler_at(optimizer, lambda step: schedule(offset + step))
    else:
        scheduler = scheduler_at(optimizer, WarmupCosine(stage.warmup, stage.steps, min_ratio=0.1))
    # under bf16 autocast, frozen weights of a bfloat16 checkpoint train as they would in float32, in half the memory
    # (joint stages: everything they run is autocast; the rl stage's generation is not)
    held = hold_frozen_in_bf16(model) if stage.kind == "joint" and use_bf16(model.device, recipe.bf16) else []
    try:
        log.info("stage %s %s", stage.name, memory_plan(trainee))
        model.set_recompute(stage.recompute)
        if stage.kind == "rl":
            from kimivl.rl.trainer import RLTrainer

            problems = Concat([sources.items[name] for name in stage.sources])
            return RLTrainer(model, processor, problems, rl_config(recipe, stage), optimizer, scheduler, recipe.out,
                             stage.name).run(progress=progress)
        return train_loop(trainee, loss_fn, data, optimizer, scheduler, _loop_config(recipe, stage), recipe.out,
                          stage.name, progress=progress, validate=validate)
    finally:  # the model leaves the stage as it came, even when the stage stops with an error
        optimizer.zero_grad(set_to_none=True)  # gradients and optimiser state go before held weights grow back
        optimizer.state.clear()
        restore_float32(held)
        model.requires_grad_(True)
        model.set_recompute(False)


def evaluate_stage(recipe: Recipe, stage: str, model: KimiVL, processor: KimiVLProcessor,
                   progress: bool = True) -> dict[str, float]:
    """Held-out accuracy per task after ``stage``, written to ``out/eval/<stage>.json``; beside it the predictions,
    ``<stage>.lengths.json``, the mean answer length in tokens per task (re-encoded text), and
    ``<stage>.position_loss.json``, the loss by position range on each text-only file of the split."""
    spec = recipe.eval
    split = recipe.out / spec["split"]
    records = heldout_records(split, spec.get("limit"))
    model.eval()
    losses = {p.stem: position_loss(model, processor, list(itertools.islice(iter_texts(p), spec.get("limit"))))
              for p in sorted(split.glob("*.jsonl")) if is_text_file(p)}
    accuracy, rows = evaluate(model, processor, records, max_new_tokens=spec.get("max_new_tokens", 160),
                              progress=progress)
    out = recipe.out / "eval"
    out.mkdir(exist_ok=True)
    write_text_atomic(out / f"{stage}.json", json.dumps(accuracy, indent=1) + "\n")
    write_text_atomic(out / f"{stage}.predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    tokens = {task: statistics.mean(len(processor.tokenizer.encode(r["prediction"])) for r in rows
                                     if task in ("all", r["task"])) for task in accuracy}
    write_text_atomic(out / f"{stage}.lengths.json", json.dumps(tokens, indent=1) + "\n")
    write_text_atomic(out / f"{stage}.position_loss.json", json.dumps(losses, indent=1) + "\n")
    log.info("held-out accuracy after %s: %s", stage, accuracy)
    for name, loss in losses.items():
        log.info("held-out %s loss by position after %s: %s", name, stage,
                 ", ".join(f"{k} {v:.3f}" for k, v in loss.items()))
    return accuracy


def _save_final(model: KimiVL, processor: KimiVLProcessor, final: Path) -> None:
    """Write the stage's checkpoint under a temporary name, then rename it into place: a run killed meanwhile finds
    no ``final`` and finishes the stage again from its last training checkpoint."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)  # an incomplete one left by an older version
    os.replace(tmp, final)


def run_recipe(recipe: Recipe, progress: bool = True) -> KimiVL:
    """Run every stage not yet finished; export the final model when the recipe asks for it."""
    for stage in recipe.stages:
        if stage.kind == "rl":
            rl_config(recipe, stage)  # a bad rl setting fails now, not after the world is built
    base_dir = base_checkpoint(recipe)
    recipe.out.mkdir(parents=True, exist_ok=True)
    if recipe.world is not None:
        ensure_world(recipe.out / "world", progress=progress, **recipe.world)
    sources = Sources(recipe, progress)
    if recipe.eval:  # a held-out split that cannot be scored fails now, not after the first stage
        heldout_records(recipe.out / recipe.eval["split"], recipe.eval.get("limit"))
    processor = KimiVLProcessor(recipe_tokenizer(recipe, sources, base_dir))
    model = _base_model(recipe, processor.tokenizer)
    log.info("%s", compute_line(recipe))
    for stage in recipe.stages:  # a freeze pattern that matches nothing fails now, not stages later
        if stage.freeze:
            freeze_stage(model, stage)
    model.requires_grad_(True)
    if (recipe.eval or {}).get("base") and not (recipe.out / "eval" / "base.json").is_file():
        evaluate_stage(recipe, "base", model, processor, progress)
    for stage in recipe.stages:
        final = recipe.out / stage.name / FINAL
        finished = (final / "config.json").is_file()
        if finished:
            log.info("stage %s already finished; loading %s", stage.name, final)
            model = KimiVL.from_pretrained(final, dtype=torch.float32, device=recipe.device)
        else:
            log.info("stage %s: %d steps", stage.name, stage.steps)
            run_stage(recipe, stage, model, processor, sources, progress)
            _save_final(model, processor, final)
        # a finished stage is evaluated again only when a kill cut its evaluation short (position_loss comes last)
        evaluated = finished and (recipe.out / "eval" / f"{stage.name}.position_loss.json").is_file()
        if stage.name in (recipe.eval or {}).get("after", []) and not evaluated:
            evaluate_stage(recipe, stage.name, model, processor, progress)
    metrics = recipe.out / "metrics.jsonl"
    if metrics.is_file():
        plot_curves(metrics, recipe.out / "curves.png", keys=("loss", "val_loss"))
    if recipe.export:
        dtype = getattr(torch, recipe.export.get("dtype", "bfloat16"))
        model.save_pretrained(recipe.export["path"], dtype=dtype)
        processor.save_pretrained(recipe.export["path"])
        log.info("exported %s", recipe.export["path"])
    return model.eval()
