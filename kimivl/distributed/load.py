"""An official-format checkpoint read into a sharded model, each rank reading only the rows it holds (safetensors
slices), so no rank ever holds the whole model: for a weight split along dim 0, rows [offset, offset + local rows);
for a stack of routed experts, the official per-expert tensors of the experts this rank holds."""

from __future__ import annotations

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
from kimivl.model.init import owned_tensors
from kimivl.model.moe import GroupedExperts, expert_views


def first_row(t: torch.Tensor) -> int:
    """The global index of the first dim-0 row this rank holds of ``t`` (0 for a tensor that is not sharded)."""
    if not isinstance(t, DTensor):
        return 0
    row = 0
    for dim, placement in enumerate(t.placements):
        if isinstance(placement, Shard) and placement.dim == 0:
            row += t.device_mesh.get_local_rank(dim) * math.ceil(t.shape[0] / t.device_mesh.size(dim))
    return row


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The part of ``t`` this rank holds (``t`` itself when it is not sharded) and the global index of its first row."""
    return local(t.detach()), first_row(t)


@torch.no_grad()
def copy_rows(t: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy into ``t`` (sharded or not) this rank's rows of ``whole``, a tensor of ``t``'s whole shape."""
    mine, start = local_rows(t)
    mine.copy_(whole[start : start + mine.shape[0]] if t.dim() else whole)


class CheckpointReader:
    """The tensors of an official checkpoint by name, whole or by dim-0 rows, each file opened once; a context
    manager. Names that are not there are collected in ``missing`` (``read`` returns None for them)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        headers = _read_headers(checkpoint_files(path))
        self.found = {k: v for k, v in headers.items() if not k.endswith(IGNORED_SUFFIXES)}
        self.missing: list[str] = []
        self._files = ExitStack()
        self._opened = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self._files.close()

    def read(self, key: str, rows: slice | None = None) -> torch.Tensor | None:
        if key not in self.found:
            self.missing.append(key)
            return None
        file = self.found[key][0]
        if file not in self._opened:
            self._opened[file] = self._files.enter_context(safe_open(file, framework="pt"))
        part = self._opened[file].get_slice(key)
        return part[rows] if rows is not None else part[:]


@torch.no_grad()
def load_sharded_checkpoint(model: nn.Module, path: str | os.PathLike, world: World, prefix: str = "") -> None:
    """Fill ``model`` (parallelized or not, allocated) from the checkpoint at ``path``, whose names for ``model``'s
    tensors start with ``prefix`` (``vision_tower.`` for a tower alone); a missing or wrongly shaped tensor is a
    ``CheckpointError`` naming it."""
    problems: list[str] = []
    with CheckpointReader(path) as reader:
        for name, owner, attr, t in owned_tensors(model):
            mine, start = local_rows(t)
            name = prefix + name
            if isinstance(owner, GroupedExperts):  # this rank's experts, from the official per-expert tensors
                owner_name = name.removesuffix(attr)
                for key, view in expert_views(attr, mine, owner.hidden, owner.expert_offset + start).items():
                    if (values := reader.read(owner_name + key)) is not None:
                        view.copy_(values)
                continue
            if (key_shape := reader.found.get(name)) and list(key_shape[1]) != list(t.shape):
                problems.append(f"{name}: checkpoint {list(key_shape[1])} vs model {list(t.shape)}")
                continue
            values = reader.read(name, slice(start, start + mine.shape[0]) if t.dim() else None)
            if values is not None:
                mine.copy_(values)
        problems += [f"missing {key}" for key in reader.missing]
    if problems:
        raise CheckpointError(f"checkpoint {os.fspath(path)} does not match the model: " + "; ".join(problems[:20]))
