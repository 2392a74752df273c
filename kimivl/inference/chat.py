"""Text in, text out: ``generate`` and ``stream_generate`` over chat messages."""

from __future__ import annotations

import codecs
from collections.abc import Iterator

import torch

from kimivl.inference.generate import GenerationError, stream_ids
from kimivl.inference.sampling import SamplingParams
from kimivl.processing.chat_template import MessageError


def _is_batch(messages) -> bool:
    return isinstance(messages, list) and bool(messages) and isinstance(messages[0], list)


def check_fits(processor, messages: list[dict], context: int) -> None:
    """A ``GenerationError`` when the text of ``messages`` alone takes the model's ``context`` (``fewest_tokens``, a
    floor counted without tokenizing): megabytes of text are refused at once, not after seconds of encoding (the
    server's encode thread refuses them so too)."""
    fewest = processor.fewest_tokens(messages)
    if fewest >= context:
        raise GenerationError(
            f"the messages hold at least {fewest} tokens of text, which leaves no room for an answer in the model's "
            f"context of {context} tokens; shorten the messages"
        )


def _inputs(processor, conversations: list[list[dict]], context: int):
    for messages in conversations:
        check_fits(processor, messages, context)
    encoded = [processor.encode(c) for c in conversations]
    pixel_values = torch.cat([e.pixel_values for e in encoded]) if any(len(e.image_grid_hws) for e in encoded) else None
    grids = torch.cat([e.image_grid_hws for e in encoded]) if pixel_values is not None else None
    return [e.input_ids for e in encoded], pixel_values, grids


def _pieces(model, processor, conversations, params) -> Iterator[list[str]]:
    """Per step, each conversation's newly completed text ('' when nothing new)."""
    prompts, pixel_values, grids = _inputs(processor, conversations, model.config.text_config.max_position_embeddings)
    tok = processor.tokenizer
    decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in prompts]
    for step in stream_ids(model, prompts, pixel_values, grids, params, stop_ids=processor.stop_ids):
        yield ["" if t is None or tok.is_special(t) else d.decode(tok.token_bytes(t)) for d, t in zip(decoders, step)]
    yield [d.decode(b"", final=True) for d in decoders]


def stream_generate(model, processor, messages: list[dict], **sampling) -> Iterator[str]:
    """Yield the answer to one conversation piece by piece as it is generated."""
    if _is_batch(messages):
        raise MessageError(
            f"stream_generate takes one conversation (a list of messages), got a list of {len(messages)} "
            "conversations: stream each alone, or generate them as one batch with generate"
        )
    for pieces in _pieces(model, processor, [messages], SamplingParams.from_kwargs(**sampling)):
        if pieces[0]:
            yield pieces[0]


def generate(model, processor, messages: list[dict] | list[list[dict]], **sampling) -> str | list[str]:
    """The answer to one conversation, or a list of answers for a list of conversations (generated as one
    batch). ``sampling`` takes ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed`` (a seeded batch
    samples from one generator: a conversation's sampled answer depends on the batch; greedy ones do not)."""
    conversations = messages if _is_batch(messages) else [messages]
    texts = [""] * len(conversations)
    for pieces in _pieces(model, processor, conversations, SamplingParams.from_kwargs(**sampling)):
        texts = [t + p for t, p in zip(texts, pieces)]
    return texts if _is_batch(messages) else texts[0]
