"""Learning-rate multipliers as pure functions of the global step, for ``torch.optim.lr_scheduler.LambdaLR``.

A multiplier depends on the step alone, so resuming needs only the step: restore the scheduler's state_dict, or
build ``scheduler_at(optimizer, schedule, step)`` (also how a later stage, with a new optimizer, continues the
schedule of the one before). Multipliers are dataclasses of plain fields, not lambdas: the scheduler's state_dict
records a callable object's fields (a lambda's as None), so a resume can compare them with the run's. Warm-up is
linear, (step + 1) / warmup_steps, so step 0 already trains and step warmup_steps - 1 reaches the peak.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps


def _check(**counts: int) -> None:
    for name, value in counts.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``; ``min_ratio`` after that."""

    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.0

    def __post_init__(self):
        _check(warmup_steps=self.warmup_steps, decay_steps=self.total_steps - self.warmup_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps)
        span = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / span) if span else 1.0
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


DECAY_SHAPES = {
    "linear": lambda x: 1 - x,
    "cosine": lambda x: 0.5 * (1 + math.cos(math.pi * x)),
    "sqrt": lambda x: 1 - math.sqrt(x),
}


@dataclass(frozen=True)
class WSD:
    """Warm-up, stable at 1 for ``stable_steps``, then decay to ``min_ratio`` over ``decay_steps`` with shape
    ``linear``, ``cosine`` or ``sqrt`` (1 - sqrt(x)); ``min_ratio`` after that."""

    warmup_steps: int
    stable_steps: int
    decay_steps: int
    min_ratio: float = 0.0
    shape: str = "linear"

    def __post_init__(self):
        _check(warmup_steps=self.warmup_steps, stable_steps=self.stable_steps, decay_steps=self.decay_steps)
        if self.shape not in DECAY_SHAPES:
            raise ValueError(f"WSD shape must be one of {sorted(DECAY_SHAPES)}, got {self.shape!r}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps)
        into_decay = step - self.warmup_steps - self.stable_steps
        if into_decay < 0:
            return 1.0
        progress = min(1.0, into_decay / self.decay_steps) if self.decay_steps else 1.0
        return self.min_ratio + (1 - self.min_ratio) * DECAY_SHAPES[self.shape](progress)


@dataclass(frozen=True)
class WSDFrom(WSD):
    """``WSD`` read from its global step ``offset`` on: the multiplier of a stage that starts there on the
    recipe-wide curve. Its fields are plain numbers and a string, so the scheduler's state_dict records them and a
    resume can tell whether the curve or the stage's place on it changed (a lambda is recorded as None)."""

    offset: int = 0

    def __post_init__(self):
        super().__post_init__()
        _check(offset=self.offset)

    def __call__(self, step: int) -> float:
        return super().__call__(self.offset + step)


def scheduler_at(optimizer: Optimizer, schedule: Callable[[int], float], step: int = 0) -> LambdaLR:
    """``LambdaLR`` positioned so that the next ``optimizer.step()`` runs at ``base lr * schedule(step)``."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return LambdaLR(optimizer, schedule, last_epoch=step - 1)
