"""Build the synthetic world on disk: PNG media plus one conversation JSONL per split and task.

Layout under ``out_dir``::

    world.json                       the seed, sizes and tasks it was built with, and the generators' fingerprint
    <split>/<task>.jsonl             conversations (see ``kimivl.data.formats``), ``meta`` holding the gold answer
    <split>/text.jsonl, long.jsonl   text-only documents, ``{"id", "text"}``: short ones, and long ones for
                                     long-context activation
    <split>/images/<task>/<n>_<j>.png   the j-th image (or video frame) of sample n

Each (split, task) draws from its own seeded stream, so the same seed gives byte-identical files (given the
same Pillow, zlib and FreeType) and splits never share a stream. No sample repeats another anywhere in the world
(same question, answer and images).
Reasoning records of the train split answer with the long-CoT target ``◁think▷steps◁/think▷answer``.
One process at a time builds a world (``.<name>.lock`` beside its folder; another waits), each split written under a
temporary name and renamed into place, world.json last: its world.json says a world is whole only when it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from kimivl.data import synthetic
from kimivl.data.formats import write_records
from kimivl.data.synthetic import GENERATORS, TASKS, TEXTS, Clip, Sample
from kimivl.files import publish_dir, temporary_dir, write_text_atomic
from kimivl.progress import progress_bar

logger = logging.getLogger(__name__)

DEFAULT_SIZES = {"train": 1000, "heldout": 100}


def generators_fingerprint() -> str:
    """A hash of the synthetic generators' source code: a world made by other generators is rebuilt, not reused."""
    h = hashlib.sha256()
    for path in sorted(Path(synthetic.__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _fingerprint(sample: Sample) -> str:
    h = hashlib.sha256(f"{sample.question}\0{sample.answer}".encode())
    for im in sample.images:
        h.update(f"{im.mode}{im.size}".encode())
        h.update(im.tobytes())
    return h.hexdigest()


def _save(im: Image.Image, root: Path, rel: str) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG", compress_level=1)
    return rel


def sample_record(sample: Sample, sample_id: str, root: Path, stem: str, thinking: bool = False) -> dict:
    """Save the sample's images as ``root/stem_<j>.png`` and return its conversation record."""
    parts, j = [], 0
    for item in sample.content:
        if isinstance(item, str):
            parts.append({"type": "text", "text": item})
        elif isinstance(item, Clip):
            frames = [_save(f, root, f"{stem}_{j + k}.png") for k, f in enumerate(item.frames)]
            j += len(frames)
            parts.append({"type": "video", "frames": frames, "timestamps": item.timestamps})
        else:
            parts.append({"type": "image", "image": _save(item, root, f"{stem}_{j}.png")})
            j += 1
    messages = [{"role": "user", "content": parts}, {"role": "assistant", "content": sample.target(thinking)}]
    return {"id": sample_id, "messages": messages, "meta": sample.meta}


def _distinct(make, n: int, seen: set[str], key):
    """Yield ``n`` outputs of ``make()`` whose ``key`` is not in ``seen`` (which grows)."""
    made, tries = 0, 0
    while made < n:
        tries += 1
        if tries > 20 * n + 100:
            raise RuntimeError(f"could only make {made} of {n} distinct samples; ask for fewer")
        item = make()
        k = key(item)
        if k not in seen:
            seen.add(k)
            made += 1
            yield item


def _records(split: str, task: str, n: int, seed: int, seen: set[str], root: Path):
    """The records of one (split, task), from its own seeded stream."""
    rng = random.Random(f"kimivl-world/{seed}/{split}/{task}")
    if task in TEXTS:
        docs = _distinct(lambda: TEXTS[task](rng), n, seen, lambda d: hashlib.sha256(d.encode()).hexdigest())
        for i, doc in enumerate(docs):
            yield {"id": f"{split}/{task}/{i:06d}", "text": doc}
        return
    thinking = split == "train" and task == "reasoning"
    for i, sample in enumerate(_distinct(lambda: GENERATORS[task](rng), n, seen, _fingerprint)):
        yield sample_record(sample, f"{split}/{task}/{i:06d}", root, f"images/{task}/{i:06d}", thinking)


def _ticking(items, bar: tqdm):
    for item in items:
        bar.update()
        yield item


def build_world(
    out_dir: str | os.PathLike,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    tasks: tuple[str, ...] | list[str] = TASKS,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Generate ``sizes[split]`` samples per task for every split (in order; later splits are de-duplicated
    against earlier ones) and write them under ``out_dir``. Returns the manifest also saved as world.json. Builds of
    one folder take turns (``_turn``)."""
    _known(tasks)
    with _turn(out_dir):
        return _build(Path(out_dir), seed, sizes, tasks, overwrite, progress)


def _known(tasks: tuple[str, ...] | list[str]) -> None:
    """Refuse a task the generators lack, before anything is written."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown} (expected some of {', '.join(TASKS)})")


def _turn(out_dir: str | os.PathLike):
    """The lock of the world in ``out_dir`` (``.<name>.lock`` beside it), held while a process builds it or looks
    whether it is built: a second process waits for the first (a warning names it), then finds the world it built."""
    from kimivl.train.lock import world_lock  # not at import: kimivl.train imports kimivl.data

    out = Path(out_dir).resolve()  # a link's target: each name of one folder takes the same lock
    out.mkdir(parents=True, exist_ok=True)
    return world_lock(out)


def _build(
    out: Path,
    seed: int,
    sizes: dict[str, int] | None,
    tasks: tuple[str, ...] | list[str],
    overwrite: bool,
    progress: bool,
) -> dict:
    """``build_world``, by a process holding the world's lock. Each split is written beside its folder
    (``.<split>.tmp``) and renamed into place once every split is whole, world.json last: a build cut short leaves the
    previous world as it was, and a world whose world.json says it is built lacks no file."""
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    existing = [out / split for split in sizes if (out / split).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass overwrite=True to replace it")
    start = time.perf_counter()
    files: dict[str, dict[str, str]] = {}
    seen: set[str] = set()
    try:
        with progress_bar(
            total=sum(sizes.values()) * len(tasks), unit="sample", desc="world", disable=not progress
        ) as bar:
            for split, n in sizes.items():
                files[split], tmp = {}, temporary_dir(out / split)
                shutil.rmtree(tmp, ignore_errors=True)  # left by a killed build (the lock rules out one under way)
                for task in tasks:
                    records = _records(split, task, n, seed, seen, tmp)
                    write_records(tmp / f"{task}.jsonl", _ticking(records, bar))
                    files[split][task] = f"{split}/{task}.jsonl"
                    logger.info("wrote %d %s records to %s", n, task, out / split / f"{task}.jsonl")
        (out / "world.json").unlink(missing_ok=True)  # written last: a build cut short is never taken for a whole one
        for split in sizes:
            publish_dir(out / split)
    except BaseException:
        for split in sizes:  # a full disk gets its space back
            shutil.rmtree(temporary_dir(out / split), ignore_errors=True)
        raise
    manifest = {
        "seed": seed,
        "sizes": sizes,
        "tasks": list(tasks),
        "generators": generators_fingerprint(),
        "files": files,
    }
    write_text_atomic(out / "world.json", json.dumps(manifest, indent=1) + "\n")  # whole, or absent
    logger.info(
        "built the world (%d records) in %.1f s under %s",
        sum(sizes.values()) * len(tasks),
        time.perf_counter() - start,
        out,
    )
    return manifest


def _manifest(out_dir: str | os.PathLike) -> dict | None:
    """The world's world.json, or None when there is none or it cannot be read (a warning names it): either way the
    world is built again."""
    path = Path(out_dir) / "world.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        problem = None if isinstance(manifest, dict) else "not a JSON object"
    except (OSError, ValueError) as e:
        problem = e
    if problem is not None:
        logger.warning("the world manifest %s cannot be read (%s): the world is built again", path, problem)
        return None
    return manifest


def _built_with(manifest: dict) -> tuple:
    return manifest.get("seed"), manifest.get("sizes"), manifest.get("tasks"), manifest.get("generators")


def world_built(out_dir: str | os.PathLike) -> tuple | None:
    """The (seed, sizes, tasks, generators) the world under ``out_dir`` was built with (its world.json), or None when
    it has no readable one."""
    manifest = _manifest(out_dir)
    return None if manifest is None else _built_with(manifest)


def world_wanted(seed: int = 0, tasks: tuple[str, ...] | list[str] = TASKS, **sizes: int) -> tuple:
    """What ``world_built`` must give for ``ensure_world`` (with these arguments) to reuse a world."""
    return seed, sizes or dict(DEFAULT_SIZES), list(tasks), generators_fingerprint()


def ensure_world(
    out_dir: str | os.PathLike,
    seed: int = 0,
    tasks: tuple[str, ...] | list[str] = TASKS,
    progress: bool = True,
    **sizes: int,
) -> dict:
    """Build the world (``sizes`` as split=count keywords, e.g. ``train=4000, heldout=300``) unless ``out_dir``
    already holds one built with the same seed, sizes, tasks and generator code; return its manifest. A built world
    is read without a lock (a read-only share serves); a process building it now is waited for; a world of other
    settings is not rebuilt under the run that holds the folder around it (``out/.lock``, a training run on
    ``out/world``)."""
    from kimivl.train.lock import running
    from kimivl.train.recipe import RecipeError

    sizes = sizes or dict(DEFAULT_SIZES)
    _known(tasks)
    wanted = world_wanted(seed, tasks, **sizes)
    if (manifest := _manifest(out_dir)) is not None and _built_with(manifest) == wanted:
        logger.info("reusing the world under %s", out_dir)
        return manifest
    with _turn(out_dir):
        manifest = _manifest(out_dir)  # again: the process waited for may have built it
        built = None if manifest is None else _built_with(manifest)
        if built == wanted:
            logger.info("reusing the world under %s", out_dir)
            return manifest
        run = Path(out_dir).absolute().parent  # the folder named, not a link's target: the run holds that one
        if built is not None and (user := running(run)):
            raise RecipeError(
                f"the world under {out_dir} was built with other settings (seed, sizes, tasks or generator code), and "
                f"the run in {run} ({user}) may be training on it, so it is not rebuilt under that run: wait for the "
                "run to end, or build this world elsewhere"
            )
        if built is not None and built[:3] == wanted[:3]:
            logger.warning("the world under %s was made by other generator code: rebuilding it", out_dir)
        return _build(Path(out_dir), seed, sizes, tasks, overwrite=True, progress=progress)
