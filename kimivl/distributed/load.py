"""An official-format checkpoint read into a sharded model, each rank reading only the rows it holds (safetensors
slices), so no rank ever holds the whole model: for a weight split along dim 0, rows [offset, offset + local rows);
for a stack of routed experts, the official per-expert tensors of the experts this rank holds."""

from __future__ import annotations

import itertools
import math
import os
from contextlib import ExitStack

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from kimivl.checkpoint import IGNORED_SUFFIXES, CheckpointError, _read_headers, checkpoint_files
from kimivl.distributed.muon import local
from kimivl.distributed.world import World
from kimivl.model.moe import GroupedExperts


def first_row(t: torch.Tensor) -> int:
    """The global index of the first dim-0 row this rank holds of ``t`` (0 for a tensor that is not sharded)."""
    if not isinstance(t, DTensor):
        return 0
    row = 0
    for dim, placement in enumerate(t.placements):
        if isinstance(placement, Shard) and placement.dim == 0:
            row += t.device_mesh.get_local_rank(dim) * math.ceil(t.shape[0] / t.device_mesh.size(dim))
    return row


def load_sharded_checkpoint(model: nn.Module, path: str | os.PathLike, world: World) -> None:
    """Fill ``model`` (parallelized, allocated) from the checkpoint at ``path``; a missing or wrongly shaped tensor is
    a ``CheckpointError`` naming it."""
    found = {k: v for k, v in _read_headers(checkpoint_files(path)).items() if not k.endswith(IGNORED_SUFFIXES)}
    stacks = {f"{n}.": m for n, m in model.named_modules() if isinstance(m, GroupedExperts)}
    problems: list[str] = []
    with ExitStack() as files, torch.no_grad():
        opened = {}

        def read(key: str, rows: slice | None = None) -> torch.Tensor | None:
            if key not in found:
                problems.append(f"missing {key}")
                return None
            file = found[key][0]
            if file not in opened:
                opened[file] = files.enter_context(safe_open(file, framework="pt"))
            part = opened[file].get_slice(key)
            return part[rows] if rows is not None else part[:]

        for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
            mine, start = local(t.detach()), first_row(t)
            prefix = next((p for p in stacks if name.startswith(p) and "." not in name[len(p) :]), None)
            if prefix is not None:
                _read_experts(mine, start + stacks[prefix].expert_offset, prefix, name, read)
                continue
            if key_shape := found.get(name):
                if list(key_shape[1]) != list(t.shape):
                    problems.append(f"{name}: checkpoint {list(key_shape[1])} vs model {list(t.shape)}")
                    continue
            values = read(name, slice(start, start + mine.shape[0]) if t.dim() else None)
            if values is not None:
                mine.copy_(values)
    if problems:
        raise CheckpointError(f"checkpoint {os.fspath(path)} does not match the model: " + "; ".join(problems[:20]))


def _read_experts(mine: torch.Tensor, first: int, prefix: str, name: str, read) -> None:
    """This rank's experts of a stack, from the official ``experts.{e}.{gate,up,down}_proj.weight``."""
    for j in range(mine.shape[0]):
        e = f"{prefix}{first + j}"
        if name.endswith("gate_up_proj"):
            parts = [read(f"{e}.gate_proj.weight"), read(f"{e}.up_proj.weight")]
            if all(p is not None for p in parts):
                mine[j].copy_(torch.cat(parts))
        elif (down := read(f"{e}.down_proj.weight")) is not None:
            mine[j].copy_(down)
