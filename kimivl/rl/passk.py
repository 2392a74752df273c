"""pass@k of a policy on problem records: where RL can find signal.

For each problem, ``n`` answers are sampled and ``c`` of them are correct (reward >= 0.5, ``kimivl.rl.rewards``);
pass@k is estimated without bias by 1 - C(n - c, k) / C(n, k), the chance that k answers drawn without replacement
from the n hold at least one correct one, averaged over problems. RL that samples k answers per problem can at best
move pass@1 toward pass@k on the problems it trains on: a problem that no sample solves (c = 0) or every sample
solves (c = n) gives every answer the same reward, hence no advantage. The table gives, per ``meta.difficulty`` and
overall, pass@1, pass@k for each k asked, and the shares of problems never and always solved.

    python -m kimivl.rl.passk --model models/kimivl-tiny --data DIR/heldout/reasoning.jsonl --samples 8 --k 1,8 \\
        --limit 300 --out passk.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from kimivl.data.synthetic.sample import DIFFICULTIES
from kimivl.exits import run_command
from kimivl.files import unwritable, write_text_atomic
from kimivl.progress import progress_bar
from kimivl.rl.rewards import correctness
from kimivl.terminal import printable, table_cell

# (problem records, answers per problem, seed) -> the answers' texts, problem by problem
Generator = Callable[[Sequence[dict], int, int], list[str]]
TOTAL = "all"  # the table's row over every problem: no difficulty may take its name


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # comb is 0 when n - c < k: then pass@k is 1


def count_correct(
    generate: Generator,
    problems: Sequence[dict],
    samples: int,
    reward_fn: Callable[[str, dict], float] = correctness,
    chunk: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> list[int]:
    """How many of ``samples`` answers to each problem are correct, generated ``chunk`` problems at a time (chunk j
    with seed ``seed + j``). With the default reward, every problem's meta is checked first (a ``ValueError`` names the
    first whose gold ``correctness`` cannot read), not after the answers before it are sampled."""
    if reward_fn is correctness:
        from kimivl.rl.trainer import gold_error

        for i, record in enumerate(problems):
            if why := gold_error(record.get("meta", {})):
                raise ValueError(f"problem {i + 1} {why}")
    counts: list[int] = []
    with progress_bar(
        total=len(problems), desc="pass@k", unit="problem", disable=not progress, dynamic_ncols=True
    ) as bar:
        for j, start in enumerate(range(0, len(problems), chunk)):
            part = problems[start : start + chunk]
            texts = generate(part, samples, seed + j)
            if len(texts) != len(part) * samples:
                raise ValueError(
                    f"the generator gave {len(texts)} answers for {len(part)} problems x {samples} samples"
                )
            for i, record in enumerate(part):
                counts.append(sum(reward_fn(t, record["meta"]) >= 0.5 for t in texts[i * samples : (i + 1) * samples]))
            bar.update(len(part))
    return counts


def summarise(difficulties: Sequence[str], counts: Sequence[int], n: int, ks: Sequence[int]) -> dict[str, dict]:
    """Per difficulty (easy, medium, hard, then any others by name) and ``all``: ``problems``, ``pass@k`` for each
    k, ``never`` and ``always`` (the shares of problems with c = 0 and c = n). A difficulty named ``all`` is a
    ``ValueError``: its row would be the total's."""
    if len(difficulties) != len(counts) or not counts:
        raise ValueError(f"need one count per problem and at least one problem, got {len(counts)} counts")
    if TOTAL in difficulties:
        raise ValueError(f"a difficulty is named {TOTAL!r}, as the table's row over every problem is: rename it")
    rank = {d: i for i, d in enumerate(DIFFICULTIES)}
    order = sorted(set(difficulties), key=lambda d: (rank.get(d, len(rank)), d))
    groups: dict[str, list[int]] = {d: [] for d in order}  # one pass: thousands of difficulties took minutes
    for d, c in zip(difficulties, counts):
        groups[d].append(c)
    groups[TOTAL] = list(counts)
    table = {}
    for name, cs in groups.items():
        row: dict[str, float] = {"problems": len(cs)}
        for k in ks:
            row[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in cs) / len(cs)
        row["never"] = sum(c == 0 for c in cs) / len(cs)
        row["always"] = sum(c == n for c in cs) / len(cs)
        table[name] = row
    return table


def model_generator(model, processor, params, stop: Sequence[str], batch_size: int = 64) -> Generator:
    """A ``Generator`` sampling from ``model`` with ``kimivl.rl.rollouts.rollout`` (``params``' seed replaced by
    each chunk's), on each record's prompt (its messages before a final assistant turn)."""
    from kimivl.inference.sampling import SamplingParams
    from kimivl.rl.rollouts import rollout
    from kimivl.rl.trainer import _images, prompt_of

    stop_ids = [processor.tokenizer.special_id(s) for s in stop]

    def generate(records: Sequence[dict], samples: int, seed: int) -> list[str]:
        encoded = [processor.encode(prompt_of(r)) for r in records]
        sampling = SamplingParams(params.max_new_tokens, params.temperature, params.top_k, params.top_p, seed)
        rolls = rollout(
            model, processor, [e.input_ids for e in encoded], *_images(encoded), samples, sampling, stop_ids, batch_size
        )
        return [r.text for r in rolls]

    return generate


def format_table(table: dict[str, dict], ks: Sequence[int]) -> str:
    """``summarise``'s table as Markdown, each difficulty's name one cell (``table_cell``)."""
    head = " | ".join(f"pass@{k}" for k in ks)
    lines = [f"| difficulty | problems | {head} | never solved | always solved |", "|---" * (4 + len(ks)) + "|"]
    for name, row in table.items():
        cells = " | ".join(f"{100 * row[key]:.1f}%" for key in [*(f"pass@{k}" for k in ks), "never", "always"])
        lines.append(f"| {table_cell(name)} | {row['problems']} | {cells} |")
    return "\n".join(lines)


def _ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k takes comma-separated integers such as 1,8, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"--k takes integers >= 1, got {text!r}")
    return ks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kimivl.rl.passk", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--data", required=True, help="JSONL problem records with meta.task, meta.gold, meta.difficulty")
    p.add_argument("--samples", type=int, required=True, help="answers sampled per problem (n)")
    p.add_argument(
        "--k", type=_ks, help="comma-separated k values, each <= --samples (default 1,8, 8 capped at --samples)"
    )
    p.add_argument("--limit", type=int, help="the first M problems only")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8, the RL default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's mass (default %(default)s: off)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="tokens per answer at most (default %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="generation rows per batch (default 64)")
    p.add_argument("--seed", type=int, default=0, help="the first chunk's sampling seed (default %(default)s)")
    p.add_argument("--out", default="passk.json", help="where the table is written as JSON (default passk.json)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is a GPU, else cpu)")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        help="weights' dtype (default: the checkpoint's; float32 on a CPU that multiplies bf16 slowly)",
    )
    return p


def _check_out(path: str) -> None:
    """That ``--out`` can be written, before minutes of sampling (its directory is made only when it is written)."""
    if Path(path).is_dir():
        raise ValueError(f"--out {path} is a directory: give a file name such as {Path(path) / 'passk.json'}")
    if why := unwritable(path):
        raise ValueError(f"--out {path} cannot be written: {why}; choose another --out")


def main(argv: list[str] | None = None) -> int:
    """The command; Ctrl-C exits 130 with one line, stdout's reader gone (``| head``) 141, quietly."""
    parser = build_parser()
    return run_command(parser.prog, lambda: _run(parser, parser.parse_args(argv)))


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The command after parsing: checks, sampling, the table written to ``--out``, then printed."""
    if args.samples < 1:
        parser.error(f"--samples must be >= 1, got {args.samples}")
    if args.k is None:
        args.k = sorted({1, min(8, args.samples)})
    if max(args.k) > args.samples:
        parser.error(f"--k values must lie in 1..--samples ({args.samples}), got {args.k}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    try:
        _check_out(args.out)
        from kimivl.cli import _load
        from kimivl.data.formats import iter_lines
        from kimivl.inference.sampling import SamplingParams
        from kimivl.rl.trainer import RLConfig, difficulties_of, problem_error

        params = SamplingParams(args.max_new_tokens, args.temperature, top_p=args.top_p, seed=args.seed)
        problems = []
        for lineno, _, record in iter_lines(args.data, text=False):
            if len(problems) == args.limit:
                break
            if why := problem_error(record) or _total_named(record):  # as the rl stage checks: before the model loads
                raise ValueError(f"{args.data}:{lineno} (problem {len(problems) + 1}) {why}")
            problems.append(record)
        if not problems:
            raise ValueError(f"{args.data} holds no problems")
        model, processor = _load(args.model, args.dtype, args.device)
        model.eval()
        generate = model_generator(model, processor, params, RLConfig().stop, args.batch)
        chunk = max(1, args.batch // args.samples)
        counts = count_correct(generate, problems, args.samples, chunk=chunk, seed=args.seed, progress=True)
    except (ValueError, OSError) as e:
        parser.error(printable(e))
    table = summarise(difficulties_of(problems), counts, args.samples, args.k)
    settings = {k: getattr(args, k) for k in ("model", "data", "samples", "temperature", "top_p", "max_new_tokens")}
    result = {"settings": {**settings, "seed": args.seed}, "table": table, "correct": counts}
    try:  # first: a stdout whose reader has gone (| head) loses no result
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n", through_links=True)  # /dev/stdout too
    except OSError as e:
        print(format_table(table, args.k), flush=True)  # a failed write loses no table
        parser.error(printable(e))
    print(format_table(table, args.k))
    print(f"written to {args.out}")
    return 0


def _total_named(record: dict) -> str | None:
    """Why ``record``'s difficulty cannot be a row of the table (it is named as the total row); None when it can."""
    if record.get("meta", {}).get("difficulty") == TOTAL:
        return f"has meta.difficulty {TOTAL!r}, the name of the table's row over every problem: rename that difficulty"
    return None


if __name__ == "__main__":
    sys.exit(main())
