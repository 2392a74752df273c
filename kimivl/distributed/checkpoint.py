"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards of the
weights and optimiser state into one directory (across nodes, a filesystem they share), rank 0 adds ``trainer.pt``
(step, data position, scheduler, ...) and each rank its RNG state. The directory is written under a temporary name
and renamed by rank 0 once every rank is done, so a kill leaves the previous checkpoint intact, as in one process.

DCP stores each sharded tensor with its global shape, so a checkpoint can be resumed on another number of ranks,
except that with expert parallelism each expert group's local experts are saved under their own keys (``@ep{r}``):
those resume with the same ``ep``.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from kimivl.checkpoint import CheckpointError, CheckpointReadError, CheckpointWriteError, write_error
from kimivl.distributed.world import World
from kimivl.model.moe import GroupedExperts

METADATA = ".metadata"  # DCP's index, written last by rank 0


def is_sharded(path: Path) -> bool:
    """Whether the checkpoint at ``path`` is a DCP one."""
    return (Path(path) / METADATA).is_file()


def _tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer, world: World
) -> tuple[dict[str, Any], dict[str, tuple[dict, str]]]:
    """Model weights and buffers, then optimiser state, keyed by parameter name; and where each integer of the
    optimiser state (a step count, saved as a tensor) lives."""
    local_experts = {
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, GroupedExperts)
        for p in ("gate_up_proj", "down_proj")
    }
    suffix = f"@ep{world.ep_rank}" if world.ep > 1 else ""
    keys: dict[int, str] = {}
    state: dict[str, Any] = {}
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        key = name + (suffix if name in local_experts else "")
        keys[id(t)] = key
        state[f"model/{key}"] = t.detach()
    ints = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            held = optimizer.state.get(p, {})
            for k, v in held.items():
                key = f"optimizer/{keys[id(p)]}/{k}"
                if not isinstance(v, torch.Tensor):
                    ints[key] = (held, k)
                    v = torch.tensor(v)
                state[key] = v
    return state, ints


def save_sharded(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> None:
    """Every rank: write its shards of weights and optimiser state into ``tmp`` (a fresh directory)."""
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
    world.barrier()
    try:
        dcp.save(_tensors(model, optimizer, world)[0], checkpoint_id=str(tmp))
    except CheckpointException as e:  # a BaseException, holding each failed rank's error
        rank, error = _first_failure(e)
        if isinstance(error, OSError):
            raise write_error(error, tmp) from None
        free = shutil.disk_usage(tmp.parent).free / 2**20  # torch reports a short write (a full disk) as this
        raise CheckpointWriteError(
            f"cannot write {tmp} (rank {rank}: {type(error).__name__}: {error}); {free:.0f} MiB are free on its disk"
        ) from None


def _first_failure(e: CheckpointException) -> tuple[int, BaseException]:
    """The failed rank of ``e`` with the lowest number and its error: the ``OSError`` it met where it kept one."""
    rank = min(e.failures)
    error = met = e.failures[rank][0]
    while met is not None and not isinstance(met, OSError):
        met = met.__context__
    return rank, met or error


def _damaged_files(path: Path) -> list[str]:
    """The files of the DCP checkpoint at ``path`` known to be damaged: ``.metadata`` when it cannot be read, else the
    shard files that are missing or shorter than it says."""
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception:  # noqa: BLE001 - every way a damaged file fails to read
        return [METADATA]
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    return [
        name
        for name, size in sorted(needed.items())
        if not (path / name).is_file() or os.path.getsize(path / name) < size
    ]


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> None:
    """Every rank: read its shards of weights and optimiser state from ``path`` in place. The optimiser's state is
    created first (``init_state``) so that it has tensors to fill; state a parameter never had stays at its start."""
    optimizer.init_state()
    state, ints = _tensors(model, optimizer, world)
    try:
        dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
    except CheckpointException as e:
        rank, error = _first_failure(e)
        damaged = _damaged_files(Path(path))
        if damaged:
            which = ", ".join(str(Path(path) / n) for n in damaged)
            raise CheckpointReadError(f"cannot read {which}: damaged or cut short (rank {rank})") from None
        if isinstance(error, ValueError) and str(error).startswith("Size mismatch"):  # whole files, other shapes
            raise CheckpointError(
                f"{path} does not fit this model (rank {rank}: {str(error).splitlines()[0][:200]}): resume with the "
                "model of the run that wrote it, or start the stage afresh"
            ) from None
        raise CheckpointReadError(
            f"cannot read the files of {path}: damaged (rank {rank}: {type(error).__name__})"
        ) from None
    for key, (held, k) in ints.items():
        held[k] = int(state[key])
