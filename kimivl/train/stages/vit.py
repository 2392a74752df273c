"""The vit stage kind: MoonViT trained alone on image-caption pairs (SigLIP + captioning heads, dropped after)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from kimivl.data.formats import DataError, content_text
from kimivl.data.indexed import Concat
from kimivl.data.mixture import sample_rng
from kimivl.processing.processor import KimiVLProcessor
from kimivl.train.loop import train_loop
from kimivl.train.recipe import RecipeError, check_integer, check_names
from kimivl.train.stages.base import Prepared, StageContext, StageSettings, check_records, loop_config, source_record
from kimivl.train.vit import ViTPretrainer, caption_batch, vit_loss

log = logging.getLogger(__name__)


@dataclass
class ViTStage(StageSettings):
    sources: list[str] = field(default_factory=list)  # caption sources
    images_per_batch: int = 32
    accum: int = 1  # batches whose gradients make one step
    log_every: int = 10

    def check(self, where: str) -> None:
        super().check(where)
        if not self.sources:
            raise RecipeError(f"{where}: a vit stage needs caption 'sources'")
        check_names(f"{where}: sources", self.sources, "source names")
        for key in ("images_per_batch", "accum", "log_every"):
            check_integer(f"{where}: {key}", getattr(self, key), 1)

    def sources_used(self) -> set[str]:
        return set(self.sources)

    def check_data(self, ctx: StageContext) -> None:
        """Every record of its sources holds an image in a user turn and an answer to it (``caption_of``)."""
        text = [name for name in self.sources if ctx.sources.is_text[name]]
        if text:
            where = getattr(ctx.sources.items[text[0]], "path", text[0])
            raise RecipeError(
                f"stage {self.name!r}: sources {text} hold text documents ({where}); a vit stage trains on images "
                "with captions: give it conversation sources whose user turns hold images"
            )
        check_records(ctx, self.sources, _no_caption)


def caption_of(record: dict) -> tuple[str, str, str] | None:
    """A record's (image, question, answer): the first image of its first user turn with one, that turn's text,
    and the text of the assistant turn after it; None when it has no such image or answer."""
    messages = record["messages"]
    for k, message in enumerate(messages):
        content = message["content"]
        if message["role"] != "user" or isinstance(content, str):
            continue
        image = next((p["image"] for p in content if isinstance(p, dict) and p.get("type") == "image"), None)
        if image is None:
            continue
        answer = next((m["content"] for m in messages[k + 1 :] if m["role"] == "assistant"), None)
        if answer is None or not content_text(answer).strip():
            return None
        return image, content_text(content), content_text(answer)
    return None


def _no_caption(record: dict) -> str | None:
    if caption_of(record) is None:
        return "has no user turn with an image and an assistant answer after it to caption that image with"
    return None


class CaptionStream:
    """ViT-stage batches: ``images_per_batch`` (image, caption) pairs drawn from the records of ``sources`` (name ->
    records) joined in their order, sample i a pure function of (seed, stream, i), ``stream`` naming whose data it is
    (the stage's name), which is saved with the data position (``state_dict``): a stage renamed (its folder moved)
    goes on with the stream it began."""

    def __init__(
        self,
        sources: dict[str, Sequence[dict]],
        processor: KimiVLProcessor,
        per_batch: int,
        seed: int,
        max_len: int = 64,
        stream: str = "",
    ):
        self.names, self.records = list(sources), Concat(list(sources.values()))
        self.processor, self.per_batch, self.seed, self.max_len, self.stream = (
            processor,
            per_batch,
            seed,
            max_len,
            stream,
        )

    def state_dict(self) -> dict[str, str]:
        return {"stream": self.stream}

    def load_state_dict(self, state: dict[str, str]) -> None:
        if state["stream"] != self.stream:
            log.info(
                "going on with the stream %r the saved position belongs to (the stage was renamed)", state["stream"]
            )
            self.stream = state["stream"]

    def pair(self, i: int):
        k = sample_rng(self.seed, self.stream, i).randrange(len(self.records))
        try:
            image, question, answer = caption_of(self.records[k])
            return self.processor.image_processor(image), self.processor.tokenizer.encode(
                f"{question} {answer}", allow_special=False, limit=self.max_len - 2
            )  # the tokens a caption row holds (``caption_batch``): a caption of megabytes is not tokenized whole
        except ValueError as e:  # DataError, an image whose header reads but whose pixels do not
            name = self.names[self.records.find(k)[0]]
            raise DataError(f"sample {i}: {self.records.where(k)} of source {name!r} cannot be encoded: {e}") from e

    def batches(self, position: int) -> Iterator:
        tok = self.processor.tokenizer
        while True:
            pairs = [self.pair(i) for i in range(position, position + self.per_batch)]
            position += self.per_batch
            yield (
                caption_batch(
                    [p[0] for p in pairs], [p[1] for p in pairs], tok.bos_id, tok.eos_id, tok.pad_id, self.max_len
                ),
                position,
            )


def prepare(stage: ViTStage, ctx: StageContext, model) -> Prepared:
    """The tower with its training heads (built on the meta device for a meta tower, else on the CPU from
    ``recipe.seed`` and moved, so every device and rank starts from the same weights); the rest of the model is
    frozen. First its data is checked (``ViTStage.check_data``)."""
    recipe, sources = ctx.recipe, ctx.sources
    stage.check_data(ctx)
    vocab = model.config.text_config.vocab_size
    device = model.vision_tower.patch_embed.proj.weight.device
    if device.type == "meta":
        with torch.device("meta"):
            trainee = ViTPretrainer(model.vision_tower, vocab)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            trainee = ViTPretrainer(model.vision_tower, vocab).to(device)
    model.requires_grad_(False)
    model.vision_tower.requires_grad_(True)
    images = stage.steps * stage.accum * stage.images_per_batch
    records = sum(len(sources.items[name]) for name in stage.sources)
    line = (
        f"stage {stage.name}: {images} captioned images, {images / records:.2f} passes over {', '.join(stage.sources)}"
    )

    def run(optimizer, scheduler, progress: bool) -> dict[str, float]:
        data = CaptionStream(
            {name: sources.items[name] for name in stage.sources},
            ctx.processor,
            stage.images_per_batch,
            recipe.seed,
            stream=stage.name,
        )
        cfg = loop_config(stage, recipe, sources=source_record(ctx, stage.sources))
        return train_loop(
            trainee,
            vit_loss,
            data,
            optimizer,
            scheduler,
            cfg,
            recipe.out,
            stage.name,
            progress=progress,
            world=ctx.world,
        )

    return Prepared(trainee, line, run)
