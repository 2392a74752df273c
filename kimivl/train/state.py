"""Resumable training checkpoints, written atomically.

A checkpoint is a directory ``step-{N:07d}`` holding the model in the official format (``config.json`` + safetensors,
full precision) and ``trainer.pt`` (optimizer, scheduler, step, data position and settings, the data stream's draw
counts, RNG states; loaded with ``weights_only=True``, so nothing is unpickled beyond tensors and plain containers). It
is written under a temporary name and renamed into place; the ``latest`` file then moves to it with an atomic replace,
so a crash at any moment leaves the previous checkpoint intact and pointed to. Frozen parameters' tensors are shards of
their own, hard-linked from the previous checkpoint while they stay unchanged (``save_checkpoint``'s ``frozen_from``).
"""

from __future__ import annotations

import io
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kimivl.checkpoint import CheckpointError, CheckpointReadError, load_checkpoint, save_checkpoint, write_error
from kimivl.distributed.checkpoint import is_sharded, load_sharded, save_sharded
from kimivl.distributed.world import World
from kimivl.files import FULL, WriteError, write_text_atomic
from kimivl.train.interrupt import Interrupted, StopRequest
from kimivl.train.step import TrainingError

log = logging.getLogger(__name__)
LATEST = "latest"
TRAINER_FILE = "trainer.pt"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))


def _tuples(x):
    """``random.setstate`` wants the nested tuples that a save/load round trip may have turned into lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class _NotedFile(io.BufferedWriter):
    """A file that keeps the first ``OSError`` of its writes: ``torch.save`` meets it in its own code and raises a
    ``RuntimeError`` of its own (``unexpected pos``) that names neither the file nor the failure."""

    error: OSError | None = None

    def write(self, data) -> int:
        try:
            return super().write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as e:
            self.error = self.error or e
            raise


def _save_torch(obj: Any, file: Path) -> None:
    """``torch.save`` of ``obj`` to ``file``, streamed; a failed write (a full disk) is a ``CheckpointWriteError``
    naming the file."""
    try:
        with _NotedFile(io.FileIO(file, "w")) as f:
            try:
                torch.save(obj, f)
            except RuntimeError:
                if f.error is None:
                    raise
                raise f.error from None
    except OSError as e:
        raise write_error(e, file) from None


def _load_torch(file: Path) -> Any:
    """``torch.load`` of ``file`` (tensors and plain containers only); a damaged file is a ``CheckpointReadError``
    naming it (torch raises what its reader met: a RuntimeError, an UnpicklingError, an EOFError, ...)."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - every way a damaged file fails to read
        raise CheckpointReadError(f"cannot read {file}: it is damaged or cut short ({type(e).__name__})") from None


def _step(name: str) -> int | None:
    """The step of a checkpoint named ``step-N``; None for any other name."""
    digits = name.removeprefix("step-")
    return int(digits) if digits != name and digits.isascii() and digits.isdigit() else None


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    """The checkpoints ``step-N`` in ``root`` with their steps, by step (compared as numbers: past 7 digits the
    names no longer sort as their steps do)."""
    return sorted((step, p) for p in root.glob("step-*") if (step := _step(p.name)) is not None)


def _damaged(path: Path, e: CheckpointReadError) -> TrainingError:
    """The error for the checkpoint ``path`` that holds a file that cannot be read (``e``), with what to do."""
    cut = _step(path.name)  # None: a folder of another name (``latest`` may name any), so every step-N is a choice
    older = [p.name for step, p in _checkpoints(path.parent) if (cut is None or step < cut) and p.is_dir()]
    if older:
        fix = (
            f"resume from the checkpoint before it by writing {older[-1]} into {path.parent / LATEST} (checkpoints "
            f"kept: {', '.join(older)}), then remove {path}"
        )
    else:
        fix = f"there is no older checkpoint: remove {path.parent} to start the stage afresh"
    return TrainingError(f"{e}; the checkpoint {path} is damaged: {fix}")


def _write_failed(target: Path, e: OSError, previous: Path | None) -> TrainingError:
    """The error for the checkpoint ``target`` that could not be written (``e``); ``previous`` is kept."""
    why = str(e) if isinstance(e, WriteError) else f"{e.strerror or e}"  # a WriteError names the file
    if e.errno in FULL and not isinstance(e, WriteError):
        why += " (the disk is full: free space, then resume)"
    kept = f"; {previous} is intact" if previous else ""
    return TrainingError(f"checkpoint {target} not written: {why}{kept}")


def save_state(ckpt_dir: str | os.PathLike, model, trainer: dict[str, Any], keep: int = 2) -> Path:
    """Write ``model`` and ``trainer`` (a dict with at least ``step``) as a new checkpoint; prune old ones."""
    root = Path(ckpt_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{trainer['step']:07d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    previous = _pointed(root)  # frozen shards link from it
    try:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp, frozen_apart=True, frozen_from=previous)
        else:  # a training-only wrapper (e.g. the ViT pre-trainer): its tensors alone
            save_checkpoint(model, tmp, frozen_apart=True, frozen_from=previous)
        _save_torch({**trainer, "rng": rng_state()}, tmp / TRAINER_FILE)
    except BaseException as e:  # a failed write, or anything else: no partial checkpoint is left
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _write_failed(root / name, e, previous) from None
        raise
    return _publish(root, name, keep)


def _publish(root: Path, name: str, keep: int) -> Path:
    """Rename the complete ``.{name}.tmp`` into place, point ``latest`` at it, prune to the ``keep`` newest. Those
    past it are of a run resumed from an earlier checkpoint (``latest`` pointed back at one kept, the newest being
    damaged): their steps are trained again, and they are removed, not kept in place of the one resumed from."""
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(root / f".{name}.tmp", final)
    write_text_atomic(root / LATEST, name + "\n")
    published, kept = _step(name), _checkpoints(root)
    for abandoned in (p for step, p in kept if step > published):
        shutil.rmtree(abandoned, ignore_errors=True)
    older = [p for step, p in kept if step < published]
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for torn in root.glob(".step-*.tmp"):  # left by a kill mid-save
        shutil.rmtree(torn, ignore_errors=True)
    log.info("checkpoint %s written", final)
    return final


def save_state_sharded(
    ckpt_dir: str | os.PathLike, model, optimizer, trainer: dict[str, Any], world: World, keep: int = 2
) -> Path:
    """``save_state`` for a sharded model, on every rank together: weights and optimiser state by DCP
    (``kimivl.distributed.checkpoint``), ``trainer`` by rank 0, each rank's RNG state beside them."""
    root = Path(ckpt_dir)
    name = f"step-{trainer['step']:07d}"
    tmp, final = root / f".{name}.tmp", root / name
    previous = _pointed(root)
    try:
        if world.main:
            root.mkdir(parents=True, exist_ok=True)
        save_sharded(tmp, model, optimizer, world)
        _save_torch(rng_state(), tmp / f"rng-{world.rank}.pt")
        world.barrier()
        if world.main:
            _save_torch(trainer, tmp / TRAINER_FILE)
            _publish(root, name, keep)
    except BaseException as e:  # on the rank that failed, which may not be rank 0: no partial checkpoint is left
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _write_failed(final, e, previous) from None
        raise
    world.barrier()
    return final


def _pointed(root: Path) -> Path | None:
    """The checkpoint ``root``'s ``latest`` file names; None without one."""
    pointer = root / LATEST
    return root / pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    path = _pointed(Path(ckpt_dir))
    if path is None:
        return None
    if not (path / TRAINER_FILE).is_file():
        raise FileNotFoundError(f"{Path(ckpt_dir) / LATEST} names {path}, which is not a complete checkpoint")
    return path


def load_state(path: str | os.PathLike, model) -> dict[str, Any]:
    """Restore ``model`` weights and the global RNG from checkpoint ``path``; return the trainer dict."""
    path = Path(path)
    try:
        load_checkpoint(model, path)
        trainer = _load_torch(path / TRAINER_FILE)
    except CheckpointReadError as e:
        raise _damaged(path, e) from None
    except CheckpointError as e:  # readable, but not this model's tensors
        raise TrainingError(
            f"{e}: the checkpoint was written for another model, or by an earlier kimivl that shaped them otherwise "
            f"(the vit stage's log_temp and logit_bias before 2026-12-06): resume with the recipe and kimivl that "
            f"wrote it, or start the stage afresh (remove {path.parent})"
        ) from None
    set_rng_state(trainer.pop("rng"))
    return trainer


def load_state_sharded(path: Path, model, optimizer, world: World) -> None:
    """``load_state`` for a sharded model, on every rank: its shards of weights and optimiser state, its RNG state
    (rank 0's when the saving run had fewer ranks); the caller reads the trainer dict."""
    rng = path / f"rng-{world.rank}.pt"
    try:
        load_sharded(path, model, optimizer, world)
        set_rng_state(_load_torch(rng if rng.is_file() else path / "rng-0.pt"))
    except CheckpointReadError as e:
        raise _damaged(path, e) from None


def _group_record(group: dict[str, Any]) -> dict[str, Any]:
    """A sharded checkpoint's record of one param group: its hyperparameters (the current lr among them) and the
    elements it trains (a group that trains other parameters, after ``freeze`` or ``ep`` changed, no longer fits)."""
    return {k: v for k, v in group.items() if k != "params"} | {"numel": sum(p.numel() for p in group["params"])}


def _restore_groups(optimizer: torch.optim.Optimizer, saved: list[dict[str, Any]]) -> None:
    """The hyperparameters of each param group, as ``Optimizer.load_state_dict`` would; a ``ValueError`` when the
    groups are not those saved (names, or the elements they train)."""
    now = [_group_record(g) for g in optimizer.param_groups]
    for record, values in zip(now, saved):
        if "numel" in values and values["numel"] != record["numel"]:
            raise ValueError(f"group {record.get('name')} trains {record['numel']} elements, {values['numel']} saved")
    if [g.get("name") for g in now] != [g.get("name") for g in saved]:
        raise ValueError(f"param groups {[g.get('name') for g in now]} vs saved {[g.get('name') for g in saved]}")
    for group, values in zip(optimizer.param_groups, saved):
        group.update({k: v for k, v in values.items() if k != "numel"})


NOT_COMPARED = ("params", "lr", "initial_lr", "numel")  # the lr is the scheduler's, compared as its base_lrs


def _hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's settings that a resume must find unchanged (``betas`` as a tuple, however it was stored)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in group.items() if k not in NOT_COMPARED}


def _differences(then: dict[str, Any], now: dict[str, Any], keys) -> list[str]:
    """``key: value then, value now`` for each of ``keys`` (sorted) whose values in ``then`` and ``now`` differ."""
    return [f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in sorted(keys) if then.get(k) != now.get(k)]


def _changed_hyperparameters(wanted: list[dict[str, Any]], restored: list[dict[str, Any]]) -> list[str]:
    """``key: value then, value now`` for each setting that the restored param groups hold otherwise than
    ``wanted``, the run's own, each once (a key the checkpoint does not hold is not compared)."""
    changed = []
    for now, then in zip(wanted, map(_hyperparameters, restored)):
        changed += [line for line in _differences(then, now, now.keys() & then.keys()) if line not in changed]
    return changed


def _schedule_changes(then: dict[str, Any], now: dict[str, Any], multipliers: bool) -> list[str]:
    """``what: value then, value now`` for the base lrs and (``multipliers``) each field of the multipliers
    (``lr_lambdas``, one per param group and the same in each) that differ, each once."""
    changed = []
    if then.get("base_lrs") != now.get("base_lrs"):
        changed.append(f"base_lrs: {then.get('base_lrs')} then, {now.get('base_lrs')} now")
    if multipliers:
        for a, b in zip(then["lr_lambdas"], now["lr_lambdas"]):
            a, b = a or {}, b or {}
            changed += [line for line in _differences(a, b, a.keys() | b.keys()) if line not in changed]
    return changed


@dataclass
class TrainState:
    """What a stage saves and resumes: the model, optimizer and scheduler, the step, the data position, and any other
    part with ``state_dict``/``load_state_dict`` (``extras``, e.g. the RL problem sampler), under
    ``run_dir/stage/checkpoints``."""

    ckpt_dir: Path
    stage: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    extras: dict[str, Any] = field(default_factory=dict)
    keep: int = 2
    world: World = field(default_factory=World)  # a sharded world saves and resumes with DCP
    settings: dict[str, Any] | None = None  # the stage's settings, each compared on resume (``StageSettings.record``)
    sources: dict[str, dict[str, Any]] | None = None  # each data source's record count and index digest
    bf16: bool | None = None  # whether the stage computes under bf16 autocast (None: not recorded, not compared)
    stream: Any = None  # a data stream's state_dict/load_state_dict (a Mixture's draw counts), saved with position
    step: int = 0
    position: int = 0
    saved: Path | None = None  # the checkpoint of the current step; None while the step has progress not on disk

    def resume(self) -> Path | None:
        """Load the latest checkpoint, if there is one; returns it."""
        found = latest_checkpoint(self.ckpt_dir)
        if found is None:
            return None
        if is_sharded(found) != self.world.active:
            wrote, runs = ("a sharded", "one process") if is_sharded(found) else ("a one-process", "sharded")
            raise TrainingError(
                f"{self.stage}: {found} is {wrote} run's checkpoint, and this run is {runs}: resume it as it was "
                "launched (torchrun and parallel, or neither), or start the stage afresh"
            )
        if self.world.active:
            try:
                state = _load_torch(found / TRAINER_FILE)
            except CheckpointReadError as e:
                raise _damaged(found, e) from None
            written = state.get("ep", self.world.ep)
            if written != self.world.ep:  # DCP would load no expert of the other layout, and say nothing
                raise TrainingError(
                    f"{self.stage}: {found} was written with ep {written} and this run has ep {self.world.ep}: "
                    f"resume with ep {written} (parallel: {{ep: {written}}} or --ep {written}), or start the stage "
                    "afresh"
                )
            load_state_sharded(found, self.model, self.optimizer, self.world)
        else:
            state = load_state(found, self.model)
        wanted = [_hyperparameters(g) for g in self.optimizer.param_groups]
        try:
            if self.world.active:
                _restore_groups(self.optimizer, state["param_groups"])
            else:
                self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:
            raise TrainingError(
                f"{self.stage}: the optimiser state in {found} does not fit the parameters this run "
                f"trains ({e}); resume with the stage's settings of that run (train, freeze, "
                "lr_scale), or start the stage afresh"
            ) from None
        changed = _changed_hyperparameters(wanted, self.optimizer.param_groups)
        if changed:  # loading the optimiser restored the checkpoint's values over the run's
            raise TrainingError(
                f"{self.stage}: the optimiser settings of this run differ from those {found} was trained with "
                f"({'; '.join(changed)}): weight_decay or ns_dtype changed in the recipe. Resume with that run's "
                f"settings, or start the stage afresh (remove {self.ckpt_dir})"
            )
        self._check_schedule(found, state["scheduler"])
        self._check_settings(found, state.get("settings"), state.get("data"))
        self._check_sources(found, state.get("sources"))
        self._check_bf16(found, state.get("bf16"))
        self.scheduler.load_state_dict(state["scheduler"])
        for name, part in self.extras.items():
            part.load_state_dict(state[name])
        if self.stream is not None and "stream" in state:  # a checkpoint written before kimivl kept it: none to load
            self._load_stream(found, state["stream"])
        self.step, self.position, self.saved = state["step"], state.get("position", 0), found
        log.info("%s: resumed at step %d from %s", self.stage, self.step, found)
        return found

    def _load_stream(self, found: Path, then: dict[str, Any]) -> None:
        """Restore the data stream's state (a ``Mixture``'s draw counts). State of another stream, which it leaves, is
        named in a warning: the samples still to come are this run's stream's, and a pass without replacement may draw
        some records twice and others never."""
        differs = self.stream.load_state_dict(then)
        if differs and self.world.main:
            log.warning(
                "%s: the data stream of this run is not the one %s saved its draws of (%s): the samples still to come "
                "are this run's, their draws counted again from sample 0, and without replacement the rest of the "
                "pass may draw some records twice and others never; to draw each once, resume with the kimivl and "
                "data that saved it, or start the stage afresh (remove %s)",
                self.stage,
                found,
                differs,
                self.ckpt_dir,
            )

    def _check_schedule(self, found: Path, then: dict[str, Any]) -> None:
        """Refuse a checkpoint whose scheduler had another base lr or multiplier (loading it would quietly keep the
        old schedule). A multiplier recorded as None (a 'continue' stage's, saved before kimivl recorded it) cannot be
        compared: the run goes on with its own, with a warning."""
        now = self.scheduler.state_dict()
        unrecorded = any(f is None for f in then["lr_lambdas"]) and all(f is not None for f in now["lr_lambdas"])
        if unrecorded and self.world.main:  # every rank reads the same checkpoint: rank 0 says it
            log.warning(
                "%s: %s holds no record of its learning-rate schedule (written before kimivl kept one): going on "
                "with this run's, which must be the recipe's schedule of that run",
                self.stage,
                found,
            )
        changed = _schedule_changes(then, now, multipliers=not unrecorded)
        if changed:
            raise TrainingError(
                f"{self.stage}: the learning-rate schedule of this run differs from the one {found} was trained "
                f"with ({'; '.join(changed)}): lr, steps, "
                "warmup or the schedule changed in the recipe (or, for a stage that continues the recipe-wide "
                "schedule, schedule.warmup, decay_stages, min_ratio or the steps of the stages that continue it). "
                f"Resume with that run's settings, or start the stage afresh (remove {self.ckpt_dir})"
            )

    def _check_settings(self, found: Path, then: dict[str, Any] | None, data: dict[str, Any] | None) -> None:
        """Refuse a checkpoint trained under other settings of the stage (``settings``, compared key by key: its
        ``clip``, ``rope_theta``, ``accum``, a joint stage's ``mix``, an rl stage's ``rl.temperature``, ...): the rest
        of the stage would train otherwise than its start, and a changed data setting would go on from the saved
        position in another stream (a pass without replacement drawing some records twice and others never). A key the
        checkpoint holds no record of is not compared, with a warning: a checkpoint of an earlier kimivl recorded
        none, or only the settings its data stream followed (``data``)."""
        if self.settings is None:
            return
        then = then if then is not None else data or {}
        unrecorded = sorted(self.settings.keys() - then.keys())
        if unrecorded and self.world.main:
            log.warning(
                "%s: %s holds no record of the stage's settings %s (written before kimivl kept them): going on with "
                "this run's, which must be the recipe's settings of that run",
                self.stage,
                found,
                ", ".join(unrecorded),
            )
        if not then and self.settings.get("replacement") is False and self.world.main:
            log.warning(
                "%s: %s may come from a kimivl before 2026-12-06, whose joint stages drew their samples in another "
                "order: the rest of this pass without replacement may draw some records twice and others never; to "
                "draw each record once per pass, resume with that kimivl, or start the stage afresh (remove %s)",
                self.stage,
                found,
                self.ckpt_dir,
            )
        changed = _differences(then, self.settings, self.settings.keys() & then.keys())
        if changed:
            raise TrainingError(
                f"{self.stage}: the settings of this run differ from those {found} was trained with "
                f"({'; '.join(changed)}): the rest of the stage would train otherwise than its start (and its samples "
                "still to come, and which records a pass without replacement has drawn, follow its data settings). "
                f"Resume with that run's settings, or start the stage afresh (remove {self.ckpt_dir})"
            )

    def _check_sources(self, found: Path, then: dict[str, dict[str, Any]] | None) -> None:
        """Refuse a checkpoint whose data sources held another number of records: the samples still to come pick
        records by their index, which would name other records (a pass without replacement drawing some twice and
        others never, an RL sampler's successes belonging to other problems). Records changed in place, as many as
        before (a bad record fixed, as a data error asks), resume with a warning naming the sources; a source whose
        ``answers_only`` was toggled is refused. A checkpoint that holds no record of its sources (written before
        kimivl kept one) resumes."""
        if self.sources is None or then is None:
            return
        names = sorted(self.sources.keys() & then.keys())
        counts = [
            f"{name}: {then[name]['records']} records then, {self.sources[name]['records']} now"
            for name in names
            if then[name]["records"] != self.sources[name]["records"]
        ]
        if counts:
            raise TrainingError(
                f"{self.stage}: the data sources of this run hold another number of records than when {found} was "
                f"saved ({'; '.join(counts)}): the samples still to come pick records by their index, which would "
                "name other records (without replacement, a pass would draw some twice and others never). Restore "
                "the records (fix a bad record in place: one corrected line for it, not none), or start the stage "
                f"afresh (remove {self.ckpt_dir})"
            )
        toggled = [
            f"{name}: answers_only {then[name]['answers_only']} then, {self.sources[name]['answers_only']} now"
            for name in names
            if "answers_only" in then[name] and then[name]["answers_only"] != self.sources[name].get("answers_only")
        ]
        if toggled:
            raise TrainingError(
                f"{self.stage}: the data sources of this run are read otherwise than when {found} was saved "
                f"({'; '.join(toggled)}): the rest of the stage would train on other targets than its start. Resume "
                f"with that run's sources, or start the stage afresh (remove {self.ckpt_dir})"
            )
        edited = [name for name in names if then[name]["index"] != self.sources[name]["index"]]
        if edited and self.world.main:
            log.warning(
                "%s: data sources %s changed since %s was saved (as many records, other bytes): going on with the "
                "records as they are now, which is right for a bad record fixed in place; if records were reordered "
                "or replaced, the rest of the stage draws other ones than its start did: stop, restore them, or start "
                "the stage afresh (remove %s)",
                self.stage,
                ", ".join(edited),
                found,
                self.ckpt_dir,
            )

    def _check_bf16(self, found: Path, then: bool | None) -> None:
        """Refuse a checkpoint trained under the other precision (bf16 autocast, or float32): the rest of the stage
        would compute otherwise than its start, silently. A checkpoint that holds no record of it (written before
        kimivl kept one) resumes with this run's."""
        if then is None or self.bf16 is None or then == self.bf16:
            return
        was, flag = ("bf16 autocast", "--bf16") if then else ("float32, without bf16 autocast", "--no-bf16")
        now = "bf16 autocast" if self.bf16 else "float32"
        raise TrainingError(
            f"{self.stage}: {found} was trained in {was}, and this run computes in {now}: resume with {flag} (or "
            f"bf16: {str(then).lower()} in the recipe), or start the stage afresh (remove {self.ckpt_dir})"
        )

    def advance(self, position: int = 0) -> None:
        """One step done, the data read up to ``position``."""
        self.step, self.position, self.saved = self.step + 1, position, None

    def save(self) -> Path:
        """A checkpoint of the current step (written once)."""
        if self.saved is None:
            trainer = {
                "step": self.step,
                "position": self.position,
                "scheduler": self.scheduler.state_dict(),
                **{n: p.state_dict() for n, p in self.extras.items()},
                **({"settings": self.settings} if self.settings is not None else {}),
                **({"sources": self.sources} if self.sources is not None else {}),
                **({"bf16": self.bf16} if self.bf16 is not None else {}),
                **({"stream": self.stream.state_dict()} if self.stream is not None else {}),
            }
            if self.world.active:  # the optimiser's tensors go by DCP, its hyperparameters (the current lr) here
                trainer["param_groups"] = [_group_record(group) for group in self.optimizer.param_groups]
                trainer["ep"] = self.world.ep
                self.saved = save_state_sharded(
                    self.ckpt_dir, self.model, self.optimizer, trainer, self.world, keep=self.keep
                )
            else:
                trainer["optimizer"] = self.optimizer.state_dict()
                self.saved = save_state(self.ckpt_dir, self.model, trainer, keep=self.keep)
        return self.saved

    def stop_if_asked(self, request: StopRequest, total: int) -> None:
        """After a step: when Ctrl-C asked to stop, save the step and raise ``Interrupted``."""
        if request.requested:
            raise Interrupted(
                f"{self.stage}: stopped at your request after step {self.step} of {total}; saved at {self.save()}"
            )

    def last_good(self, weights_ok: bool) -> str:
        """Where the last good state is (``step.LastGood``): saved now while the weights are good, else the newest
        checkpoint on disk."""
        if weights_ok:
            return f"saved at {self.save()}"
        found = latest_checkpoint(self.ckpt_dir)
        return f"the checkpoint {found}" if found else f"the start of the stage (no checkpoint under {self.ckpt_dir})"
