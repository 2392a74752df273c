"""Batched generation on token ids with the compressed MLA cache.

Prompts of different lengths are left-padded into one batch; each row's positions start at its first real token,
and padding is masked out of attention, so a row computes what it would alone up to rounding: the batch's matmuls
(the MoE's grouped expert matmuls above all) round differently from a single row's, about 1e-5 in float32's logits and
far more in bf16's, which can flip a greedy near-tie: with kimivl-tiny in bf16, 1 of 18 rows left its answer alone at
the 8th token. In float64 rows agree to about 1e-13. A seeded batch samples from one generator, so a sampled row
depends on the rows beside it (RL's k answers to one prompt, side by side, differ so); the server seeds each choice
apart (seed + i).

Generation computes in the model's own dtype, the cache's: an enclosing autocast (a training loop's evaluation) is
switched off while it runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from numbers import Integral

import torch

from kimivl.inference import PREFILL_CHUNK
from kimivl.inference.cache import MLACache
from kimivl.inference.sampling import SamplingError, SamplingParams, sample_next, seeded_generator

log = logging.getLogger(__name__)


class GenerationError(ValueError):
    """Generation inputs that cannot be used: prompts that are not token ids of the model, or do not fit its context."""


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids, mask


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    """The prompts as lists of ints, once every one is checked to be a non-empty sequence (or 1-D integer tensor) of
    token ids inside the vocabulary."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise GenerationError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor) and p.dim() == 1 and not p.is_floating_point():
            p = p.tolist()
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) == 0:
            raise GenerationError(
                f"prompt {i} needs at least one token (a non-empty list of token ids), got {type(p).__name__} {p!r:.40}"
            )
        bad = [t for t in p if not (isinstance(t, Integral) and not isinstance(t, bool) and 0 <= t < vocab_size)]
        if bad:
            raise GenerationError(
                f"prompt {i} holds {len(bad)} token ids that are not integers in [0, {vocab_size}) "
                f"(the model's vocabulary): {bad[:5]}"
            )
        out.append([int(t) for t in p])
    return out


def prefill(lm, embeds_BSD, positions_BS, cache, mask_BS: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """Run the prompt's embeddings through ``lm`` into ``cache`` in passes of ``chunk`` tokens, each attending to the
    cache so far, so peak activations follow the chunk rather than the prompt; returns the last pass's final hidden
    states (B, <= chunk, D). ``mask_BS`` (1 real, 0 padding) is needed only for padded batches."""
    if not isinstance(chunk, Integral) or isinstance(chunk, bool) or chunk < 1:
        raise GenerationError(f"prefill_chunk must be a positive number of tokens, got {chunk!r}")
    s = embeds_BSD.shape[1]
    if s == 0:
        raise GenerationError("prefill needs a prompt of at least one token, got an empty one")
    for start in range(0, s, chunk):
        end = min(start + chunk, s)
        hidden = lm(
            embeds_BSD[:, start:end],
            position_ids=positions_BS[:, start:end],
            cache=cache,
            attention_mask=mask_BS[:, :end] if mask_BS is not None else None,
        )
    return hidden


@torch.inference_mode()
def stream_ids(
    model,
    prompts: Sequence[Sequence[int]],
    pixel_values: torch.Tensor | None = None,
    image_grid_hws: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    stop_ids: Sequence[int] = (),
    prefill_chunk: int = PREFILL_CHUNK,
) -> Iterator[list[int | None]]:
    """Yield, per decoding step, each row's new token id (None once the row has stopped). A stop id ends its
    row and is not yielded. Images of all prompts are packed in prompt order. Prompts are prefilled in passes of
    ``prefill_chunk`` tokens. Each step computes in the model's dtype, under autocast or not."""
    steps = _steps(model, prompts, pixel_values, image_grid_hws, params, stop_ids, prefill_chunk)
    while True:
        # autocast off around each resumption only: a ``with`` inside the generator would hold it off in the
        # caller's code between steps as well
        with torch.autocast(model.device.type, enabled=False):
            step = next(steps, None)
        if step is None:
            return
        yield step


def _steps(model, prompts, pixel_values, image_grid_hws, params, stop_ids, prefill_chunk) -> Iterator[list[int | None]]:
    """``stream_ids``'s steps, computed in whatever autocast state each resumption finds."""
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise SamplingError(f"params must be a SamplingParams, got {type(params).__name__}")
    cfg = model.config.text_config
    prompts = _check_prompts(prompts, cfg.vocab_size)
    context = cfg.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise GenerationError(f"prompt of {longest} tokens does not fit the model's context of {context} tokens")
    budgets = [min(params.max_new_tokens, context - len(p)) for p in prompts]  # each row's, as it would be alone
    if min(budgets) < params.max_new_tokens:
        log.warning(
            "max_new_tokens cut to %d: the prompt leaves only that much of the %d-token context",
            min(budgets),
            context,
        )
    max_new = max(budgets)
    device = model.device
    ids, mask = _left_pad(prompts, cfg.pad_id, device)
    padded = bool((mask == 0).any())
    shortest = min(len(p) for p in prompts)
    cache = MLACache(cfg, len(prompts), longest + max_new, dtype=model.dtype, device=device, padding=longest - shortest)
    budget = torch.tensor(budgets, device=device)
    generator = seeded_generator(params.seed, device) if params.seed is not None else None
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    lm = model.language_model

    positions = (mask.cumsum(1) - 1).clamp(min=0)
    embeds = model.embed(ids, pixel_values, image_grid_hws)
    hidden = prefill(lm, embeds, positions, cache, mask if padded else None, prefill_chunk)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new):
        token = sample_next(lm.logits(hidden[:, -1]), params, generator)
        done |= torch.isin(token, stop)
        yield [None if d else t for t, d in zip(token.tolist(), done.tolist())]
        done |= budget <= step + 1
        if bool(done.all()):
            return
        positions = positions[:, -1:] + (~done[:, None]).long()  # a finished row stays within the context
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        hidden = lm(
            lm.model.embed_tokens(token[:, None]),
            position_ids=positions,
            cache=cache,
            attention_mask=mask if padded else None,
        )


def generate_ids(
    model,
    prompts: Sequence[Sequence[int]],
    pixel_values: torch.Tensor | None = None,
    image_grid_hws: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    stop_ids: Sequence[int] = (),
    prefill_chunk: int = PREFILL_CHUNK,
) -> list[list[int]]:
    """New token ids per prompt (stop ids excluded)."""
    out: list[list[int]] = []
    for step in stream_ids(model, prompts, pixel_values, image_grid_hws, params, stop_ids, prefill_chunk):
        out = out or [[] for _ in step]  # stream_ids checks the prompts before its first step
        for row, token in zip(out, step):
            if token is not None:
                row.append(token)
    return out
