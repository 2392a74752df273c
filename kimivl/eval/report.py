"""Aggregating scored rows into metrics and writing ``results.json`` and ``results.md``."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from kimivl.files import write_text_atomic
from kimivl.terminal import table_cell


def accuracy(rows: list[dict], mode: str = "official") -> dict[str, float]:
    """``accuracy`` (percent of the mean row score) and ``accuracy/<group>`` for each row group present (the same
    in both scoring modes)."""
    out = {"accuracy": 100 * sum(r["score"] for r in rows) / max(1, len(rows))}
    groups: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["meta"].get("group"):
            groups[str(r["meta"]["group"])].append(r["score"])
    for name in sorted(groups):
        out[f"accuracy/{name}"] = 100 * sum(groups[name]) / len(groups[name])
    return out


def read_results(out_dir: str | os.PathLike) -> dict:
    """The results in ``out_dir/results.json`` (``{}`` when there is none); a damaged file (not JSON, not an object
    of one object per task) is a ``ValueError`` naming it."""
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        return {}
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(results, dict):
            raise ValueError("not a JSON object")
        for task, result in results.items():
            if not isinstance(result, dict):
                raise ValueError(f"the entry of {task!r} is {json.dumps(result)[:40]}, not an object")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(
            f"{path} is damaged ({e}), so no result can be added to it; move it away (or choose another --out) and "
            "run again"
        ) from None
    return results


def update_results(out_dir: str | os.PathLike, task: str, result: dict) -> dict:
    """Merge one task's result into ``out_dir/results.json`` (other tasks' entries are kept), rewrite
    ``results.md`` from it, and return the merged results. Not safe against another writer of ``out_dir`` at the
    same time: ``run_task`` holds ``out_dir``'s lock while it calls this."""
    out_dir = Path(out_dir)
    results = read_results(out_dir)
    results[task] = result
    # a lone surrogate left in a text (a skipped row's reason naming a path under LC_ALL=C) is written as its escape
    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    write_text_atomic(out_dir / "results.json", text, errors="backslashreplace")
    write_text_atomic(out_dir / "results.md", markdown(results), errors="backslashreplace")
    return results


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics a summary shows: those without a ``/`` (the per-group ones have it), or all of them when every
    one has (NIAH's ``recall/<haystack>``)."""
    return {k: v for k, v in metrics.items() if "/" not in k} or metrics


def _fmt(value) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _extracted(res: dict) -> str:
    """Where the official pipeline extracts answers with an LLM: which extraction the scores rest on."""
    ex = res.get("extraction")
    if not ex or not ex["rules"]:
        return ""
    return f" (answers of {ex['rules']} rows extracted by kimivl's rules, not the official LLM: not comparable)"


def markdown(results: dict) -> str:
    """One table of every task's headline metrics (groups and extra tables follow per task). A metric over some of
    the task's rows (a task's ``metric_rows``, e.g. NIAH's per haystack) shows its own rows scored and answered; the
    skipped rows, never scored, are the task's."""
    lines = ["| task | metric | value | scored | answered | skipped |", "|---|---|---|---|---|---|"]
    details = []
    for task, res in results.items():
        metrics = res.get("metrics", {})
        head = headline(metrics)
        for k, v in head.items():
            own = {**res, **res.get("metric_rows", {}).get(k, {})}
            counts = " | ".join(str(own.get(key, "")) for key in ("scored", "answered", "skipped"))
            lines.append(f"| {table_cell(task)} | {table_cell(k)} | {_fmt(v)} | {counts} |")
        groups = {k: v for k, v in metrics.items() if k not in head}
        if groups:
            details += ["", f"### {task}", "", "| metric | value |", "|---|---|"]
            details += [f"| {table_cell(k)} | {_fmt(v)} |" for k, v in groups.items()]
        if res.get("table"):
            details += ["", f"### {task}", "", res["table"]]
        details += [f"\n![{task} {Path(f).stem}]({Path(f).name})" for f in res.get("figures", [])]
    modes = [f"{task} {res['scoring']}{_extracted(res)}" for task, res in results.items() if res.get("scoring")]
    if modes:
        lines += [
            "",
            "Scoring rules (official: each benchmark's own evaluation code; lenient: kimivl's): " + ", ".join(modes),
        ]
    return "\n".join(lines + details) + "\n"
