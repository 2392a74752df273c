"""Activation checkpointing of a layer stack: with it on, a layer keeps only its input for backward and runs its
forward again there, trading about a third more compute for activation memory of one layer at a time."""

from __future__ import annotations

from torch import is_grad_enabled
from torch.utils.checkpoint import checkpoint

from kimivl.kernels import recompute_contexts


def run_layer(layer, recompute: bool, *args, **kwargs):
    """``layer(*args, **kwargs)``, checkpointed when ``recompute`` and gradients are on (recomputed with the attention
    path of its forward)."""
    if recompute and is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False, context_fn=recompute_contexts, **kwargs)
    return layer(*args, **kwargs)
