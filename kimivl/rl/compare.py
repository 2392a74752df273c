"""The README comparison of RL runs: held-out accuracy and answer length before and after RL, per arm (runs of one
recipe with different seeds) as a mean with a 95% interval, from each run's ``out/eval/{base,<stage>}.json``,
``.lengths.json`` and ``.predictions.jsonl`` (written when the recipe has ``eval: {base: true, after: [<stage>]}``).

    python -m kimivl.rl.compare --arm opmd=runs/a-s0,runs/a-s1,runs/a-s2 --arm grpo=runs/g-s0,runs/g-s1,runs/g-s2
    python -m kimivl.rl.compare runs/kimivl-tiny-rl runs/kimivl-tiny-rl-grpo     (each run an arm of one seed)
    python -m kimivl.rl.compare --by-difficulty --arm ...     (accuracy per meta.difficulty, from the predictions)

Intervals:
- Two or more seeds: a t-interval across seeds, mean ± t(0.975, m - 1) · sd / sqrt(m), with m seeds and sd their
  sample standard deviation (divisor m - 1); for accuracy before and after (kept within [0, 1]), the change in
  points (after - before, seed by seed) and mean answer tokens. It measures the seed-to-seed spread, not the finite
  number of problems.
- One seed: accuracy gets the Wilson score interval of a binomial with n = the number of problems scored
  (``<stage>.predictions.jsonl``): (p + z²/2n ± z · sqrt(p(1 - p)/n + z²/4n²)) / (1 + z²/n), z = 1.96. The change
  and answer tokens have no interval then.

``--by-difficulty`` gives one row per arm and difficulty instead, the accuracy recomputed from each run's
predictions (rows with ``difficulty``, written by the pipeline from ``meta.difficulty``), before, after and the change,
with the same intervals (Wilson with n = that difficulty's problems for one seed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from kimivl.exits import run_command
from kimivl.terminal import printable, table_cell

Z95 = statistics.NormalDist().inv_cdf(0.975)
Interval = tuple[float, float, float] | tuple[float, None, None]  # (mean, low, high); no interval: (mean, None, None)


def _read(run: Path, name: str) -> dict[str, float]:
    """``run/eval/<name>.json``: a number per task; a damaged file (not JSON, not an object of finite numbers) is a
    ``ValueError`` naming it."""
    path = run / "eval" / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the recipe (with eval base: true and after: [rl]) first")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is damaged ({e}): evaluate the run again") from None
    numbers = isinstance(values, dict) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values.values()
    )
    if not numbers:
        raise ValueError(
            f"{path} is damaged: it holds {json.dumps(values)[:60]}, not an object of one number per task "
            "(as the pipeline writes it): evaluate the run again"
        )
    return values


def _rows(path: Path) -> list[dict]:
    """The predictions of ``path`` (JSONL, split at newlines only, as eval writes and reads it: ``parse_line``), each an
    object with a ``task``; a damaged line is a ``ValueError`` naming the file and line."""
    from kimivl.data.formats import DataError, parse_line  # here: kimivl.data imports PIL (0.15 s for a table)

    rows = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            row, why = parse_line(raw, where), "not an object with a task"
        except DataError as e:
            row, why = None, str(e).removeprefix(f"{where}: ")
        if not (isinstance(row, dict) and isinstance(row.get("task"), str)):
            raise ValueError(f"{where} is damaged ({why}): evaluate the run again")
        rows.append(row)
    return rows


def _problems(run: Path, stage: str, task: str) -> int:
    path = run / "eval" / f"{stage}.predictions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a single seed's interval needs the number of problems scored")
    n = sum(task in ("all", r["task"]) for r in _rows(path))
    if not n:
        raise ValueError(f"{path} holds no predictions of task {task!r}")
    return n


def t_quantile(df: int, p: float = 0.975) -> float:
    """The ``p`` quantile (p > 1/2) of Student's t with integer ``df`` degrees of freedom, by bisection on the
    closed form of P(|T| <= t) for integer df (Abramowitz & Stegun 26.7.3-4)."""
    if df < 1 or not 0.5 < p < 1:
        raise ValueError(f"need df >= 1 and 1/2 < p < 1, got df={df}, p={p}")

    def within(t: float) -> float:
        theta = math.atan(t / math.sqrt(df))
        s, c2 = math.sin(theta), math.cos(theta) ** 2
        if df % 2 == 0:  # sin θ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ... up to cos^(df-2) θ)
            term = total = 1.0
            for i in range(1, df // 2):
                term *= c2 * (2 * i - 1) / (2 * i)
                total += term
            return s * total
        series = 0.0  # 2/π (θ + sin θ (cos θ + 2/3 cos³θ + ... up to cos^(df-2) θ)), the series empty for df = 1
        term = math.cos(theta)
        for i in range(1, (df - 1) // 2 + 1):
            series += term
            term *= c2 * (2 * i) / (2 * i + 1)
        return 2 / math.pi * (theta + s * series)

    low, high = 0.0, 1.0
    while within(high) < 2 * p - 1:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if within(mid) < 2 * p - 1 else (low, mid)
    return (low + high) / 2


def t_interval(values: Sequence[float]) -> Interval:
    """Mean and 95% t-interval of ``values`` (at least two)."""
    mean = statistics.fmean(values)
    half = t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _clamped(value: Interval, lowest: float = 0.0) -> Interval:
    """An accuracy's interval within [0, 1], a change's within [-1, 1] (``lowest`` -1): a t-interval can reach past
    either end."""
    mean, low, high = value
    return value if low is None else (mean, max(lowest, low), min(1.0, high))


def _named(runs: Sequence[str | os.PathLike]) -> dict[str, list[str | os.PathLike]]:
    """Each run an arm of one seed, named after its directory; two runs of one name (or one run twice) are a
    ``ValueError``, since one would hide the other."""
    arms: dict[str, list[str | os.PathLike]] = {}
    for r in runs:
        name = Path(r).name
        if name in arms:
            raise ValueError(f"two runs are named {name!r} ({arms[name][0]}, {r}): give them as --arm NAME=DIR")
        arms[name] = [r]
    return arms


def wilson(p: float, n: int, z: float = Z95) -> Interval:
    """A proportion ``p`` of ``n`` trials with its Wilson score interval."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p, max(0.0, centre - half), min(1.0, centre + half)


def arm_summary(runs: Sequence[str | os.PathLike], stage: str = "rl", task: str = "reasoning") -> dict[str, Interval]:
    """``seeds`` and, each as (mean, low, high): ``before`` and ``after`` (accuracy in [0, 1]), ``change``
    (after - before, in [-1, 1]), ``tokens_before`` and ``tokens_after`` (mean answer tokens)."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise ValueError("an arm needs at least one run directory")
    columns = {
        "before": [_read(r, "base")[task] for r in runs],
        "after": [_read(r, stage)[task] for r in runs],
        "tokens_before": [_read(r, "base.lengths")[task] for r in runs],
        "tokens_after": [_read(r, f"{stage}.lengths")[task] for r in runs],
    }
    columns["change"] = [a - b for a, b in zip(columns["after"], columns["before"])]
    if len(runs) > 1:
        out = {k: t_interval(v) for k, v in columns.items()}
        out["before"], out["after"], out["change"] = (
            _clamped(out["before"]),
            _clamped(out["after"]),
            _clamped(out["change"], -1.0),
        )
        return {"seeds": len(runs), **out}
    out = {k: (v[0], None, None) for k, v in columns.items()}
    out["before"] = wilson(columns["before"][0], _problems(runs[0], "base", task))
    out["after"] = wilson(columns["after"][0], _problems(runs[0], stage, task))
    return {"seeds": 1, **out}


def _predictions(run: Path, stage: str, task: str) -> list[dict]:
    path = run / "eval" / f"{stage}.predictions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: accuracy by difficulty is computed from the predictions")
    rows = [r for r in _rows(path) if task in ("all", r["task"])]
    if not rows:
        raise ValueError(f"{path} holds no predictions of task {task!r}")
    if any(r.get("difficulty") is None for r in rows):
        raise ValueError(
            f"{path} has predictions without a difficulty (written before predictions carried meta.difficulty, or "
            "from problems without one): evaluate again to compare by difficulty"
        )
    if wrong := [r["difficulty"] for r in rows if not isinstance(r["difficulty"], str)]:
        raise ValueError(
            f"{path} has a prediction whose difficulty is of type {type(wrong[0]).__name__}: a difficulty is a "
            'label, a string such as "easy" (fix meta.difficulty in the problems and evaluate again)'
        )
    return rows


def _by_difficulty(rows: Sequence[dict]) -> dict[str, tuple[float, int]]:
    """Accuracy and number of problems per difficulty, in order easy, medium, hard, then any other by name."""
    order = {"easy": 0, "medium": 1, "hard": 2}
    names = sorted({r["difficulty"] for r in rows}, key=lambda d: (order.get(d, 3), d))
    out = {}
    for name in names:
        mine = [bool(r["correct"]) for r in rows if r["difficulty"] == name]
        out[name] = (sum(mine) / len(mine), len(mine))
    return out


def difficulty_summary(
    runs: Sequence[str | os.PathLike], stage: str = "rl", task: str = "reasoning"
) -> dict[str, dict[str, Interval | int]]:
    """Per difficulty: ``problems`` (scored per run) and, each as (mean, low, high), ``before``, ``after`` (accuracy
    in [0, 1]) and ``change`` (after - before); t-intervals across seeds, Wilson for one seed (no interval for the
    change then). Every run must have scored the same number of problems of each difficulty."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise ValueError("an arm needs at least one run directory")
    before = [_by_difficulty(_predictions(r, "base", task)) for r in runs]
    after = [_by_difficulty(_predictions(r, stage, task)) for r in runs]
    shape = {d: n for d, (_, n) in before[0].items()}
    for run, b, a in zip(runs, before, after):
        for got in (b, a):
            if {d: n for d, (_, n) in got.items()} != shape:
                raise ValueError(
                    f"{run} scored other problems than {runs[0]} (by difficulty: {shape}); compare runs evaluated "
                    "on the same problems"
                )
    out: dict[str, dict[str, Interval | int]] = {}
    for d, n in shape.items():
        cols = {"before": [b[d][0] for b in before], "after": [a[d][0] for a in after]}
        cols["change"] = [x - y for x, y in zip(cols["after"], cols["before"])]
        if len(runs) > 1:
            out[d] = {"problems": n, **{k: t_interval(v) for k, v in cols.items()}}
            out[d]["before"], out[d]["after"] = _clamped(out[d]["before"]), _clamped(out[d]["after"])
            out[d]["change"] = _clamped(out[d]["change"], -1.0)
        else:
            out[d] = {
                "problems": n,
                "before": wilson(cols["before"][0], n),
                "after": wilson(cols["after"][0], n),
                "change": (cols["change"][0], None, None),
            }
    return out


def difficulty_table(
    arms: Mapping[str, Sequence[str | os.PathLike]] | Sequence[str | os.PathLike],
    stage: str = "rl",
    task: str = "reasoning",
) -> str:
    """One markdown row per arm and difficulty: problems, accuracy before and after ``stage`` and its change in
    points, with 95% intervals (see the module docstring)."""
    if not isinstance(arms, Mapping):
        arms = _named(arms)
    lines = [
        f"| arm | seeds | difficulty | problems | {task} accuracy before | after | change (points) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in arms.items():
        for d, s in difficulty_summary(runs, stage, task).items():
            lines.append(
                f"| {table_cell(name)} | {len(runs)} | {table_cell(d)} | {s['problems']} | "
                f"{_cell(s['before'], 100, '.1f', '%')} | {_cell(s['after'], 100, '.1f', '%')} | "
                f"{_cell(s['change'], 100, '+.1f')} |"
            )
    return "\n".join(lines)


def _cell(value: Interval, scale: float, fmt: str, unit: str = "") -> str:
    mean, low, high = value
    text = f"{scale * mean:{fmt}}{unit}"
    return text if low is None else f"{text} [{scale * low:{fmt}}, {scale * high:{fmt}}]"


def comparison_table(
    arms: Mapping[str, Sequence[str | os.PathLike]] | Sequence[str | os.PathLike],
    stage: str = "rl",
    task: str = "reasoning",
) -> str:
    """One markdown row per arm (a mapping name -> run directories; a plain list of runs makes each run an arm named
    after its directory): mean accuracy on ``task`` before and after ``stage``, its change in points and mean
    answer tokens, with 95% intervals (see the module docstring)."""
    if not isinstance(arms, Mapping):
        arms = _named(arms)
    lines = [
        f"| arm | seeds | {task} accuracy before | after | change (points) | answer tokens before | after |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in arms.items():
        s = arm_summary(runs, stage, task)
        before = s["tokens_before"][0]
        length_change = f"{100 * (s['tokens_after'][0] / before - 1):+.0f}%" if before else "n/a"  # answers were empty
        lines.append(
            f"| {table_cell(name)} | {s['seeds']} | {_cell(s['before'], 100, '.1f', '%')} | "
            f"{_cell(s['after'], 100, '.1f', '%')} | {_cell(s['change'], 100, '+.1f')} | "
            f"{_cell(s['tokens_before'], 1, '.1f')} | "
            f"{_cell(s['tokens_after'], 1, '.1f')} ({length_change}) |"
        )
    return "\n".join(lines)


def _arm(text: str) -> tuple[str, list[str]]:
    name, sep, runs = text.partition("=")
    dirs = [r for r in runs.split(",") if r.strip()]
    if not sep or not name.strip() or not dirs:
        raise argparse.ArgumentTypeError(f"--arm takes NAME=DIR[,DIR...], got {text!r}")
    return name.strip(), dirs


PROG = "python -m kimivl.rl.compare"


def main(argv: list[str] | None = None) -> int:
    """The command; Ctrl-C exits 130 with one line, stdout's reader gone (``| head``) 141, quietly."""
    return run_command(PROG, lambda: _run(argv))


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help="run directories, each an arm of one seed")
    parser.add_argument("--arm", type=_arm, action="append", default=[], help="NAME=DIR[,DIR...]: one arm's seeds")
    parser.add_argument("--stage", default="rl", help="the stage evaluated after (default rl)")
    parser.add_argument("--task", default="reasoning", help="the task compared (default reasoning; 'all' for all)")
    parser.add_argument(
        "--by-difficulty", action="store_true", help="accuracy per meta.difficulty (from the predictions) instead"
    )
    args = parser.parse_args(argv)
    try:
        arms = _named(args.runs)
    except ValueError as e:
        parser.error(printable(e))
    for name, runs in args.arm:
        if name in arms:
            parser.error(f"arm {name!r} is given twice")
        if len({Path(r).resolve() for r in runs}) < len(runs):
            parser.error(f"arm {name!r} names one run twice: each seed's run once")
        arms[name] = runs
    if not arms:
        parser.error("give run directories, or arms as --arm NAME=DIR,DIR,...")
    try:
        table = difficulty_table if args.by_difficulty else comparison_table
        text = table(arms, args.stage, args.task)
    except (ValueError, KeyError, OSError) as e:
        parser.error(printable(e) if not isinstance(e, KeyError) else f"no {e} in a run's eval files (--task, --stage)")
    print(text)  # outside the errors above: stdout's reader gone is no error of the runs
    return 0


if __name__ == "__main__":
    sys.exit(main())
