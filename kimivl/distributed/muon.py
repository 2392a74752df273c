"""Muon on FSDP-sharded matrices, with the update of one process: Newton-Schulz needs a whole matrix, and FSDP gives
each rank some of its rows. Matrix i of a step is owned by rank i mod (shard group size): every rank sends the owner
its rows of the matrix's momentum-corrected gradient (``gather``), each owner orthogonalises the matrices it owns,
then sends every rank its rows of the result (``scatter``). The Newton-Schulz work is thus spread over the ranks, and
no rank holds more than its owned matrices whole. Stacks of expert matrices need none of this: FSDP shards them along
the expert dim, so every rank holds whole experts."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: in-place changes reach the DTensor), any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def row_sharded(p: torch.Tensor) -> bool:
    """A matrix whose rows FSDP split over ranks."""
    return isinstance(p, DTensor) and p.ndim == 2 and any(isinstance(x, Shard) for x in p.placements)


def _shard_group(p: DTensor) -> tuple[dist.ProcessGroup, int, int]:
    dim = next(i for i, x in enumerate(p.placements) if isinstance(x, Shard))
    return p.device_mesh.get_group(dim), p.device_mesh.size(dim), p.device_mesh.get_local_rank(dim)


def orthogonalize_sharded(
    items: list[tuple[DTensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]],
) -> list[torch.Tensor]:
    """For each (parameter, this rank's rows of U, f): this rank's rows of f(U) for the whole U."""
    owned, layout = [], []
    for i, (p, u, _) in enumerate(items):
        group, size, me = _shard_group(p)
        chunk = math.ceil(p.shape[0] / size)  # FSDP's split: torch.chunk along dim 0
        owner = i % size
        padded = F.pad(u, (0, 0, 0, chunk - u.shape[0]))
        rows = [torch.empty_like(padded) for _ in range(size)] if me == owner else None
        dist.gather(padded, rows, dst=dist.get_global_rank(group, owner), group=group)
        owned.append(torch.cat(rows)[: p.shape[0]] if rows is not None else None)
        layout.append((group, size, me, chunk, owner))
    results = [f(u) if u is not None else None for (_, _, f), u in zip(items, owned)]
    out = []
    for (p, u, _), o, (group, size, me, chunk, owner) in zip(items, results, layout):
        mine = torch.empty((chunk, *u.shape[1:]), dtype=u.dtype, device=u.device)
        parts = list(F.pad(o.to(u.dtype), (0, 0, 0, chunk * size - o.shape[0])).split(chunk)) if me == owner else None
        dist.scatter(mine, parts, src=dist.get_global_rank(group, owner), group=group)
        out.append(mine[: u.shape[0]])
    return out
