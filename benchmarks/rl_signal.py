"""Does RL beat long-CoT SFT beyond the seed-to-seed spread? The whole experiment of docs/rl.md, one command.

    python benchmarks/rl_signal.py [--out runs/rl-signal] [--seeds 0,1,2] [--arms opmd-len,opmd-nolen,grpo]

1. The reasoning problems RL trains on (recipes/tiny.yaml's world: seed 0, 4000 train) and ``--fresh`` problems it
   never sees (a world of seed ``--fresh-seed``, 7, its held-out split), under ``OUT/world`` and ``OUT/fresh``.
2. pass@1 and pass@k of ``--model`` (models/kimivl-tiny; every arm starts from it) on the fresh problems, k up to
   ``--samples`` (``OUT/passk/base.json``): how much RL can gain there.
3. Each arm (a recipe of recipes/: ``opmd-len`` tiny-rl.yaml, ``opmd-nolen`` tiny-rl-nolen.yaml, ``grpo``
   tiny-rl-grpo.yaml, in the order of ``--arms``) once per seed, in ``OUT/<arm>-s<seed>``: the recipe
   with that ``seed``, the shared problems (``--priority``, ``--steps``, ``--problems``, ``--samples`` override the
   recipe's), and its evaluation moved to the fresh problems
   (greedy, 160 new tokens); the starting model is evaluated once and its files copied to the other runs (greedy
   decoding gives every run the same). Each run exports its model (bf16) to ``OUT/<arm>-s<seed>/model``.
4. ``OUT/compare.md``: ``kimivl.rl.compare``'s tables (overall and by difficulty), and per run the reward curve
   summed up (mean reward, accuracy, answer tokens and the shares of problems all right or all wrong, per quarter of
   the iterations).

Every step is skipped when its output exists, and an interrupted run resumes, so the command can be run again
with the same settings (kept in ``OUT/settings.json``; a run with another ``--model``, ``--fresh``, ``--fresh-seed``,
``--steps``, ``--problems``, ``--samples`` or ``--priority`` is refused: give it another ``--out``).
One process at a time: each run is a ``kimivl train`` child process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import yaml
from arguments import at_least, parser
from children import exit_on_sigterm
from children import run as run_child

from kimivl.data.world import ensure_world, world_built, world_wanted
from kimivl.exits import run_command
from kimivl.rl.compare import comparison_table, difficulty_table

ARMS = {"opmd-len": "tiny-rl.yaml", "opmd-nolen": "tiny-rl-nolen.yaml", "grpo": "tiny-rl-grpo.yaml"}
ROOT = Path(__file__).resolve().parent.parent
# the options that make an --out's problems, pass@k and runs what they are (OUT/settings.json)
SETTINGS = ("model", "fresh", "fresh_seed", "steps", "problems", "samples", "priority")
WORLD = {"train": 4000, "heldout": 100}  # the problems RL trains on, split by split (recipes/tiny.yaml's world)


def run(argv: list) -> None:
    """Run ``python ARGV`` in the repository (paths among ``argv`` as their text)."""
    argv = [str(a) for a in argv]
    print("+", " ".join(argv), flush=True)
    run_child([sys.executable, *argv], cwd=ROOT)  # SIGTERM to this process: the child saves and stops


def problems(out: Path, seed: int, what: str, **sizes: int) -> None:
    """``ensure_world``'s reasoning problems under ``out``: built (saying so, with a bar) unless built there already."""
    if world_built(out) != world_wanted(seed, ["reasoning"], **sizes):
        print(f"building {what} under {out} ({', '.join(f'{n} {split}' for split, n in sizes.items())})", flush=True)
    ensure_world(out, seed=seed, tasks=["reasoning"], progress=True, **sizes)


def derived_recipe(args: argparse.Namespace, arm: str, seed: int, out: Path) -> dict:
    recipe = yaml.safe_load((ROOT / "recipes" / ARMS[arm]).read_text(encoding="utf-8"))
    recipe.pop("world", None)
    recipe.update(
        name=f"rl-signal-{arm}-s{seed}",
        seed=seed,
        base={"checkpoint": str(args.model)},
        out=str(out),
        sources={"reasoning": str(args.out / "world" / "train" / "reasoning.jsonl")},
        eval={
            "base": True,
            "after": ["rl"],
            "split": str(args.out / "fresh" / "heldout"),
            "limit": args.fresh,
            "max_new_tokens": 160,
        },
        export={"dtype": "bfloat16", **recipe.get("export", {}), "path": str(out / "model")},  # and its sampling
    )
    (stage,) = recipe["stages"]
    stage["steps"] = stage["steps"] if args.steps is None else args.steps
    given = {"problems": args.problems, "samples": args.samples, "priority": args.priority}
    stage["rl"].update({k: v for k, v in given.items() if v is not None})
    return recipe


def least_steps(arms: list[str]) -> int:
    """The fewest RL iterations every arm can run: past each recipe's warm-up, and 4 for ``curve_summary``."""
    stages = [yaml.safe_load((ROOT / "recipes" / ARMS[arm]).read_text(encoding="utf-8"))["stages"][0] for arm in arms]
    return max(4, *(stage.get("warmup", 0) + 1 for stage in stages))


def curve_summary(run_dir: Path) -> dict[str, tuple[float, ...]]:
    """Means over each quarter of the iterations in ``metrics.jsonl`` (the recipes' curriculum: easy problems only in
    the first two, a quarter medium ones in the last two)."""
    rows = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    rows = [r for r in rows if "reward" in r]
    if len(rows) < 4:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has {len(rows)} RL iterations; a summary by quarter needs 4")
    cuts = [round(i * len(rows) / 4) for i in range(5)]
    keys = ("reward", "accuracy", "mean_length", "all_correct", "all_wrong")
    return {k: tuple(statistics.fmean(r[k] for r in rows[a:b]) for a, b in zip(cuts, cuts[1:])) for k in keys}


def check_settings(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``OUT/settings.json``: the ``SETTINGS`` that its problems, pass@k and runs were made with, written by the first
    run; a later run into the same ``--out`` with others would reuse those results, and is refused."""
    settings = {k: str(v) if isinstance(v := getattr(args, k), Path) else v for k in SETTINGS}
    path = args.out / "settings.json"
    if not path.is_file():
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        return
    before = json.loads(path.read_text(encoding="utf-8"))
    shown = {None: "the default"}
    changed = [
        f"--{k.replace('_', '-')} {shown.get(before.get(k), before.get(k))} then, {shown.get(v, v)} now"
        for k, v in settings.items()
        if before.get(k) != v
    ]
    if changed:
        ap.error(
            f"--out {args.out} holds results made with other settings ({'; '.join(changed)}), which this run would "
            "reuse: give another --out, or remove that one to start over"
        )


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--out", type=Path, default=Path("runs/rl-signal"))
    ap.add_argument(
        "--model", type=Path, default=ROOT / "models" / "kimivl-tiny", help="the starting model of every arm"
    )
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"some of {', '.join(ARMS)}")
    ap.add_argument("--fresh", type=at_least(1), default=500, help="fresh problems evaluated (default 500)")
    ap.add_argument("--fresh-seed", type=int, default=7)
    ap.add_argument("--priority", choices=["signal", "failure"], help="sampler priority (default: the recipes')")
    ap.add_argument("--steps", type=int, help="RL iterations per run (default: the recipes', 48)")
    ap.add_argument("--problems", type=at_least(1), help="problems per iteration (default: the recipes', 16)")
    ap.add_argument(
        "--samples", type=at_least(2), default=8, help="answers per problem, at least 2 (default: 8, the recipes')"
    )
    ap.add_argument("--no-passk", action="store_true", help="skip step 2")
    args = ap.parse_args()
    args.out, args.model = args.out.resolve(), args.model.resolve()  # the children run in ROOT
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: give whole numbers separated by commas, e.g. 0,1,2")
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    if args.steps is not None and args.steps < least_steps(arms):
        ap.error(f"--steps {args.steps}: at least {least_steps(arms)} (past the recipes' warm-up, 4 for the summary)")
    if not (args.model / "config.json").is_file():
        ap.error(f"--model {args.model}: no checkpoint there (no config.json); give a kimivl checkpoint directory")
    check_settings(ap, args)
    exit_on_sigterm()

    problems(args.out / "world", 0, "the problems RL trains on", **WORLD)
    problems(args.out / "fresh", args.fresh_seed, "the fresh problems", heldout=args.fresh)
    fresh = args.out / "fresh" / "heldout" / "reasoning.jsonl"

    passk = args.out / "passk" / "base.json"
    if not args.no_passk and not passk.is_file():
        passk.parent.mkdir(parents=True, exist_ok=True)
        ks = sorted({1, 2, 4, args.samples} & set(range(1, args.samples + 1)))
        run(["-m", "kimivl.rl.passk", "--model", args.model, "--data", str(fresh), "--samples", str(args.samples),
             "--k", ",".join(map(str, ks)), "--limit", str(args.fresh), "--out", str(passk)])  # fmt: skip

    runs: dict[str, list[Path]] = {arm: [] for arm in arms}
    base_eval = None  # the first run's evaluation of the starting model, copied to the others
    for arm in arms:  # arm by arm: an experiment cut short has every seed of the first arms
        for seed in seeds:
            out = args.out / f"{arm}-s{seed}"
            runs[arm].append(out)
            if (out / "eval" / "rl.position_loss.json").is_file() and (out / "model" / "config.json").is_file():
                base_eval = base_eval or out / "eval"
                continue
            recipe = args.out / "recipes" / f"{arm}-s{seed}.yaml"
            recipe.parent.mkdir(parents=True, exist_ok=True)
            recipe.write_text(yaml.safe_dump(derived_recipe(args, arm, seed, out), sort_keys=False), encoding="utf-8")
            if base_eval is not None and not (out / "eval" / "base.json").is_file():
                (out / "eval").mkdir(parents=True, exist_ok=True)
                for f in base_eval.glob("base.*"):
                    shutil.copy(f, out / "eval" / f.name)
            started = any(out.glob("*/checkpoints")) or any(out.glob("*/final"))
            run(["-m", "kimivl.cli", "train", str(recipe)] + (["--resume"] if started else []))
            base_eval = base_eval or out / "eval"

    done = {arm: [r for r in rs if (r / "eval" / "rl.json").is_file()] for arm, rs in runs.items()}
    done = {arm: rs for arm, rs in done.items() if rs}
    lines = ["# RL signal experiment", ""]
    if passk.is_file():
        lines += [f"pass@k of {args.model} on the fresh problems:", "", passk_table(passk), ""]
    keys = ("reward", "accuracy", "mean_length", "all_correct", "all_wrong")
    lines += [comparison_table(done), "", difficulty_table(done), "", "RL iterations by quarter (means):", ""]
    lines += ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for rs in done.values():
        for r in rs:
            c = curve_summary(r)
            lines.append(f"| {r.name} | " + " | ".join(" / ".join(f"{v:.2f}" for v in c[k]) for k in keys) + " |")
    (args.out / "compare.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


def passk_table(path: Path) -> str:
    """The pass@k table ``kimivl.rl.passk`` wrote to ``path`` as JSON, in Markdown as the command prints it."""
    from kimivl.rl.passk import format_table  # not at import: runpy warns when -m runs a module already imported

    table = json.loads(path.read_text(encoding="utf-8"))["table"]
    ks = [int(key.removeprefix("pass@")) for key in next(iter(table.values())) if key.startswith("pass@")]
    return format_table(table, ks)


if __name__ == "__main__":
    sys.exit(run_command("rl_signal.py", main))
