"""Activation checkpointing applied from outside the model: each decoder layer and vision block keeps only its input
for backward and runs its forward again there (about a third more compute for the activations of one layer at a
time). The layers keep their names and classes (their ``forward`` is wrapped on the instance), so checkpoints, FSDP
and hooks see the same module tree."""

from __future__ import annotations

import functools

from torch import is_grad_enabled, nn
from torch.utils.checkpoint import checkpoint

from kimivl.kernels import recompute_contexts
from kimivl.model.language_model import DecoderLayer
from kimivl.model.moonvit import EncoderBlock

LAYERS = (DecoderLayer, EncoderBlock)


def _checkpointed(forward, *args, **kwargs):
    """``forward(*args, **kwargs)``, checkpointed while gradients are on and no inference cache is passed (a forward
    with a cache is not differentiable: ``LanguageModel`` refuses one while anything requires gradients, and runs it
    as usual when nothing does); recomputed with the attention path of the forward."""
    if is_grad_enabled() and kwargs.get("cache") is None:
        return checkpoint(forward, *args, use_reentrant=False, context_fn=recompute_contexts, **kwargs)
    return forward(*args, **kwargs)


def apply_recompute(model: nn.Module) -> int:
    """Checkpoint every decoder layer and vision block of ``model``; returns how many. Applying twice is harmless."""
    layers = [m for m in model.modules() if isinstance(m, LAYERS)]
    for layer in layers:
        if "forward" not in vars(layer):
            layer.forward = functools.partial(_checkpointed, type(layer).forward.__get__(layer))
    return len(layers)


def remove_recompute(model: nn.Module) -> None:
    """Undo ``apply_recompute``."""
    for m in model.modules():
        if isinstance(m, LAYERS):
            vars(m).pop("forward", None)


def recomputed(model: nn.Module) -> bool:
    """Whether ``apply_recompute`` is in effect on ``model``."""
    return any("forward" in vars(m) for m in model.modules() if isinstance(m, LAYERS))
