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
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner

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
    dcp.save(_tensors(model, optimizer, world)[0], checkpoint_id=str(tmp))


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> None:
    """Every rank: read its shards of weights and optimiser state from ``path`` in place. The optimiser's state is
    created first (``init_state``) so that it has tensors to fill; state a parameter never had stays at its start."""
    optimizer.init_state()
    state, ints = _tensors(model, optimizer, world)
    dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
    for key, (held, k) in ints.items():
        held[k] = int(state[key])
