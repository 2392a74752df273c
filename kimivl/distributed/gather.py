"""A sharded model made whole again, tensor by tensor, for the official-format checkpoint of a stage or an export:
every rank takes part in gathering each tensor, rank 0 keeps it (on the CPU), the others drop it at once."""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from kimivl.distributed.world import World
from kimivl.model.kimivl import KimiVL
from kimivl.model.moe import GroupedExperts


def full_state(model: nn.Module, world: World) -> dict[str, torch.Tensor] | None:
    """Every rank: each parameter and buffer of ``model`` whole (with expert parallelism, every expert group's experts
    in order); rank 0 gets them as CPU tensors under their module names, the other ranks None."""
    experts = {
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, GroupedExperts)
        for p in ("gate_up_proj", "down_proj")
    }
    out: dict[str, torch.Tensor] | None = {} if world.main else None
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        whole = t.detach().full_tensor() if isinstance(t, DTensor) else t.detach()
        if world.ep > 1 and name in experts:
            parts = [torch.empty_like(whole) for _ in range(world.ep)]
            dist.all_gather(parts, whole.contiguous(), group=world.ep_group())
            whole = torch.cat(parts)
        if out is not None:
            out[name] = whole.cpu().clone()
        del whole
    return out


def whole_model(model: KimiVL, world: World) -> KimiVL | None:
    """Every rank: gather ``model``; rank 0 gets it as a plain float32 ``KimiVL`` on the CPU, the others None."""
    state = full_state(model, world)
    if state is None:
        return None
    with torch.device("meta"):
        whole = KimiVL(model.config)
    whole = whole.to_empty(device="cpu")
    whole.load_state_dict(state, assign=True)
    return whole
