import errno
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from held_run import run_held_elsewhere
from PIL import Image

from kimivl.data import build_world, ensure_world, iter_records, iter_texts
from kimivl.data.synthetic import GENERATORS, TASKS, TEXTS, THINK_CLOSE, THINK_OPEN

SIZES = {"train": 10, "heldout": 4}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    build_world(out, seed=3, sizes=SIZES, progress=False)
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(world, tmp_path):
    build_world(tmp_path / "again", seed=3, sizes=SIZES, progress=False)
    assert _tree(tmp_path / "again") == _tree(world)
    build_world(tmp_path / "other", seed=4, sizes=SIZES, progress=False)
    other = (tmp_path / "other" / "train" / "caption.jsonl").read_bytes()
    assert other != (world / "train" / "caption.jsonl").read_bytes()


def test_layout_counts_and_records_load(world):
    manifest = json.loads((world / "world.json").read_text())
    assert manifest["seed"] == 3 and manifest["sizes"] == SIZES and manifest["tasks"] == list(TASKS)
    for split, n in SIZES.items():
        assert sorted(manifest["files"][split]) == sorted(TASKS)
        for task in TEXTS:
            assert len(list(iter_texts(world / split / f"{task}.jsonl"))) == n
        for task in GENERATORS:
            records = list(iter_records(world / manifest["files"][split][task]))
            assert len(records) == n and len({r["id"] for r in records}) == n
            for r in records:
                user, assistant = r["messages"]
                assert user["role"] == "user" and assistant["role"] == "assistant"
                assert user["content"][-1]["type"] == "text" and r["meta"]["task"] == task
                thinking = assistant["content"].startswith(THINK_OPEN)
                assert thinking == (split == "train" and task == "reasoning")
                if thinking:
                    assert assistant["content"].endswith(f"{THINK_CLOSE}{r['meta']['gold']}")


def _fingerprints(world: Path, split: str) -> set[str]:
    out = set()
    for task in GENERATORS:
        for r in iter_records(world / split / f"{task}.jsonl"):
            user, assistant = r["messages"]
            h = hashlib.sha256(assistant["content"].split(THINK_CLOSE)[-1].encode())
            for part in user["content"]:
                paths = part.get("frames") or [part.get("image")] if part["type"] != "text" else []
                h.update(part.get("text", "").encode())
                for p in paths:
                    h.update(Image.open(p).tobytes())
            out.add(h.hexdigest())
    return out


def test_heldout_is_disjoint_from_train(world):
    train, heldout = _fingerprints(world, "train"), _fingerprints(world, "heldout")
    assert len(train) == SIZES["train"] * len(GENERATORS) and len(heldout) == SIZES["heldout"] * len(GENERATORS)
    assert not train & heldout
    for task in TEXTS:
        train_docs, heldout_docs = (set(iter_texts(world / split / f"{task}.jsonl")) for split in ("train", "heldout"))
        assert not train_docs & heldout_docs


def test_existing_world_is_kept_or_replaced_on_request(tmp_path, caplog):
    sizes = {"train": 2, "heldout": 1}
    build_world(tmp_path, seed=0, sizes=sizes, tasks=["caption", "text"], progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_world(tmp_path, seed=0, sizes=sizes, tasks=["caption"], progress=False)
    stamp = (tmp_path / "train" / "caption.jsonl").stat().st_mtime_ns
    ensure_world(tmp_path, seed=0, tasks=["caption", "text"], progress=False, **sizes)
    assert (tmp_path / "train" / "caption.jsonl").stat().st_mtime_ns == stamp
    manifest = json.loads((tmp_path / "world.json").read_text())
    (tmp_path / "world.json").write_text(json.dumps({**manifest, "generators": "older code"}))
    rebuilt = "was made by other generator code: rebuilding it"
    with caplog.at_level(logging.WARNING, logger="kimivl.data.world"):
        ensure_world(tmp_path, seed=0, tasks=["caption", "text"], progress=False, **sizes)
        assert rebuilt in caplog.text
        caplog.clear()
        assert (tmp_path / "train" / "caption.jsonl").stat().st_mtime_ns != stamp  # rebuilt by today's generators
        assert json.loads((tmp_path / "world.json").read_text()) == manifest
        ensure_world(tmp_path, seed=1, tasks=["caption"], progress=False, **sizes)
        assert rebuilt not in caplog.text  # other settings, not other code
    assert not (tmp_path / "train" / "text.jsonl").exists()
    with pytest.raises(ValueError, match="unknown tasks"):
        build_world(tmp_path / "x", tasks=["caption", "smell"])
    with pytest.raises(ValueError, match=r"unknown tasks \['smell'\]"):  # refused before anything is written
        ensure_world(tmp_path / "y", tasks=["caption", "smell"], progress=False, train=1)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_rebuild_cut_short_leaves_the_previous_world_whole(tmp_path, monkeypatch):
    """world.json was written last but deleted never: a rebuild under another seed cut short (Ctrl-C) left the old
    manifest over half-written files of the new seed, and the next run reused them as the old world. Then the rebuild
    removed world.json and the splits first: cut short, it left no world. Now each split is written aside and renamed
    into place: cut short while writing, the previous world is whole; between the renames, it has no world.json."""
    import kimivl.data.world as world_module

    ensure_world(tmp_path, seed=0, progress=False, **SIZES)
    whole = _tree(tmp_path)

    def interrupted(rng, difficulty=None):
        raise KeyboardInterrupt

    monkeypatch.setitem(world_module.GENERATORS, "gui", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_world(tmp_path, seed=1, progress=False, **SIZES)
    monkeypatch.undo()
    assert _tree(tmp_path) == whole and sorted(p.name for p in tmp_path.iterdir()) == ["heldout", "train", "world.json"]

    publish = world_module.publish_dir

    def killed_after_the_first(path):
        publish(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(world_module, "publish_dir", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        ensure_world(tmp_path, seed=1, progress=False, **SIZES)
    monkeypatch.undo()
    assert not (tmp_path / "world.json").exists()  # train is seed 1's, heldout seed 0's: no world
    ensure_world(tmp_path, seed=0, progress=False, **SIZES)  # built again, as it was
    assert _tree(tmp_path) == whole


@pytest.mark.parametrize("text", ["", '{"seed": 0, "si', "[]"])
def test_an_unreadable_manifest_is_a_world_to_build_again(tmp_path, caplog, text):
    """An empty or torn world.json (a full disk, written by an older kimivl) stopped every later run with a bare
    'Expecting value: line 1 column 1 (char 0)' naming no file."""
    sizes = {"train": 2, "heldout": 1}
    manifest = build_world(tmp_path, seed=0, sizes=sizes, tasks=["caption", "text"], progress=False)
    whole = _tree(tmp_path)
    (tmp_path / "world.json").write_text(text)
    (tmp_path / "train" / "caption.jsonl").write_text("half a rec")  # what a build cut short may have left
    assert ensure_world(tmp_path, seed=0, tasks=["caption", "text"], progress=False, **sizes) == manifest
    assert f"the world manifest {tmp_path / 'world.json'} cannot be read" in caplog.text
    assert _tree(tmp_path) == whole


def test_a_full_disk_while_writing_the_manifest_leaves_none(tmp_path, monkeypatch):
    """world.json is whole or absent: a full disk while writing it leaves no empty or torn manifest behind."""
    import builtins
    import io

    real_open = builtins.open

    class Full(io.StringIO):
        def __init__(self, file):
            super().__init__()
            self.file = file

        def write(self, text):
            with real_open(self.file, "a") as f:  # what fitted on the disk
                f.write(text[:7])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_for_the_manifest(file, mode="r", *args, **kwargs):
        if "world.json" in os.fspath(file) and "r" not in mode:
            real_open(file, "x" if "x" in mode else "w").close()
            return Full(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_for_the_manifest)
    monkeypatch.setattr(io, "open", full_for_the_manifest)
    with pytest.raises(OSError, match="No space left"):
        build_world(tmp_path, seed=0, sizes={"train": 2, "heldout": 1}, tasks=["caption"], progress=False)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if "world.json" in p.name] == []
    ensure_world(tmp_path, seed=0, tasks=["caption"], progress=False, train=2, heldout=1)
    assert json.loads((tmp_path / "world.json").read_text())["seed"] == 0


BUILDER = """
import pathlib, sys, time
import kimivl.data.world as world
from kimivl.data import iter_records

out, role = pathlib.Path(sys.argv[1]), sys.argv[2]
signal = out.parent / "second-builds"
if role == "first":  # pauses before its world.json until the second builds (or 3 s pass: it waits for the lock)
    write = world.write_text_atomic

    def paused(path, text, **kwargs):
        (out.parent / "first-paused").touch()
        for _ in range(30):
            if signal.exists():
                break
            time.sleep(0.1)
        write(path, text, **kwargs)

    world.write_text_atomic = paused
else:  # builds slowly, saying so at its first image
    save = world._save

    def slow(*args):
        signal.touch()
        time.sleep(0.1)
        return save(*args)

    world._save = slow
manifest = world.ensure_world(out, seed=0, tasks=["caption"], progress=False, train=12, heldout=4)
for split, files in manifest["files"].items():  # the world as this process found it on return
    records = list(iter_records(out / files["caption"]))
    images = [p["image"] for r in records for p in r["messages"][0]["content"] if p["type"] == "image"]
    missing = [i for i in images if not pathlib.Path(i).is_file()]
    print(split, len(records), len(images), len(missing))
"""


def test_two_processes_building_one_world_take_turns(tmp_path):
    """Two builds of one world at once (``benchmarks/rl_signal.py`` twice with one --out, a benchmark beside the run
    of its recipe) took no lock: the second removed the first's splits to build them again, the first crashed
    (Directory not empty) or wrote world.json over the second's half-written ones, and every later run reused that
    world with its images missing. Now the second waits for the first, naming it, and then finds the world built."""
    (tmp_path / "build.py").write_text(BUILDER)
    out = tmp_path / "world"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}

    def start(role):
        cmd = [sys.executable, str(tmp_path / "build.py"), str(out), role]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start("first")
    for _ in range(600):
        if (tmp_path / "first-paused").exists() or first.poll() is not None:
            break
        time.sleep(0.05)
    second = start("second")
    said = [p.communicate(timeout=120) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], said
    assert said[0][0] == said[1][0] == "train 12 12 0\nheldout 4 4 0\n"  # whole, as each found it
    assert f"the world under {out} is being built by another process (pid {first.pid} on " in said[1][1]
    assert not (tmp_path / "second-builds").exists()  # it waited, and reused the world
    assert json.loads((out / "world.json").read_text())["sizes"] == {"train": 12, "heldout": 4}
    assert sorted(p.name for p in out.iterdir()) == ["heldout", "train", "world.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build.py", "first-paused", "world"]  # no lock file left


def test_a_world_a_run_trains_on_is_not_rebuilt_under_it(tmp_path):
    """A benchmark given a run's recipe (``train_throughput.py --recipe``) builds the world under the run's out:
    with other settings (or generator code) it rebuilt the world a live run was reading. Now that is refused, naming
    the run; the run's own process (which holds the lock) still rebuilds it."""
    from kimivl.train.lock import run_lock
    from kimivl.train.recipe import RecipeError

    run, sizes = tmp_path / "run", {"train": 2, "heldout": 1}
    ensure_world(run / "world", seed=0, tasks=["caption"], progress=False, **sizes)
    whole = _tree(run / "world")
    ensure_world(tmp_path / "shared", seed=0, tasks=["caption"], progress=False, **sizes)
    (run / "linked").symlink_to(tmp_path / "shared")  # a world of the run's that lives elsewhere
    with run_held_elsewhere(run) as holder:
        assert ensure_world(run / "world", seed=0, tasks=["caption"], progress=False, **sizes)["seed"] == 0
        refused = f"the world under {run / 'world'} was built with other settings (seed, sizes, tasks or generator "
        refused += f"code), and the run in {run} (pid {holder.pid} on "
        with pytest.raises(RecipeError, match=re.escape(refused)):
            ensure_world(run / "world", seed=1, tasks=["caption"], progress=False, **sizes)
        assert _tree(run / "world") == whole
        with pytest.raises(RecipeError, match=re.escape(f"and the run in {run} (pid {holder.pid} on ")):
            ensure_world(run / "linked", seed=1, tasks=["caption"], progress=False, **sizes)  # was rebuilt
        assert json.loads((tmp_path / "shared" / "world.json").read_text())["seed"] == 0
    with run_lock(run):  # this process's own run
        assert ensure_world(run / "world", seed=1, tasks=["caption"], progress=False, **sizes)["seed"] == 1


def test_a_built_world_is_reused_without_a_lock(tmp_path, monkeypatch):
    """Reusing a world took its lock, which creates ``.world.lock`` beside it: a world on a read-only share (or in a
    folder the user cannot write) could no longer be reused."""
    import kimivl.data.world as world

    sizes = {"train": 2, "heldout": 1}
    ensure_world(tmp_path / "world", seed=0, tasks=["caption"], progress=False, **sizes)

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(world, "_turn", read_only)
    assert ensure_world(tmp_path / "world", seed=0, tasks=["caption"], progress=False, **sizes)["seed"] == 0
    with pytest.raises(OSError, match="Read-only"):  # a world to build still needs the lock
        ensure_world(tmp_path / "world", seed=1, tasks=["caption"], progress=False, **sizes)


def test_a_world_builds_where_there_is_no_fcntl(tmp_path, monkeypatch):
    """On Windows (no ``fcntl``) the world lock refused with a message about training runs: ``build_world``, public
    API, built there before it took a lock."""
    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl: ImportError
    manifest = build_world(tmp_path / "w", seed=0, sizes={"train": 2}, tasks=["caption"], progress=False)
    assert manifest["sizes"] == {"train": 2} and (tmp_path / "w" / "train" / "caption.jsonl").is_file()
