"""Held-out loss during a stage: fixed packed rows drawn from the stage's ``val`` sources, scored every few steps."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kimivl.data.mixture import Mixture
from kimivl.data.packing import PackedBatch
from kimivl.precision import autocast
from kimivl.processing.processor import IGNORE_INDEX, Encoded
from kimivl.train.loop import to_device


def heldout_rows(
    sources: dict[str, Sequence[Any]],
    encode: Callable[[str, Any], Encoded],
    budget: int,
    rows: int,
    seed: int = 0,
    fewest: Callable[[str, Any], int] | None = None,
) -> list[PackedBatch]:
    """The first ``rows`` rows of ``budget`` tokens packed from ``sources`` (equally weighted, seeded, no record twice
    before every record once): the same rows at every evaluation, and in a resumed run. ``fewest`` as ``Mixture``'s."""
    weights = {name: 1.0 for name in sources}
    mixture = Mixture(sources, encode, budget, weights, seed=seed, replacement=False, fewest=fewest)
    return [row for row, _ in itertools.islice(mixture.batches(0), rows)]


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, rows: list[PackedBatch], bf16: bool | None = None) -> float:
    """Mean next-token cross-entropy over every scored position of ``rows``, under training's autocast (``bf16`` as in
    ``LoopConfig``)."""
    total, count = 0.0, 0
    training = model.training
    model.eval()
    try:
        for row in rows:
            row = to_device(row, model.device)
            with autocast(model.device, bf16):
                loss = model(**row.kwargs()).loss
            scored = int((row.labels[..., 1:] != IGNORE_INDEX).sum())
            total, count = total + loss.item() * scored, count + scored
    finally:
        model.train(training)
    if not count:
        raise ValueError("the validation rows score no token: give val sources with answers or text")
    return total / count
