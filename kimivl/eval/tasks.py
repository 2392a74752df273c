"""The evaluation tasks by name: how each loads its rows, scores a prediction and sums up.

``get_task("mmmu")`` etc.; ``synthetic`` is every bundled held-out task of the synthetic world and
``synthetic:<task>`` one of them (default data: ``examples/heldout``); ``niah`` builds its own haystacks.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kimivl.eval import (
    mathvista,
    mmlongbench,
    mmmu,
    niah,
    ocrbench,
    screenspot,
    synthetic,
    videomme,
)
from kimivl.eval.answers import final_answer
from kimivl.eval.report import accuracy
from kimivl.eval.tables import Rows, Sample


@dataclass(frozen=True)
class Task:
    """``load(data, **options)`` yields ``Sample``/``Skipped``; ``score(prediction, meta, mode=, extracted=)``
    gives a dict with a ``score`` in [0, 1] (``mode`` "official" or "lenient", ``extracted`` an answer parsed
    elsewhere or ``None``); ``score_rows(items, mode)`` scores (prediction, meta, extracted) rows together (a row
    at a time unless the benchmark's rules span rows, as MMMU's random stream does); ``summarize(rows, mode=)``
    the metrics; ``report(rows, out_dir)`` optional extra output (tables, figures); ``from_index(index)`` rebuilds
    a row's meta for re-scoring tasks without data files; ``llm_extraction``: the official pipeline extracts answers
    with an LLM, which kimivl replaces by rules unless a prediction carries its ``extracted`` answer."""

    name: str
    load: Callable[..., Iterable]
    score: Callable[..., dict]  # (prediction, meta, mode=, extracted=) -> {"score": ..., ...}
    summarize: Callable[[list[dict]], dict] = accuracy
    needs_data: bool = True
    default_data: str | None = None
    report: Callable[[list[dict], Path], dict] | None = None
    from_index: Callable[[str], dict] | None = None
    options: dict = field(default_factory=dict)
    rows_scorer: Callable[[list[tuple], str], list[dict]] | None = None
    llm_extraction: bool = False  # the official pipeline has an LLM extract each answer (kimivl uses rules)

    def __post_init__(self) -> None:
        """A ``score`` that cannot be called as the runner calls it is named when the task is made, not once every
        row has been generated."""
        if self.rows_scorer is None:
            try:
                inspect.signature(self.score).bind("", {}, mode="official", extracted=None)
            except TypeError as e:
                raise TypeError(
                    f"task {self.name!r}: score is called as score(prediction, meta, mode=, extracted=) ({e})"
                ) from None
            except ValueError:  # a callable without a signature to inspect: called as it is
                pass

    def score_rows(self, items: list[tuple[str, dict, str | None]], mode: str = "official") -> list[dict]:
        """Scores of (prediction, meta, extracted) rows under ``mode``; a score that is no mapping with a ``score``
        is a ``TypeError`` naming the task."""
        if self.rows_scorer is not None:
            return self.rows_scorer(items, mode)
        rows = [self.score(p, m, mode=mode, extracted=e) for p, m, e in items]
        wrong = next((r for r in rows if not (isinstance(r, dict) and "score" in r)), None)
        if wrong is not None:
            raise TypeError(f"task {self.name!r}: score returned {wrong!r}, not a dict with a 'score'")
        return rows


def _synthetic_load(data, task: str | None = None, **_) -> Rows:
    """The held-out questions, interleaved across tasks (so ``--limit N`` takes rows of every task), or those of
    ``task``; an unknown ``task`` is an error listing the tasks the data holds. Rows are read as they are asked for:
    one open reader per task file, the files of a task (by their first record's) one after the other. Their
    ``total`` is known once the first is read: the files' records (non-blank lines), or those of ``task``."""
    return Rows(functools.partial(_synthetic_rows, data, task))


def _synthetic_rows(data, task: str | None, counts: dict) -> Iterator[Sample]:
    files = synthetic.heldout_files(data)
    counts.update((path, synthetic.count_heldout(path, task)) for path in files)
    if task is not None:
        seen: set[str] = set()
        for path in files:
            for record in synthetic.iter_heldout(path):
                seen.add(record["meta"]["task"])
                if record["meta"]["task"] == task:
                    yield _synthetic_sample(record)
        if not seen:
            raise FileNotFoundError(f"no held-out conversation files in {data}")
        if task not in seen:
            raise ValueError(
                f"unknown synthetic task {task!r}; {data} holds: {', '.join(sorted(seen))} "
                "(use --task synthetic:<one of them>, or synthetic for all)"
            )
        return
    by_task: dict[str, list[Iterator[dict]]] = {}
    for path in files:
        records = synthetic.iter_heldout(path)
        first = next(records, None)
        if first is not None:
            by_task.setdefault(first["meta"]["task"], []).append(itertools.chain([first], records))
    if not by_task:
        raise FileNotFoundError(f"no held-out conversation files in {data}")
    queues = [itertools.chain.from_iterable(readers) for readers in by_task.values()]
    while queues:
        for queue in list(queues):
            record = next(queue, None)
            if record is None:
                queues.remove(queue)
            else:
                yield _synthetic_sample(record)


def _synthetic_sample(record: dict) -> Sample:
    meta, messages = record["meta"], record["messages"]
    prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    return Sample(record.get("id"), prompt, {**meta, "group": meta["task"]})


def _synthetic_score(prediction: str, meta: dict, mode: str = "official", extracted: str | None = None) -> dict:
    """The synthetic world's own rule (it has no official/lenient split); ``extracted`` replaces the answer."""
    if extracted is not None:
        prediction = extracted
    return {"score": float(synthetic.score(prediction, meta)), "extracted": final_answer(prediction)}


def _default_heldout() -> str:
    from kimivl.demo import DEFAULT_EXAMPLES

    return str(DEFAULT_EXAMPLES)


TASKS = {
    "mmmu": Task("mmmu", mmmu.load, mmmu.score, rows_scorer=mmmu.score_rows),
    "mathvista": Task("mathvista", mathvista.load, mathvista.score, llm_extraction=True),
    "ocrbench": Task("ocrbench", ocrbench.load, ocrbench.score, ocrbench.summarize),
    "screenspot": Task("screenspot", screenspot.loader("screenspot"), screenspot.score),
    "screenspot_pro": Task("screenspot_pro", screenspot.loader("screenspot_pro"), screenspot.score),
    "videomme": Task("videomme", videomme.load, videomme.score, videomme.summarize),
    "mmlongbench_doc": Task(
        "mmlongbench_doc", mmlongbench.load, mmlongbench.score, mmlongbench.summarize, llm_extraction=True
    ),
    "niah": Task(
        "niah",
        niah.load,
        niah.score,
        niah.summarize,
        needs_data=False,
        report=niah.report,
        from_index=niah.meta_from_index,
    ),
}


def is_task_name(name: str) -> bool:
    """Whether ``name`` names a task ``get_task`` knows."""
    return name in TASKS or name == "synthetic" or name.startswith("synthetic:")


def get_task(name: str) -> Task:
    """The task called ``name`` (``synthetic`` and ``synthetic:<task>`` included)."""
    if name == "synthetic" or name.startswith("synthetic:"):
        sub = name.partition(":")[2] or None
        return Task(
            name,
            functools.partial(_synthetic_load, task=sub),  # load(data) takes the sub-task, from Python too
            _synthetic_score,
            needs_data=False,
            default_data=_default_heldout(),
            options={"task": sub},
        )
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join([*TASKS, 'synthetic', 'synthetic:<task>'])}")
    return TASKS[name]
