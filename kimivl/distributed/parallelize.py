"""Parallelism applied to a built model from outside, in this order:

1. expert parallelism (``ep`` > 1): each MoE layer keeps its expert group's share of the routed experts and sends
   tokens to them (``expert_parallel``);
2. activation checkpointing of decoder layers and vision blocks (``recompute``);
3. FSDP2 ``fully_shard``: with ``ep`` > 1 the local experts of each MoE layer over the ranks that hold the same
   experts (their weight gradients scaled by 1/ep in the forward, as each sums its whole expert group's tokens);
   each decoder layer; each vision block; then the root (embeddings, head, projector, the rest). Every parameter is
   sharded along dim 0, so a rank holds whole experts of a stack (Muon orthogonalises them locally).

Experts come first because FSDP must shard the local experts, not all of them; checkpointing comes before FSDP so
that the recomputed forward runs inside the FSDP unit, whose weights are gathered again for backward.

Weights stay float32 (master weights), gathered in float32, gradients reduced in float32; the compute dtype is set
as in one process, by bf16 autocast where the device multiplies bf16 fast, so a sharded step does the arithmetic of
a single-process one. Routers keep their float32 weights and bias (buffers are not sharded: every rank holds the
bias, and moves it with the globally summed expert load).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from kimivl.distributed.recompute import LAYERS, apply_recompute
from kimivl.distributed.world import World
from kimivl.model.moe import GroupedExperts


def parallelize(model: nn.Module, world: World, recompute: bool = False) -> nn.Module:
    """Shard ``model`` (in place) over ``world``'s mesh, its routed experts (if it has any: a vit stage's tower has
    none) split over ``world.ep`` ranks; returns it."""
    experts_split = world.ep > 1 and any(isinstance(m, GroupedExperts) for m in model.modules())
    if experts_split:
        from kimivl.distributed.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, world.ep_group(), weight_grad_scale=1 / world.ep)
    if recompute:
        apply_recompute(model)
    mesh = world.fsdp_mesh()
    for experts in [m for m in model.modules() if isinstance(m, GroupedExperts)] if experts_split else []:
        # a local expert's gradient sums its whole expert group's tokens, scaled by 1/ep in the forward: FSDP's mean
        # over the ranks that hold the same experts is then the mean over every rank
        fully_shard(experts, mesh=world.expert_fsdp_mesh())
    for layer in [m for m in model.modules() if isinstance(m, LAYERS)]:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)  # backward needs the root's weights right away
    if hasattr(model, "embed"):  # RL's log-prob forwards start at KimiVL.embed, not at forward
        register_fsdp_forward_method(model, "embed")
    return model


@contextlib.contextmanager
def gathered(model: nn.Module, within: nn.Module | None = None) -> Iterator[None]:
    """Every FSDP unit of a parallelized ``model`` (or only the root and the units inside its submodule ``within``)
    gathered whole on every rank for the block, so that forwards make no collective and each rank may run its own
    number of them (RL rollouts on each rank's own problems); sharded again after. Not with expert parallelism, whose
    forward exchanges tokens. On a model that is not sharded, a block like any other."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if within is not None:
        inside = set(within.modules())
        units = [m for m in units if m is model or m in inside]
    if not units:
        yield
        return
    model._get_fsdp_state()._lazy_init()  # the root first: a unit called before it would take itself for the root
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model)  # as parallelize left them
