"""Choosing the next token from logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if params.temperature == 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / params.temperature
    if params.top_k:
        kth = logits_BV.topk(min(params.top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if params.top_p < 1:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_BV = probs_BV.cumsum(-1) - probs_BV >= params.top_p
        logits_BV = logits_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    return torch.multinomial(logits_BV.softmax(-1), 1, generator=generator).squeeze(-1)
