"""Reasoning problems for long-CoT SFT and RL: rendered arithmetic or geometry, each with a worked solution."""

from __future__ import annotations

import random

from kimivl.data.synthetic.arithmetic import make_arithmetic
from kimivl.data.synthetic.geometry import make_geometry
from kimivl.data.synthetic.sample import Sample


def make_reasoning(rng: random.Random, difficulty: str | None = None) -> Sample:
    """An arithmetic expression (60%) or a geometry figure (40%); ``meta['kind']`` says which."""
    return (make_arithmetic if rng.random() < 0.6 else make_geometry)(rng, difficulty)
