"""An official-format checkpoint read into a sharded model, each rank reading only the rows it holds (safetensors
slices), so no rank ever holds the whole model: for a weight split along dim 0, rows [offset, offset + local rows);
for a stack of routed experts, the official per-expert tensors of the experts this rank holds. It is checked as
strictly as ``load_checkpoint`` checks a whole model (``check_tensors``), and non-finite values are named."""

from __future__ import annotations

import math
import os
from contextlib import ExitStack

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from kimivl.checkpoint import (
    IGNORED_SUFFIXES,
    _read_headers,
    check_tensors,
    checkpoint_files,
    is_finite,
    warn_non_finite,
)
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
    manager. ``found`` holds each tensor's header (file, shape, dtype); ``read`` returns None for a name not there."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        headers = _read_headers(checkpoint_files(path))
        self.found = {k: v for k, v in headers.items() if not k.endswith(IGNORED_SUFFIXES)}
        self._files = ExitStack()
        self._opened = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self._files.close()

    def read(self, key: str, rows: slice | None = None) -> torch.Tensor | None:
        if key not in self.found:
            return None
        file = self.found[key][0]
        if file not in self._opened:
            self._opened[file] = self._files.enter_context(safe_open(file, framework="pt"))
        part = self._opened[file].get_slice(key)
        return part[rows] if rows is not None else part[:]


def _targets(model: nn.Module, prefix: str) -> tuple[dict[str, tuple[torch.Tensor, int, torch.Tensor]], set[str]]:
    """What this rank loads, by checkpoint name: (the tensor as the checkpoint holds it, the first of its rows this
    rank reads, where they go); and the names of the experts that other expert-parallel ranks hold."""
    targets, elsewhere = {}, set()
    for name, owner, attr, t in owned_tensors(model):
        mine, start = local_rows(t)
        name = prefix + name
        if not isinstance(owner, GroupedExperts):
            targets[name] = (t, start, mine)
            continue
        # this rank's experts, from the official per-expert tensors (each read whole)
        owner_name = name.removesuffix(attr)
        for key, view in expert_views(attr, mine, owner.hidden, owner.expert_offset + start).items():
            targets[owner_name + key] = (view, 0, view)
        group = getattr(owner, "ep_group", None)
        total = owner.n_experts * (group.size() if group is not None else 1)
        every = torch.empty(total, 0, device="meta")  # the names of all the layer's experts (no values)
        elsewhere |= {owner_name + key for key in expert_views(attr, every, owner.hidden, 0)}
    return targets, elsewhere - targets.keys()


@torch.no_grad()
def load_sharded_checkpoint(model: nn.Module, path: str | os.PathLike, world: World, prefix: str = "") -> None:
    """Fill ``model`` (parallelized or not, allocated) from the checkpoint at ``path``, whose names for ``model``'s
    tensors start with ``prefix`` (``vision_tower.`` for a tower alone). As ``load_checkpoint``, all problems are
    reported in one ``CheckpointError``: a missing tensor, a wrongly shaped one (each expert's checked alone), one of
    the wrong kind, and one under ``prefix`` that the model does not hold (the experts of other expert-parallel
    ranks excepted); tensors with NaN or inf values are named in a warning."""
    targets, elsewhere = _targets(model, prefix)
    non_finite = []
    with CheckpointReader(path) as reader:
        found = {k: v for k, v in reader.found.items() if k.startswith(prefix)}
        check_tensors(path, found, {k: whole for k, (whole, _, _) in targets.items()}, elsewhere)
        for key, (whole, start, mine) in targets.items():
            mine.copy_(reader.read(key, slice(start, start + mine.shape[0]) if whole.dim() else None))
            if not is_finite(mine):
                non_finite.append(key)
    warn_non_finite(path, non_finite)
