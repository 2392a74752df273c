"""Fresh weights for training from scratch: normal(0, std) matrices, embeddings and expert stacks, zero biases, unit
norms.

Every tensor draws from its own generator, seeded by (seed, the tensor's module name), and each routed expert of a
stack from its own (seed, name, global expert id): a value depends neither on the order of initialisation nor on the
other tensors, so a sharded model can draw just the rows and experts a rank holds and get exactly the one-process
values (``init_weights`` with ``kimivl.distributed.load.local_rows``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from kimivl.model.moe import GroupedExperts, Router
from kimivl.model.moonvit import PositionEmbedding
from kimivl.model.norm import RMSNorm


def init_rule(owner: nn.Module, attr: str) -> str:
    """How ``owner``'s parameter or buffer ``attr`` starts: ``normal``, ``zeros`` or ``ones``."""
    if isinstance(owner, (nn.Linear, nn.Conv2d, nn.Embedding, Router)):
        return "normal" if attr == "weight" else "zeros"  # a router's bias is its load-balancing buffer
    if isinstance(owner, (GroupedExperts, PositionEmbedding)):
        return "normal"
    if isinstance(owner, (nn.LayerNorm, RMSNorm)):
        return "ones" if attr == "weight" else "zeros"
    raise ValueError(f"no initialisation rule for {type(owner).__name__}.{attr}: add one to kimivl.model.init")


def draw(rule: str, shape: torch.Size, seed: int, key: str, std: float) -> torch.Tensor:
    """A float32 CPU tensor of ``shape`` by ``rule``; normal values come from the generator of (``seed``, ``key``)."""
    if rule != "normal":
        return torch.zeros(shape) if rule == "zeros" else torch.ones(shape)
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def initial_rows(
    owner: nn.Module, attr: str, name: str, shape: torch.Size, seed: int, std: float, first: int, count: int
):
    """Rows [first, first + count) of the fresh value of ``owner``'s tensor ``attr`` (module name ``name``, whole
    shape ``shape``); for a stack of routed experts, the experts of global ids [first, first + count)."""
    rule = init_rule(owner, attr)
    if isinstance(owner, GroupedExperts):
        return torch.stack([draw(rule, shape[1:], seed, f"{name}.{e}", std) for e in range(first, first + count)])
    whole = draw(rule, shape, seed, name, std)
    return whole[first : first + count] if whole.dim() else whole


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, std: float, shard: Callable | None = None) -> None:
    """Fill every parameter and buffer of ``model`` (allocated) with its fresh value. For a sharded model, ``shard``
    maps a tensor to the part this rank holds and the global index of its first row."""
    for name, owner, attr, t in owned_tensors(model):
        mine, first = shard(t) if shard else (t, 0)
        first += owner.expert_offset if isinstance(owner, GroupedExperts) else 0
        mine.copy_(initial_rows(owner, attr, name, t.shape, seed, std, first, mine.shape[0] if t.dim() else 0))


def owned_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """Every parameter and buffer of ``model`` as (full name, the module holding it, its name there, the tensor)."""
    for prefix, owner in model.named_modules():
        for attr, t in [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]:
            yield f"{prefix}.{attr}" if prefix else attr, owner, attr, t
