"""The README comparison of RL runs: held-out accuracy and answer length before and after RL, from each run's
``out/eval/{base,<stage>}.json`` and ``.lengths.json`` (written when the recipe has ``eval: {base: true, after:
[<stage>]}``).

    python -m kimivl.rl.compare runs/kimivl-tiny-rl runs/kimivl-tiny-rl-nolen runs/kimivl-tiny-rl-grpo
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _read(run: Path, name: str) -> dict:
    path = run / "eval" / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the recipe (with eval base: true and after: [rl]) first")
    return json.loads(path.read_text())


def comparison_table(runs: list[str | os.PathLike], stage: str = "rl", task: str = "reasoning") -> str:
    """One markdown row per run: accuracy and mean answer tokens on ``task`` before and after ``stage``."""
    lines = [f"| run | {task} accuracy before → after | mean answer tokens before → after |", "|---|---|---|"]
    for run in map(Path, runs):
        before, after = _read(run, "base")[task], _read(run, stage)[task]
        len_before, len_after = _read(run, "base.lengths")[task], _read(run, f"{stage}.lengths")[task]
        change = 100 * (len_after - len_before) / len_before if len_before else float("nan")
        lines.append(
            f"| {run.name} | {100 * before:.1f}% → {100 * after:.1f}% | "
            f"{len_before:.1f} → {len_after:.1f} ({change:+.0f}%) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(comparison_table(sys.argv[1:]))
