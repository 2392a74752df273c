"""A sharded model made whole again, tensor by tensor, for the official format: every rank takes part in gathering
each tensor, rank 0 keeps it (on the CPU), the others drop it at once. ``save_gathered`` writes the official
safetensors file by file as their tensors arrive, so rank 0 holds at most about one file's worth."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from kimivl.checkpoint import (
    CheckpointError,
    _atomic_save,
    _for_file,
    _shards,
    check_save_arguments,
    saved_dtype,
    shard_file_names,
    write_index,
)
from kimivl.distributed.load import CheckpointReader
from kimivl.distributed.world import World
from kimivl.model.kimivl import KimiVL
from kimivl.model.moe import GroupedExperts, expert_views


def gathered_tensors(model: nn.Module, world: World) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Every rank, in step: each parameter and buffer of ``model`` by module name, whole (with expert parallelism,
    every expert group's experts in order): a CPU tensor on rank 0, None on the others. They come in the order of
    ``state_dict()`` (each module's own parameters, then its own buffers, then its submodules'), the order the
    official files are planned in, so each file is complete once its last tensor comes. Tensors still on the meta
    device (not loaded on any rank) are left out."""
    experts = {
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, GroupedExperts)
        for p in ("gate_up_proj", "down_proj")
    }
    for name, t in _in_state_dict_order(model):
        if t.is_meta:
            continue
        whole = t.detach().full_tensor() if isinstance(t, DTensor) else t.detach()
        if world.ep > 1 and name in experts:
            parts = [torch.empty_like(whole) for _ in range(world.ep)]
            dist.all_gather(parts, whole.contiguous(), group=world.ep_group())
            whole = torch.cat(parts)
        yield name, whole.cpu().clone() if world.main else None
        del whole


def _in_state_dict_order(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for prefix, module in model.named_modules():
        for name, t in itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            yield f"{prefix}.{name}" if prefix else name, t


def save_gathered(
    model: KimiVL,
    path: str | os.PathLike,
    world: World,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    source: str | os.PathLike | None = None,
) -> None:
    """Every rank: ``model`` (sharded) written by rank 0 to the new directory ``path`` in the official format
    (``config.json`` and safetensors under the official names, sharded above ``max_shard_bytes``, floats in ``dtype``
    if given), each file written as soon as its tensors are gathered. The tensors ``model`` holds on the meta device
    (a stage that loaded only what it trains) are copied from the checkpoint ``source``, a file's worth at a time."""
    check_save_arguments(max_shard_bytes, dtype)
    with torch.device("meta"):  # the official names and shapes, in the order a one-process save writes them
        whole_layout = KimiVL(model.config)
    layout = whole_layout.state_dict()
    planned = {k: torch.empty(t.shape, dtype=saved_dtype(k, t, dtype), device="meta") for k, t in layout.items()}
    groups = _shards(planned, max_shard_bytes)
    names = shard_file_names(len(groups))
    file_of = {k: i for i, keys in enumerate(groups) for k in keys}
    stacks = {
        f"{n}.{p}": m.hidden
        for n, m in model.named_modules()
        if isinstance(m, GroupedExperts)
        for p in ("gate_up_proj", "down_proj")
    }
    unloaded = {n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta}
    tensors = dict(itertools.chain(whole_layout.named_parameters(), whole_layout.named_buffers()))
    copied = {key for n in unloaded for key, _ in _official(n, tensors[n], stacks.get(n))}
    if copied and source is None:
        raise ValueError(f"{len(unloaded)} tensors of the model are not loaded (e.g. {min(unloaded)}): pass source")
    gathered = [sum(k not in copied for k in keys) for keys in groups]  # tensors each file gets from the ranks
    pending: dict[int, dict[str, torch.Tensor]] = {}
    with CheckpointReader(source) if copied and world.main else contextlib.nullcontext() as reader:

        def write(i: int) -> None:
            held = pending.pop(i, {})
            for key in groups[i]:
                if key in copied:
                    if (values := reader.read(key)) is None:
                        raise CheckpointError(f"{source} lacks {key}, which the model did not load")
                    held[key] = values.to(planned[key].dtype)
            _atomic_save(held, os.path.join(path, names[i]))

        if world.main:
            os.makedirs(path)
        for name, whole in gathered_tensors(model, world):
            if whole is None:
                continue
            for key, t in _official(name, whole, stacks.get(name)):
                i = file_of[key]
                pending.setdefault(i, {})[key] = _for_file(key, t, dtype)
                if len(pending[i]) == gathered[i]:
                    write(i)
        if world.main:
            for i in [i for i, n in enumerate(gathered) if n == 0]:  # files of copied tensors alone
                write(i)
    if world.main:
        if pending:
            missing = [k for i, held in pending.items() for k in groups[i] if k not in held]
            raise RuntimeError(f"the gathered model lacks tensors of the official layout: {missing[:5]}")
        if len(groups) > 1:
            total = sum(t.numel() * t.element_size() for t in planned.values())
            write_index(path, {k: names[i] for k, i in file_of.items()}, total)
        model.stored_config(dtype).save_pretrained(path)


def _official(name: str, whole: torch.Tensor, hidden: int | None) -> Iterator[tuple[str, torch.Tensor]]:
    """A module tensor under its official name(s): a stack of experts as one tensor per expert and projection."""
    if hidden is None:
        yield name, whole
        return
    prefix, stack = name.rsplit(".", 1)
    for key, view in expert_views(stack, whole, hidden, 0).items():
        yield f"{prefix}.{key}", view
