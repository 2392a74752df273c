"""The memory one rank holds when training sharded: FSDP over ``dp_shard`` ranks, routed experts split over ``ep``.

Computed from parameter shapes and dtypes, before any weight exists (give a meta-device ``KimiVL``, frozen as the
stage trains it, whole: before expert parallelism). ``ep`` divides ``dp_shard``; the routed expert stacks are first
split into ``ep`` slices of E/ep experts, each of which ``dp_shard / ep`` ranks shard; every other parameter is sharded
over all ``dp_shard`` ranks. FSDP shards along dim 0 as ``torch.chunk`` does and pads every rank's shard to the
largest chunk, ceil(rows / ranks) rows, so every rank holds (and this plan counts) that many.

- weights: every parameter's shard, in its dtype (float32 masters; frozen weights as held, e.g. bfloat16);
- gradients: a float32 shard per trained parameter;
- optimiser state: Muon's momentum (one tensor) or AdamW's two moments per trained shard, as
  ``kimivl.train.trainable.memory_plan`` counts them in one process;
- gathered (an estimate): the parameters FSDP all-gathers for the computation, in their own dtype (kimivl gathers
  the float32 masters and computes under autocast, as one process does): the root unit
  (what is outside the decoder layers and vision blocks: embeddings, ``lm_head``, norms, projector, patch embedding),
  held through the step, plus two layers or blocks (the one running and the one prefetched), the largest; the
  unsharded gradients of the largest unit before they are reduce-scattered; and FSDP2's communication staging for
  the largest unit: the all-gather's output (from which the parameters are copied out) and the reduce-scatter's
  flattened input;
- activations (an estimate) for ``tokens`` language-model tokens in one forward and backward (in training, a packed
  row of the stage's ``budget``): with ``recompute`` (activation checkpointing) the input of every decoder layer
  (T D) plus one layer's tensors twice (kept for its backward, and their gradients); without it every layer's tensors
  plus one layer's gradients (each layer counted as the largest).
  A layer's tensors are its attention and its MLP as ``kimivl.inference.memory.prefill_activation_bytes`` counts them
  for one chunk of ``tokens`` tokens, with, under expert parallelism, the exchanged rows and outputs (2 T k D); the
  residual stream counts 4 T D and the logits T V, at most ``LOGITS_LIMIT`` of them (compute dtype, float32 copy,
  float32 gradient: the loss runs the head in chunks of positions past that limit). Image patches
  through the vision tower come on top.

Not counted: Muon's transient whole-matrix gradients on their owner ranks, the backend's own buffers, allocator slack.
``benchmarks/distributed.py`` compares the total with the peak of the live tensors on 1 and 2 CPU ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kimivl.config import TextConfig
from kimivl.inference.memory import prefill_activation_bytes
from kimivl.model.moe import GroupedExperts
from kimivl.model.target_logprobs import LOGITS_LIMIT
from kimivl.train.optim import partition_params
from kimivl.train.trainable import STATES


@dataclass
class RankMemoryPlan:
    """Bytes one rank holds while training sharded (see the module docstring for what each figure counts)."""

    dp_shard: int
    ep: int
    tokens: int
    weights: int
    gradients: int
    optimizer: int
    gathered: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activations

    def __str__(self) -> str:
        def gb(n: int) -> str:
            return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"

        return (
            f"per rank (dp_shard {self.dp_shard}, ep {self.ep}): weights {gb(self.weights)}, "
            f"gradients {gb(self.gradients)}, optimiser state {gb(self.optimizer)}, "
            f"gathered for compute {gb(self.gathered)}, activations {gb(self.activations)} per {self.tokens:,} tokens "
            f"(total {gb(self.total)})"
        )


def rank_memory_plan(
    model: nn.Module,
    dp_shard: int,
    ep: int = 1,
    tokens: int = 4096,
    compute_dtype: torch.dtype = torch.bfloat16,
    recompute: bool = True,
) -> RankMemoryPlan:
    """The per-rank plan of a whole ``KimiVL`` (meta device is enough) trained with FSDP over ``dp_shard`` ranks and
    its routed experts split over ``ep`` of them. ``ValueError`` for sizes that cannot shard this model."""
    for name, n in (("dp_shard", dp_shard), ("ep", ep), ("tokens", tokens)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    if dp_shard % ep:
        raise ValueError(f"ep ({ep}) must divide dp_shard ({dp_shard}): the expert-parallel ranks shard the experts")
    experts = {}
    for name, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            if module.expert_offset or getattr(module, "ep_group", None) is not None:
                raise ValueError(f"{name} is already split by expert parallelism: plan the whole model")
            if module.n_experts % ep:
                raise ValueError(f"ep ({ep}) must divide the {module.n_experts} routed experts of {name}")
            experts.update((id(p), p) for p in (module.gate_up_proj, module.down_proj))
    if ep > 1 and not experts:
        raise ValueError(f"ep ({ep}) splits routed experts, but the model has no MoE layer: use ep = 1")

    def shard(p: torch.Tensor) -> int:  # elements of this rank's FSDP shard
        if p.ndim == 0:
            return 1
        rows, ranks = (p.shape[0] // ep, dp_shard // ep) if id(p) in experts else (p.shape[0], dp_shard)
        return -(-rows // ranks) * math.prod(p.shape[1:])

    def gathered(p: torch.Tensor) -> int:  # elements of the parameter unsharded on this rank
        return p.numel() // ep if id(p) in experts else p.numel()

    trained = [(STATES[g], p) for g, named in partition_params(model).items() for _, p in named]
    units = [*model.language_model.model.layers, *model.vision_tower.encoder.blocks]
    in_units = {id(p) for u in units for p in u.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_units]
    unit_params = [sum(gathered(p) * p.element_size() for p in u.parameters()) for u in units]
    root_bytes = sum(gathered(p) * p.element_size() for p in root)
    unit_grads = [
        sum(gathered(p) * p.element_size() for p in ps if p.requires_grad)
        for ps in [root, *(u.parameters() for u in units)]
    ]
    return RankMemoryPlan(
        dp_shard=dp_shard,
        ep=ep,
        tokens=tokens,
        weights=sum(shard(p) * p.element_size() for p in model.parameters()),
        gradients=sum(shard(p) * p.element_size() for _, p in trained),
        optimizer=sum(n * shard(p) * p.element_size() for n, p in trained),
        gathered=root_bytes + 2 * max(unit_params, default=0) + 2 * max(unit_grads) + max(unit_params + [root_bytes]),
        activations=activation_bytes(model.config.text_config, tokens, ep, compute_dtype, recompute),
    )


def activation_bytes(
    config: TextConfig, tokens: int, ep: int = 1, dtype: torch.dtype = torch.bfloat16, recompute: bool = True
) -> int:
    """Training activations of ``tokens`` language-model tokens on one rank (the module docstring's estimate)."""
    t, b = config, dtype.itemsize
    per = prefill_activation_bytes(t, tokens, tokens, dtype)
    exchanged = 2 * tokens * t.num_experts_per_tok * t.hidden_size * b if ep > 1 else 0
    layer = per["attention"] + per["mlp"] + exchanged
    logits = min(tokens * t.vocab_size, LOGITS_LIMIT) * (b + 4 + 4)  # the loss takes the head in chunks past that
    residual = 4 * tokens * t.hidden_size * b
    if recompute:
        return t.num_hidden_layers * tokens * t.hidden_size * b + 2 * layer + residual + logits
    return (t.num_hidden_layers + 1) * layer + residual + logits
