"""Which problems an RL iteration trains on: a curriculum by difficulty label and prioritised sampling.

The curriculum maps training progress (0 at the first iteration, 1 at the end) to weights per difficulty: the
phase in force is the one with the largest start <= progress, e.g. ``{0.0: {easy: 1}, 0.3: {easy: 1, medium: 1},
0.6: {easy: 1, medium: 1, hard: 2}}``. A difficulty is drawn by its weight (labels without problems drop out),
then a problem of that difficulty with probability proportional to its priority, from its running success rate s:

- ``failure``: max(floor, 1 - s), a problem never tried counting as s = 0. Problems never solved get the most
  weight, though all k samples of one are wrong and so give no advantage to learn from.
- ``signal``: max(floor, 4 s (1 - s)), a problem never tried counting as s = 1/2 (priority 1, the most, so it gets
  explored). Highest where the policy solves a problem sometimes (a group of samples with both rewards, which is
  where RL has signal), lowest (the floor) for problems never or always solved.

The rate is an exponential average over visits (``decay`` of the old value), the first visit setting it outright,
so it follows a policy that improves. Without a curriculum, labels are ignored: P(i) is proportional to the
priority over all problems. A batch never repeats a problem.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kimivl.data.synthetic.sample import DIFFICULTIES
from kimivl.inference.sampling import seeded_generator

log = logging.getLogger(__name__)
PRIORITIES = ("failure", "signal")


def check_curriculum(curriculum: Any) -> None:
    """A curriculum (an RL stage's ``curriculum``): phases keyed by the progress where they start, numbers in
    [0, 1) (progress runs from 0 at the first iteration towards 1 at the end) one of them 0, each mapping some of
    ``DIFFICULTIES`` to finite weights >= 0 with a positive sum; a ``ValueError`` naming the phase otherwise."""
    if curriculum is None:
        return
    if not isinstance(curriculum, dict):
        raise ValueError(f"curriculum maps the progress where each phase starts to its weights, got {curriculum!r}")
    for start, weights in curriculum.items():
        if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 <= start < 1:
            raise ValueError(
                f"curriculum phase {start!r}: a phase is keyed by the progress where it starts, a number in [0, 1) "
                "(0 the first iteration, 1 the end of the stage)"
            )
        if not isinstance(weights, dict):
            raise ValueError(f"curriculum phase {start}: a phase maps difficulties to weights, got {weights!r}")
        unknown = sorted(map(str, set(weights) - set(DIFFICULTIES)))
        if unknown:
            raise ValueError(
                f"curriculum phase {start}: unknown difficulties {unknown}; a phase weighs some of {list(DIFFICULTIES)}"
            )
        numbers = all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights.values())
        if not (numbers and all(0 <= w < math.inf for w in weights.values()) and 0 < sum(weights.values()) < math.inf):
            raise ValueError(
                f"curriculum phase {start}: weights must be finite numbers >= 0 with a positive sum, got {weights!r}"
            )
    if curriculum and 0 not in curriculum:
        raise ValueError(f"the curriculum must start at progress 0, got {sorted(curriculum)}")


def check_rates(floor: float, decay: float) -> None:
    """The sampler's ``floor`` (an RL stage's ``priority_floor``) in (0, 1] and ``decay`` (``success_decay``) in
    [0, 1); a ``ValueError`` naming what the value would do otherwise."""
    if not 0 < floor <= 1:
        raise ValueError(
            f"priority_floor must lie in (0, 1], got {floor}: it is the least priority of a problem (0 would never "
            "draw again the problems at the floor, such as those always solved)"
        )
    if not 0 <= decay < 1:
        raise ValueError(
            f"success_decay must lie in [0, 1), got {decay}: it is the weight of a problem's old success rate (1 "
            "would keep the rate of its first visit for ever)"
        )


class ProblemSampler:
    def __init__(
        self,
        difficulties: Sequence[str],
        curriculum: dict[float, dict[str, float]] | None = None,
        floor: float = 0.05,
        decay: float = 0.5,
        seed: int = 0,
        priority: str = "failure",
        warn: Callable[..., None] | None = None,
    ):
        """``warn`` (default: this module's ``log.warning``) is told of problems the curriculum never draws."""
        if priority not in PRIORITIES:
            raise ValueError(f"sampler priority must be one of {PRIORITIES}, got {priority!r}")
        if not difficulties:
            raise ValueError("the sampler needs at least one problem")
        check_rates(floor, decay)
        check_curriculum(curriculum)
        self.difficulties = list(difficulties)
        self.labels = sorted(set(self.difficulties))
        self.index = {d: i for i, d in enumerate(self.labels)}  # dicts, not list lookups: thousands of labels
        self.label = torch.tensor([self.index[d] for d in self.difficulties])  # each problem's label's index
        self.curriculum = {float(k): dict(v) for k, v in sorted((curriculum or {}).items())}
        for start, weights in self.curriculum.items():
            if not any(w > 0 and d in self.index for d, w in weights.items()):
                raise ValueError(
                    f"curriculum phase {start} gives no weight to any difficulty present ({', '.join(self.labels)})"
                )
        weighed = {d for weights in self.curriculum.values() for d, w in weights.items() if w > 0}
        never = Counter(d for d in self.difficulties if self.curriculum and d not in weighed)
        if never:  # a label may be left out on purpose, but "Easy" or a missing one is more likely a slip
            (warn or log.warning)(
                "the curriculum never draws %d of the %d problems: no phase weighs their difficulties (%s; 'any' is "
                "a problem without meta.difficulty), and a phase weighs some of %s",
                never.total(),
                len(self.difficulties),
                ", ".join(
                    [f"{d}: {n}" for d, n in sorted(never.items())[:10]]
                    + [f"{len(never) - 10} other difficulties"] * (len(never) > 10)
                ),
                list(DIFFICULTIES),
            )
        self.floor, self.decay, self.priority = floor, decay, priority
        self.success = torch.zeros(len(difficulties), dtype=torch.float64)
        self.visits = torch.zeros(len(difficulties), dtype=torch.int64)
        self.generator = seeded_generator(seed)

    def weights(self, progress: float) -> dict[str, float]:
        """The curriculum's difficulty weights in force at ``progress`` (empty without a curriculum)."""
        if not self.curriculum:
            return {}
        start = max((s for s in self.curriculum if s <= progress), default=0.0)
        return {d: float(w) for d, w in self.curriculum[start].items() if d in self.index}

    def priorities(self) -> torch.Tensor:
        """Each problem's priority (N,) by the ``priority`` mode (see the module docstring)."""
        if self.priority == "failure":
            return (1 - self.success).clamp_min(self.floor)
        rate = torch.where(self.visits > 0, self.success, torch.full_like(self.success, 0.5))
        return (4 * rate * (1 - rate)).clamp_min(self.floor)

    def probabilities(self, progress: float) -> torch.Tensor:
        """P(problem i is drawn first) at ``progress``: (N,), summing to 1."""
        prio = self.priorities()
        if not self.curriculum:
            return prio / prio.sum()
        weights = self.weights(progress)
        share = torch.tensor([weights.get(d, 0.0) for d in self.labels], dtype=torch.float64)
        share = share / share.sum()
        per_label = torch.zeros(len(self.labels), dtype=torch.float64).index_add_(0, self.label, prio)
        return share[self.label] * prio / per_label[self.label]

    def sample(self, n: int, progress: float) -> list[int]:
        """``n`` distinct problem indices (fewer if fewer problems have non-zero probability)."""
        probs = self.probabilities(progress)
        n = min(n, int((probs > 0).sum()))
        return torch.multinomial(probs, n, replacement=False, generator=self.generator).tolist()

    def update(self, indices: Sequence[int], success: Sequence[float]) -> None:
        """Fold each problem's share of correct samples this iteration into its running success rate."""
        for i, s in zip(indices, success):
            old = self.success[i] if self.visits[i] else torch.tensor(float(s), dtype=torch.float64)
            self.success[i] = self.decay * old + (1 - self.decay) * float(s)
            self.visits[i] += 1

    def state_dict(self) -> dict:
        return {"success": self.success.clone(), "visits": self.visits.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["success"].shape != self.success.shape:
            raise ValueError(
                f"sampler state holds {len(state['success'])} problems, this sampler "
                f"{len(self.success)}: resume with the same problem sources"
            )
        self.success, self.visits = state["success"].clone(), state["visits"].clone()
        self.generator.set_state(state["generator"])
