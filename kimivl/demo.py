"""``kimivl demo``: the shipped kimivl-tiny answering one bundled held-out question of each task, then its
accuracy on the whole bundled held-out set."""

from __future__ import annotations

import os
import time
from pathlib import Path

from kimivl.data.formats import content_text
from kimivl.terminal import printable


def shipped(relative: str) -> Path:
    """A path the git repository ships (``models/...``, ``examples/...``): beside the package in a clone (an editable
    install), else under the current directory (an installed wheel holds neither, so a clone's root serves)."""
    beside, here = Path(__file__).resolve().parents[1] / relative, Path.cwd() / relative
    return here if here.exists() and not beside.exists() else beside


DEFAULT_MODEL = shipped("models/kimivl-tiny")
DEFAULT_EXAMPLES = shipped("examples/heldout")
NOT_SHIPPED = (
    "kimivl-tiny and its held-out questions ship in the git repository, not in an installed package: run from the "
    "root of a clone, or name your own with --model (and --examples or --data)"
)


def _question(record: dict) -> str:
    content = record["messages"][0]["content"]
    parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
    media = sum(p["type"] in ("image", "video") for p in parts)
    text = content_text(parts)
    return f"[{media} image/video part{'s' if media != 1 else ''}] {printable(text)}"


def run_demo(
    model_dir: str | Path = DEFAULT_MODEL,
    examples_dir: str | Path = DEFAULT_EXAMPLES,
    max_new_tokens: int = 160,
    progress: bool = True,
) -> dict[str, float]:
    """Print the demo; return held-out accuracy per task."""
    from kimivl import KimiVL, KimiVLProcessor
    from kimivl.eval.synthetic import evaluate, heldout_records
    from kimivl.precision import checkpoint_load_dtype
    from kimivl.processing.chat_template import parse_thinking

    model_dir, examples_dir = Path(model_dir), Path(examples_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no model at {model_dir} (no config.json): pass --model a checkpoint directory")
    model = KimiVL.from_pretrained(model_dir, dtype=checkpoint_load_dtype(model_dir, "cpu"))
    processor = KimiVLProcessor.from_pretrained(model_dir)
    records = heldout_records(examples_dir)
    size = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{model_dir.resolve().name} from {model_dir}: {size:.1f}M parameters\n")
    start = time.perf_counter()
    accuracy, rows = evaluate(model, processor, records, max_new_tokens=max_new_tokens, progress=progress)
    shown = set()
    for record, row in zip(records, rows):
        if row["task"] in shown:
            continue
        shown.add(row["task"])
        reasoning, answer = parse_thinking(row["prediction"])
        print(f"--- {printable(row['task'])}: {_question(record)}")  # the examples' text, as printable as the answer
        for media in (p for p in record["messages"][0]["content"] if isinstance(p, dict) and p["type"] == "image"):
            print(f"    image: {printable(os.path.relpath(media['image']))}")
        if reasoning is not None:
            print(f"    reasoning: {printable(reasoning)}")
        print(f"    answer: {answer!r}   gold: {row['gold']!r}   {'correct' if row['correct'] else 'wrong'}\n")
    print(f"held-out accuracy ({len(rows)} questions, {time.perf_counter() - start:.0f} s):")
    for task, acc in accuracy.items():
        n = sum(r["task"] == task for r in rows) if task != "all" else len(rows)
        print(f"  {printable(task):<12} {100 * acc:5.1f}%  (n={n})")
    return accuracy
