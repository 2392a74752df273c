"""Choosing the next token from logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import dataclasses
import hashlib
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from kimivl.finite import finite

# Below this a temperature divides float32 logits towards overflow (a denormal one gives inf and NaN probabilities);
# 0 is the way to ask for greedy decoding.
MIN_TEMPERATURE = 1e-4
MAX_SEED = 2**64 - 1


def seeded_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator for ``seed`` in [0, 2**64). A CPU generator keeps only the low 32 bits of a seed, so a seed of
    2**32 or more is first hashed down to 32 bits (seed and seed + 2**32 then draw differently); smaller seeds are
    used as they are."""
    if seed >= 2**32:
        seed = int.from_bytes(hashlib.blake2b(seed.to_bytes(8, "little"), digest_size=4).digest(), "little")
    return torch.Generator(device=device).manual_seed(seed)


class SamplingError(ValueError):
    """A sampling setting that cannot work, or logits that cannot be sampled from."""


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)  # numpy's integers too


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and finite(v)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        t = self.temperature
        if not _is_real(t) or t < 0 or 0 < t < MIN_TEMPERATURE:
            raise SamplingError(
                f"temperature must be >= 0: 0 (greedy) or a finite number of at least {MIN_TEMPERATURE}, got {t!r}"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1] (a number), got {self.top_p!r}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed <= MAX_SEED):
            raise SamplingError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        self.max_new_tokens, self.top_k = int(self.max_new_tokens), int(self.top_k)  # numpy's numbers as Python's
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        self.seed = None if self.seed is None else int(self.seed)

    @classmethod
    def from_kwargs(cls, **sampling) -> SamplingParams:
        """Settings given as keyword arguments; an unknown name is a ``SamplingError`` listing the known ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(sampling) - set(names))
        if unknown:
            raise SamplingError(
                f"unknown sampling setting{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                f"the settings are {', '.join(names)}"
            )
        return cls(**sampling)


def check_logits(logits_BV: torch.Tensor, temperature: float = 0.0) -> None:
    """A ``SamplingError`` unless every row of ``logits_BV`` (B, V) has a token to choose: no NaN, no +inf (softmax
    over it is NaN, argmax meaningless) and at least one finite logit (all -inf: every token masked out). -inf beside
    finite logits is a mask, and fine. ``temperature``: the logits were divided by it (under 1, finite logits may have
    overflowed float32). One reduction when all is well (a row's max is finite exactly then: max propagates NaN); the
    rest only names what is wrong."""
    if bool(torch.isfinite(logits_BV.amax(-1)).all()):
        return
    if bool(torch.isnan(logits_BV).any()):
        raise SamplingError(
            "the model's logits hold NaN: its weights (or inputs) are not finite; check the "
            "checkpoint (loading it warns about NaN/inf tensors)"
        )
    limit = torch.finfo(torch.float32).max * temperature
    scaled = f" (or logits beyond +-{limit:.2g}, which overflow once divided by temperature {temperature:g})"
    scaled = scaled if 0 < temperature < 1 else ""
    rows = (logits_BV == float("inf")).any(-1).nonzero().flatten().tolist()
    if rows:
        raise SamplingError(
            f"the model's logits hold +inf (row {', '.join(map(str, rows))}){scaled}: no token can be chosen from "
            "them; the model overflowed (float16?) or its weights are not finite"
        )
    rows = (~torch.isfinite(logits_BV).any(-1)).nonzero().flatten().tolist()  # what is left: rows all -inf
    raise SamplingError(
        f"row {', '.join(map(str, rows))} of the logits holds no finite value (all -inf){scaled}: every token is "
        "masked out, so none can be chosen"
    )


def sample_next(
    logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V); -inf logits are masked out. Logits holding NaN or +inf,
    or a row with no finite logit, are a ``SamplingError`` (``check_logits``)."""
    if params.temperature == 0:
        check_logits(logits_BV)
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / params.temperature
    check_logits(logits_BV, params.temperature)  # after dividing: top-k and top-p keep a finite logit in every row
    if params.top_k:
        kth = logits_BV.topk(min(params.top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if params.top_p < 1:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True, stable=True)  # ties: lowest id first, as argmax
        probs_BV = sorted_BV.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_BV = probs_BV.cumsum(-1) - probs_BV >= params.top_p
        logits_BV = logits_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    return torch.multinomial(logits_BV.softmax(-1), 1, generator=generator).squeeze(-1)
