"""KimiVLProcessor: chat template + tokenizer + image processor, from messages to model inputs.

Each image placeholder (one ``<|media_pad|>`` in the template) is expanded to (h/2)*(w/2) copies for its image.
For training, ``encode_for_training`` also returns labels that cover only the assistant turns' content and their
closing ``<|im_end|>`` (everything else is ``-100``).

Only the template's own markup becomes special ids: message content and documents are encoded as plain text, so a
``<|im_end|>`` or ``<|media_pad|>`` typed by a user (or found in a document) is ordinary tokens and cannot forge a
turn, a system prompt or an image slot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kimivl.checkpoint import CheckpointError, check_directory, check_overwrite
from kimivl.config import KimiVLConfig
from kimivl.processing.chat_template import MessageError, chat_segments
from kimivl.processing.image import CONFIG_FILE as IMAGE_CONFIG
from kimivl.processing.image import ImageProcessor
from kimivl.processing.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG
from kimivl.processing.tokenizer import MODEL_FILE as TOKENIZER_MODEL
from kimivl.processing.tokenizer import KimiTokenizer

IGNORE_INDEX = -100


def check_media_pad(
    config: KimiVLConfig, tokenizer: KimiTokenizer, model_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike
) -> None:
    """A ``CheckpointError`` unless the model's ``media_placeholder_token_id`` (the id its image features replace)
    is the tokenizer's ``<|media_pad|>`` id (the one the processor writes for each image): otherwise text prompts
    work and every prompt with an image fails."""
    if config.media_placeholder_token_id != tokenizer.media_pad_id:
        raise CheckpointError(
            f"{os.path.join(model_dir, 'config.json')} gives media_placeholder_token_id "
            f"{config.media_placeholder_token_id}, but the tokenizer in {tokenizer_dir} ({TOKENIZER_MODEL}, "
            f"{TOKENIZER_CONFIG}) has <|media_pad|> at id {tokenizer.media_pad_id}: the model and tokenizer do not "
            f"belong together; use the model's own tokenizer, or set media_placeholder_token_id to "
            f"{tokenizer.media_pad_id} if this tokenizer is the one it was trained with"
        )


def check_image_processor(config: KimiVLConfig, image_processor: ImageProcessor, model_dir: str | os.PathLike) -> None:
    """A ``CheckpointError`` unless the image processor cuts images into the patches and merge windows of the
    model's vision tower (``vision_config``'s ``patch_size`` and ``merge_kernel_size``): otherwise text prompts work
    and every image fails, its placeholder count not its feature count."""
    source = os.path.join(model_dir, IMAGE_CONFIG)
    if not os.path.isfile(source):
        source = f"the default image processor (no {IMAGE_CONFIG} in {model_dir})"
    for name in ("patch_size", "merge_kernel_size"):
        ours, model = (getattr(part, name) for part in (image_processor, config.vision_config))
        if ours != model:
            shown = [list(v) if isinstance(v, tuple) else v for v in (ours, model)]
            raise CheckpointError(
                f"{source} gives {name} {shown[0]}, but {os.path.join(model_dir, 'config.json')} has vision_config."
                f"{name} {shown[1]}: images would not match the vision tower; set {name} to {shown[1]} in "
                f"{IMAGE_CONFIG}"
            )


def model_image_processor(model_dir: str | os.PathLike, config: KimiVLConfig | None = None) -> ImageProcessor:
    """The image processor of ``model_dir``: its ``preprocessor_config.json``, or the official defaults when it has
    none; with the model's ``config``, checked to cut images as its vision tower does (``check_image_processor``)."""
    has_pre = os.path.isfile(os.path.join(model_dir, IMAGE_CONFIG))
    image_processor = ImageProcessor.from_pretrained(model_dir) if has_pre else ImageProcessor()
    if config is not None:
        check_image_processor(config, image_processor, model_dir)
    return image_processor


@dataclass
class Encoded:
    """One conversation: token ids (placeholders expanded), labels for training, and its images' patches."""

    input_ids: list[int]
    pixel_values: torch.Tensor  # (sum h*w, 3, 14, 14)
    image_grid_hws: torch.Tensor  # (M, 2)
    labels: list[int] | None = None


class KimiVLProcessor:
    def __init__(self, tokenizer: KimiTokenizer, image_processor: ImageProcessor | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor or ImageProcessor()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> KimiVLProcessor:
        """Reads ``tiktoken.model``, ``tokenizer_config.json`` and ``preprocessor_config.json`` (defaults to the
        official values when the last is absent). Beside a model's ``config.json``, the tokenizer must be that
        model's (``check_media_pad``) and the image processor must cut images as its vision tower does
        (``check_image_processor``)."""
        check_directory(path)
        tokenizer = KimiTokenizer.from_pretrained(path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            return cls(tokenizer, model_image_processor(path))
        config = KimiVLConfig.from_pretrained(path)
        check_media_pad(config, tokenizer, path, path)
        return cls(tokenizer, model_image_processor(path, config))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the tokenizer's and the image processor's files; overwriting another model's is refused first
        (``kimivl.checkpoint.check_overwrite``)."""
        check_overwrite(path, [TOKENIZER_MODEL, TOKENIZER_CONFIG, IMAGE_CONFIG])
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    @property
    def stop_ids(self) -> list[int]:
        return self.tokenizer.stop_ids

    def _expand(self, ids: list[int], grids: torch.Tensor) -> list[int]:
        pad = self.tokenizer.media_pad_id
        slots = [i for i, t in enumerate(ids) if t == pad]
        if len(slots) != len(grids):
            raise MessageError(f"the text has {len(slots)} image placeholders but {len(grids)} images were given")
        out, start = [], 0
        for slot, (h, w) in zip(slots, grids.tolist()):
            out += ids[start:slot] + [pad] * self.image_processor.num_tokens((h, w))
            start = slot + 1
        return out + ids[start:]

    def encode(self, messages: list[dict], add_generation_prompt: bool = True) -> Encoded:
        """A conversation as a prompt for generation."""
        segments, media = chat_segments(messages, add_generation_prompt, self.image_processor)
        images = self.image_processor(media)
        ids = self._expand(self.encode_segments(segments), images["image_grid_hws"])
        return Encoded(ids, images["pixel_values"], images["image_grid_hws"])

    def encode_segments(self, segments: list[tuple[str, bool]]) -> list[int]:
        """Token ids of rendered template segments: markup with special ids, content (adjacent pieces joined, as
        they read) as plain text."""
        ids: list[int] = []
        plain: list[str] = []
        for text, structure in [*segments, ("", True)]:
            if not structure:
                plain.append(text)
                continue
            if plain:
                ids += self.tokenizer.encode("".join(plain), allow_special=False)
                plain = []
            ids += self.tokenizer.encode(text)
        return ids

    def encode_for_training(self, messages: list[dict]) -> Encoded:
        """A whole conversation with labels on the assistant answers and their end tokens only."""
        enc = self.encode(messages, add_generation_prompt=False)
        if not any(m.get("role") == "assistant" for m in messages):
            raise MessageError("a training conversation needs at least one assistant message")
        enc.labels = self.answer_labels(enc.input_ids)
        return enc

    def encode_text(self, text: str, limit: int | None = None) -> Encoded:
        """A plain document for language modelling: every token is a label; ends with [EOS]. Special-token strings in
        the document are plain text. With ``limit``, its first ``limit`` tokens alone, the rest never tokenized."""
        ids = (self.tokenizer.encode(text, allow_special=False, limit=limit) + [self.tokenizer.eos_id])[:limit]
        p = self.image_processor.patch_size
        return Encoded(ids, torch.zeros(0, 3, p, p), torch.zeros(0, 2, dtype=torch.int64), list(ids))

    def fewest_tokens(self, content: str | list[dict]) -> int:
        """A floor on the tokens of a document (as ``encode_text`` encodes it, [EOS] included) or of messages, read
        without tokenizing them: each character is at least a byte and a token holds at most ``longest_token``. Only
        text counts (messages' images, markup, and parts that encoding would refuse count nothing), so a document or
        conversation whose floor is over a limit is over it when encoded, and megabytes of it are refused unread."""
        longest = self.tokenizer.longest_token
        if isinstance(content, str):
            return len(content) // longest + 1
        chars = 0
        for message in content if isinstance(content, list) else []:
            parts = message.get("content") if isinstance(message, dict) else None
            if isinstance(parts, str):
                chars += len(parts)
            for part in parts if isinstance(parts, list) else []:
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    chars += len(part["text"])
        return chars // longest

    def answer_labels(self, ids: list[int]) -> list[int]:
        """Labels that keep the tokens from each assistant turn's ``<|im_middle|>`` (exclusive) through its
        ``<|im_end|>`` (inclusive) and ignore everything else, images in an answer too (``<|media_start|>`` through
        ``<|media_end|>``: the model reads images, it never writes them)."""
        tok = self.tokenizer
        roles = {tok.im_system_id, tok.im_user_id, tok.im_assistant_id}
        labels, role, answering, media = [IGNORE_INDEX] * len(ids), None, False, False
        for i, t in enumerate(ids):
            if answering:
                media = media or t == tok.media_start_id
                labels[i] = IGNORE_INDEX if media else t
                media = media and t != tok.media_end_id
                answering = t != tok.im_end_id
            elif t in roles:
                role = t
            elif t == tok.im_middle_id and role is not None:
                answering, role = role == tok.im_assistant_id, None
        return labels

    def __call__(self, messages: list[dict], add_generation_prompt: bool = True) -> dict[str, torch.Tensor]:
        """Model inputs for one conversation: ``input_ids`` (1, S), ``pixel_values``, ``image_grid_hws``."""
        enc = self.encode(messages, add_generation_prompt)
        return {
            "input_ids": torch.tensor([enc.input_ids]),
            "pixel_values": enc.pixel_values,
            "image_grid_hws": enc.image_grid_hws,
        }

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of ``ids``, without the special tokens' names if ``skip_special``; an id outside the vocabulary is a
        ``ValueError`` either way."""
        ids = list(ids)
        self.tokenizer.check_ids(ids)
        if skip_special:
            ids = [t for t in ids if not self.tokenizer.is_special(t)]
        return self.tokenizer.decode(ids)
