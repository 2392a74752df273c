"""The joint stage kind: the model trained on packed rows from a weighted mixture of sources (alignment, pre-training,
cooldown, long-context activation, SFT, long-CoT SFT)."""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch

from kimivl.data.formats import DataError
from kimivl.data.indexed import locate
from kimivl.data.mixture import Mixture
from kimivl.processing.processor import IGNORE_INDEX
from kimivl.train.calibrate import standardize_image_features
from kimivl.train.loop import train_loop
from kimivl.train.recipe import RecipeError, check_integer, number
from kimivl.train.stages.base import (
    PartsSettings,
    Prepared,
    StageContext,
    check_records,
    loop_config,
    once,
    source_record,
)
from kimivl.train.validation import heldout_loss, heldout_rows

CALIBRATION_SAMPLES = 32  # per image source, for standardize_images
PROBE_RECORDS = 8  # per source, checked for scored tokens before training
# A stage's plan samples records and packs them into rows as training packs them: at least PROBE_SAMPLES, and on
# until those that fit fill PROBE_ROWS rows or PROBE_LIMIT are sampled (each is encoded: a cap on the work)
PROBE_SAMPLES = 32
PROBE_ROWS = 16
PROBE_LIMIT = 1024
log = logging.getLogger(__name__)


@dataclass
class JointStage(PartsSettings):
    mix: dict[str, float] = field(default_factory=dict)
    mix_end: dict[str, float] | None = None  # the weights move linearly from ``mix`` to these over the stage
    accum: int = 1  # packed rows whose gradients make one step
    replacement: bool = True  # draw records at random; false: every record once per pass, reshuffled
    val: dict[str, Any] | None = None  # {sources: [names], every: 100, rows: 16} -> val_loss in the metrics
    standardize_images: float | None = None  # first set image embeddings to mean 0, this std per channel
    bias_update_rate: float = 1e-3
    log_every: int = 10

    def check(self, where: str) -> None:
        super().check(where)
        if not self.mix:
            raise RecipeError(f"{where}: a joint stage needs a 'mix' of sources")
        for key in ("mix", "mix_end"):
            weights = getattr(self, key) or {}
            if not isinstance(weights, dict) or not all(number(w) and w >= 0 for w in weights.values()):
                raise RecipeError(f"{where}: {key} maps source names to finite weights >= 0, got {weights!r}")
            if weights and not 0 < sum(weights.values()) < math.inf:
                raise RecipeError(f"{where}: {key} weights must have a positive, finite sum, got {weights!r}")
        for key in ("accum", "log_every"):
            check_integer(f"{where}: {key}", getattr(self, key), 1)
        if not isinstance(self.replacement, bool):
            raise RecipeError(f"{where}: replacement is true or false, got {self.replacement!r}")
        if self.standardize_images is not None and not (
            number(self.standardize_images) and self.standardize_images > 0
        ):
            raise RecipeError(f"{where}: standardize_images is a target std > 0, got {self.standardize_images!r}")
        if not number(self.bias_update_rate) or self.bias_update_rate < 0:
            raise RecipeError(f"{where}: bias_update_rate must be a number >= 0, got {self.bias_update_rate!r}")
        if self.val is not None:
            _check_val(where, self.val)

    def sources_used(self) -> set[str]:
        return set(self.mix) | set(self.mix_end or {}) | set((self.val or {}).get("sources", []))

    def check_data(self, ctx: StageContext) -> None:
        check_sources(self, ctx, ctx.sources.encoder(ctx.processor), ctx.sources.fewest(ctx.processor))


def _check_val(where: str, val: Any) -> None:
    """``val``: ``{sources: [names], every: steps, rows: packed rows}``."""
    if not isinstance(val, dict) or set(val) - {"sources", "every", "rows"}:
        raise RecipeError(f"{where}: val is a mapping of 'sources', 'every' and 'rows', got {val!r}")
    sources = val.get("sources")
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
        raise RecipeError(f"{where}: val needs 'sources', a list of source names, got {sources!r}")
    for key in ("every", "rows"):
        if key in val:
            check_integer(f"{where}: val {key}", val[key], 1)


def stage_mixture(stage: JointStage, ctx: StageContext, encode, fewest=None) -> tuple[Mixture, str]:
    """A joint stage's data, its own stream (seeded by the recipe's seed and the stage's name), and a line saying
    about how many samples its steps hold (sampled ones, ``probe_lengths``, packed into rows as training packs them:
    also the horizon over which the weights move linearly from ``mix`` to ``mix_end``) and how many passes over each
    source they make (each source gets the mean of its two shares, and so do the sampled ones). ``fewest``
    (``Sources.fewest``) finds records over the budget without encoding them (``Mixture``)."""
    items, seed = ctx.sources.items, ctx.recipe.seed
    shares = mean_shares(stage.mix, stage.mix_end or stage.mix)
    probe = Mixture(items, encode, stage.budget, shares, seed=seed, stream=f"{stage.name}/probe", fewest=fewest)
    probed = probe_lengths(probe)
    lengths = [n for n, _ in probed]
    fitting = [n for n in lengths if n <= stage.budget]  # longer samples are skipped when rows are packed
    if not fitting:
        shortest, floor = min(probed)
        raise RecipeError(
            f"stage {stage.name!r}: none of {len(probed)} sampled records fits the budget of {stage.budget} "
            f"tokens (the shortest holds {'at least ' * floor}{shortest}): raise budget or shorten the data"
        )
    mean_len = statistics.mean(fitting)
    # the samples drawn a row, skipped ones too (each takes a sample index); rows are not full: budget / mean_len
    # would overcount
    per_row = len(lengths) / packed_rows(fitting, stage.budget)
    horizon = int(stage.steps * stage.accum * per_row)
    used = set(stage.mix) | set(stage.mix_end or {})
    data = Mixture(
        {k: items[k] for k in used},
        encode,
        stage.budget,
        stage.mix,
        stage.mix_end,
        horizon=horizon,
        seed=seed,
        replacement=stage.replacement,
        stream=stage.name,
        fewest=fewest,
    )
    passes = ", ".join(f"{name} {horizon * share / len(items[name]):.2f}" for name, share in shares.items())
    over = len(lengths) - len(fitting)
    skipped = f"; {over} of {len(lengths)} sampled records are over the budget and skipped" if over else ""
    return data, (
        f"stage {stage.name}: about {horizon} samples ({round(mean_len)} tokens each on average, {per_row:.1f} a row); "
        f"passes over each source: {passes}{skipped}"
    )


def probe_lengths(probe: Mixture) -> list[tuple[int, bool]]:
    """The tokens of ``probe``'s samples in order, each with whether it is over the budget (its tokens then a floor,
    ``Mixture.sample``): ``PROBE_SAMPLES``, then on while some fit and those fill fewer than ``PROBE_ROWS`` rows'
    worth of tokens, up to ``PROBE_LIMIT`` (32 samples alone, all in one row, said 32 a row of any budget)."""
    probed, fitting = [], 0
    while len(probed) < PROBE_SAMPLES or (0 < fitting < PROBE_ROWS * probe.budget and len(probed) < PROBE_LIMIT):
        s, n = probe.sample(len(probed))
        probed.append((n, s is None))
        fitting += n if n <= probe.budget else 0
    return probed


def packed_rows(lengths: list[int], budget: int) -> float:
    """How many rows samples of ``lengths`` (each within ``budget``) fill when packed in order, as
    ``Mixture.batches`` packs them (a sample that does not fit the row's room starts the next row); the last row,
    which more samples would go on filling, counts by the share of the budget it fills."""
    rows, used = 0, 0
    for n in lengths:
        if used + n > budget:
            rows, used = rows + 1, 0
        used += n
    return rows + used / budget


def mean_shares(start: dict[str, float], end: dict[str, float]) -> dict[str, float]:
    """Each source's share of the samples, the mean of its shares under ``start`` and ``end``."""
    a, b = sum(start.values()), sum(end.values())
    return {n: (start.get(n, 0) / a + end.get(n, 0) / b) / 2 for n in sorted(set(start) | set(end))}


def check_sources(stage: JointStage, ctx: StageContext, encode, fewest=None) -> None:
    """Before training: every conversation of the stage's sources has an assistant turn to learn from and readable
    images (``check_records``), and its first records encode (those that ``fewest`` puts over the budget, which
    training skips, are not encoded; with ``standardize_images``, the records the calibration measures are); a source
    whose first records score no token would train at loss 0 without a word, so it is named in a warning. A stage that
    trains only the vision side (no ``language_model`` in ``train``) learns nothing from a row without images: a source
    of text documents in its mix is refused, and one whose first records hold no image is named in a warning."""
    names = sorted(set(stage.mix) | set(stage.mix_end or {}))
    vision_only = "language_model" not in stage.train
    drawn = {name for weights in (stage.mix, stage.mix_end or {}) for name, w in weights.items() if w > 0}
    text = [name for name in names if name in drawn and ctx.sources.is_text[name]]
    if vision_only and text:
        where = getattr(ctx.sources.items[text[0]], "path", text[0])
        raise RecipeError(
            f"stage {stage.name!r}: data sources {text} hold text documents ({where}), and the stage trains only "
            f"{stage.train}, which a row without images never reaches: their rows would train nothing. Remove them "
            "from mix (and mix_end), or train language_model too"
        )
    check_records(ctx, names, _no_answer)
    warn = once(ctx, log.warning)
    for name in names:
        items = ctx.sources.items[name]
        calibrated = stage.standardize_images and not ctx.sources.is_text[name]
        first = range(min(PROBE_RECORDS, len(items)))
        fits = [i for i in first if fewest is None or fewest(name, items[i]) <= stage.budget]
        probe = [encoded(encode, name, items, i) for i in fits]
        for i in range(len(first), min(CALIBRATION_SAMPLES, len(items)) if calibrated else 0):
            encoded(encode, name, items, i)
        if vision_only and name in drawn and probe and not any(e.pixel_values.shape[0] for e in probe):
            warn(
                "stage %s: the first %d records of data source %r hold no image, and the stage trains only %s: a row "
                "without images trains nothing",
                stage.name,
                len(probe),
                name,
                stage.train,
            )
        if probe and not any(label != IGNORE_INDEX for e in probe for label in e.labels):
            warn(
                "stage %s: the first %d records of data source %r score no token (every label masked): it "
                "adds nothing to the loss",
                stage.name,
                len(probe),
                name,
            )


def encoded(encode, name: str, items, i: int):
    """Record ``i`` of the source ``name`` encoded; a ``DataError`` naming its file and line when it cannot be (an
    image whose header reads but whose pixels do not, a malformed turn)."""
    try:
        return encode(name, items[i])
    except ValueError as e:
        raise DataError(f"data source {name!r}: {locate(items, i)} cannot be encoded: {e}") from None


def _no_answer(record: dict) -> str | None:
    if not any(m["role"] == "assistant" for m in record["messages"]):
        return "has no assistant turn to learn from"
    return None


def joint_loss(model, batch) -> tuple[torch.Tensor, dict[str, float], int]:
    out = model(**batch.kwargs())
    return out.loss, {"packing_efficiency": batch.efficiency}, batch.n_tokens


def prepare(stage: JointStage, ctx: StageContext, model) -> Prepared:
    recipe, sources = ctx.recipe, ctx.sources
    context = model.config.text_config.max_position_embeddings
    if stage.budget > context:  # a packed row is one sequence of positions: it must fit the model's context
        raise RecipeError(f"stage {stage.name!r}: budget {stage.budget} is over the model's context ({context} tokens)")
    stage.freeze_model(model)
    encode, fewest = sources.encoder(ctx.processor), sources.fewest(ctx.processor)
    stage.check_data(ctx)
    data, line = stage_mixture(stage, ctx, encode, fewest)

    def setup() -> None:
        if stage.standardize_images:
            names = sorted(n for n in data.names if not sources.is_text[n])
            samples = [
                encoded(encode, n, sources.items[n], i)
                for n in names
                for i in range(min(CALIBRATION_SAMPLES, len(sources.items[n])))
            ]
            standardize_image_features(model, samples, stage.standardize_images)

    def run(optimizer, scheduler, progress: bool) -> dict[str, float]:
        validate = None
        if stage.val:
            rows = heldout_rows(
                {k: sources.items[k] for k in stage.val["sources"]},
                encode,
                stage.budget,
                stage.val.get("rows", 16),
                seed=recipe.seed,
                fewest=fewest,
            )

            def validate(m):
                return {"val_loss": heldout_loss(m, rows, recipe.bf16)}

        cfg = loop_config(
            stage,
            recipe,
            bias_update_rate=stage.bias_update_rate,
            val_every=(stage.val or {}).get("every", 100),
            sources=source_record(ctx, set(stage.mix) | set(stage.mix_end or {})),
        )
        metrics = train_loop(
            model,
            joint_loss,
            data,
            optimizer,
            scheduler,
            cfg,
            recipe.out,
            stage.name,
            progress=progress,
            validate=validate,
            world=ctx.world,
        )
        if data.skipped:
            log.warning(
                "stage %s: %d samples over the budget of %d tokens were skipped",
                stage.name,
                data.skipped,
                stage.budget,
            )
        return metrics

    return Prepared(model, line, run, setup, hold_frozen_bf16=True)
