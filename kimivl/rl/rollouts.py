"""Rollouts with the generation engine, and sequence log-probs by a teacher-forced packed forward.

Prompts and images follow the engine's convention: token-id lists, with the images of all prompts packed in prompt
order (``pixel_values`` (N, 3, 14, 14), ``image_grid_hws`` (M, 2)), an image of grid (h, w) filling (h/2)*(w/2)
``<|media_pad|>`` slots. A response is the sampled tokens *including* the stop token that ended it (the policy
chose to stop, so that choice is part of y and gets its log-prob); a response cut at ``max_new_tokens`` has none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kimivl.inference.generate import stream_ids
from kimivl.inference.sampling import SamplingParams
from kimivl.model.target_logprobs import target_logprobs


@dataclass
class Rollout:
    """One sampled response to prompt ``prompt`` (an index into the prompts given)."""

    prompt: int
    ids: list[int]  # response token ids, the stop token included when it stopped
    text: str  # decoded response (special tokens dropped)
    stopped: bool  # ended on a stop id rather than at max_new_tokens

    @property
    def length(self) -> int:
        return len(self.ids)


def split_images(
    prompts: Sequence[Sequence[int]],
    pixel_values: torch.Tensor | None,
    image_grid_hws: torch.Tensor | None,
    placeholder_id: int,
    merge: tuple[int, int] = (2, 2),
) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Each prompt's own (pixel_values, image_grid_hws) out of the packed images (None, None for none)."""
    grids = image_grid_hws.tolist() if image_grid_hws is not None else []
    out, image, patch = [], 0, 0
    for ids in prompts:
        slots, first, first_patch = sum(t == placeholder_id for t in ids), image, patch
        while slots > 0 and image < len(grids):
            h, w = grids[image]
            slots -= (h // merge[0]) * (w // merge[1])
            image, patch = image + 1, patch + h * w
        if slots != 0:
            raise ValueError(f"prompt {len(out)}'s image placeholders do not match the packed images' grids")
        out.append((pixel_values[first_patch:patch], image_grid_hws[first:image]) if image > first else (None, None))
    if image != len(grids):
        raise ValueError(f"{len(grids) - image} packed images are left over after the prompts' placeholders")
    return out


def _pack_images(parts: Sequence[tuple[torch.Tensor | None, torch.Tensor | None]]):
    have = [p for p in parts if p[0] is not None]
    if not have:
        return None, None
    return torch.cat([p[0] for p in have]), torch.cat([p[1] for p in have])


@torch.no_grad()
def rollout(
    model,
    processor,
    prompts: Sequence[Sequence[int]],
    pixel_values: torch.Tensor | None,
    image_grid_hws: torch.Tensor | None,
    k: int,
    params: SamplingParams,
    stop_ids: Sequence[int],
    batch_size: int = 64,
    advance: Callable[[int], object] | None = None,
) -> list[Rollout]:
    """``k`` sampled responses per prompt, prompt by prompt (``k * len(prompts)`` rollouts), generated in batches
    of ``batch_size`` rows. Batch b samples with seed ``params.seed + b`` (a fixed seed makes rollouts repeatable).
    The engine runs without stop ids so that the stop token each row drew is seen; a batch ends once every row
    has stopped, as the engine would end it. ``advance(n)`` (a progress bar's ``update``), if given, is told after
    each generated token of the ``n`` responses it finished, and at a batch's end of those cut at max_new_tokens."""
    images = split_images(
        prompts,
        pixel_values,
        image_grid_hws,
        model.config.media_placeholder_token_id,
        model.config.vision_config.merge_kernel_size,
    )
    rows = [i for i in range(len(prompts)) for _ in range(k)]
    stop = set(stop_ids)
    out: list[Rollout] = []
    for b, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start : start + batch_size]
        pv, grids = _pack_images([images[i] for i in chunk])
        seed = None if params.seed is None else params.seed + b
        sampling = SamplingParams(params.max_new_tokens, params.temperature, params.top_k, params.top_p, seed)
        ids: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        steps = stream_ids(model, [prompts[i] for i in chunk], pv, grids, sampling)
        for step in steps:
            finished = 0
            for r, token in enumerate(step):
                if not done[r]:
                    ids[r].append(token)
                    done[r] = token in stop
                    finished += done[r]
            if advance is not None:
                advance(finished)  # 0 too: a bar's clock goes on while no answer has finished
            if all(done):
                steps.close()
                break
        if advance is not None and not all(done):  # the rows cut at max_new_tokens
            advance(done.count(False))
        for i, row_ids, stopped in zip(chunk, ids, done):
            out.append(Rollout(i, row_ids, processor.decode(row_ids), stopped))
    return out


def _forward(model, ids: torch.Tensor, prompt_lengths: list[int], cu: torch.Tensor, pixel_values, grids):
    """Final hidden states (1, T, D) of a packed row. A response may hold the image placeholder id (a sampled token
    like any other): it is embedded as the plain token, as during generation, and only prompt placeholders take
    image features."""
    placeholder = model.config.media_placeholder_token_id
    in_response = torch.zeros_like(ids, dtype=torch.bool)
    bounds = cu.tolist()
    for start, end, n in zip(bounds[:-1], bounds[1:], prompt_lengths):
        in_response[0, start + n : end] = True
    sampled = in_response & (ids == placeholder)
    device = ids.device
    embeds = model.embed(
        ids.masked_fill(sampled, 0),
        pixel_values.to(device) if pixel_values is not None else None,
        grids.to(device) if grids is not None else None,
    )
    if sampled.any():
        embeds = torch.where(sampled[..., None], model.language_model.model.embed_tokens(ids), embeds)
    return model.language_model(embeds, cu_seqlens=cu)


def token_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pixel_values: torch.Tensor | None = None,
    image_grid_hws: torch.Tensor | None = None,
    budget: int = 4096,
    advance: Callable[[int], object] | None = None,
) -> list[torch.Tensor]:
    """log pi(y_t | x, y_<t) for every response token (float32, one tensor per sample), from teacher-forced
    forwards over rows packed with ``cu_seqlens`` up to ``budget`` tokens (a longer sample gets a row of its own).
    Gradients flow unless called under ``torch.no_grad``. Prompt and image tokens get no log-prob. ``advance(n)``,
    if given, is told of the ``n`` samples of each row done."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not all(prompts):
        raise ValueError("every prompt needs at least one token")
    images = split_images(
        prompts,
        pixel_values,
        image_grid_hws,
        model.config.media_placeholder_token_id,
        model.config.vision_config.merge_kernel_size,
    )
    device = model.device
    out: list[torch.Tensor] = []
    for row in pack_rows([len(p) + len(r) for p, r in zip(prompts, responses)], budget):
        seqs = [list(prompts[i]) + list(responses[i]) for i in row]
        cu = torch.tensor([0] + [len(s) for s in seqs], device=device).cumsum(0).to(torch.int32)
        ids = torch.tensor([[t for s in seqs for t in s]], device=device)
        pv, grids = _pack_images([images[i] for i in row])
        hidden_TD = _forward(model, ids, [len(prompts[i]) for i in row], cu, pv, grids)[0]
        # the hidden state at position p predicts token p + 1
        starts = [int(cu[j]) + len(prompts[i]) for j, i in enumerate(row)]
        lengths = [len(responses[i]) for i in row]
        at = torch.cat([torch.arange(a, a + n, device=device) for a, n in zip(starts, lengths)])
        logp = target_logprobs(hidden_TD[at - 1], model.language_model.lm_head, ids[0, at])
        out.extend(logp.split(lengths))
        if advance is not None:
            advance(len(row))
    return out


def pack_rows(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive indices grouped into rows of at most ``budget`` tokens (a longer item gets a row alone)."""
    rows: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if not rows or used + n > budget:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def sequence_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pixel_values: torch.Tensor | None = None,
    image_grid_hws: torch.Tensor | None = None,
    budget: int = 4096,
) -> torch.Tensor:
    """log pi(y | x) = sum over response tokens of log pi(y_t | x, y_<t), one per sample: (N,)."""
    per_token = token_logprobs(model, prompts, responses, pixel_values, image_grid_hws, budget)
    return torch.stack([t.sum() for t in per_token]) if per_token else torch.zeros(0)
