"""One optimiser step, the same for every stage kind: a non-finite loss stops training before its backward; the
gradients are clipped, the step is refused when their norm is not finite, and after the update the trained weights are
checked, so a run never goes on from (or saves) non-finite weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where the last good state is."""


# ``last_good(weights_ok)`` says where the last good state is; ``weights_ok`` tells it whether the model's weights are
# still good (they are before the update, so it may save them), or not (it must name an earlier checkpoint)
LastGood = Callable[[bool], str]


def check_loss(loss: torch.Tensor, where: str, last_good: LastGood) -> None:
    """Raise a ``TrainingError`` when any element of ``loss`` is not finite; ``where`` names the stage and step."""
    if not torch.isfinite(loss).all():
        value = loss.item() if loss.numel() == 1 else "not finite"
        raise TrainingError(f"{where}: loss is {value}; the last good state is {last_good(True)}")


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, clip: float, where: str, last_good: LastGood
) -> torch.Tensor:
    """Clip the trained parameters' gradients to norm ``clip``, step ``optimizer``, check the updated weights; returns
    the gradient norm before clipping. A non-finite gradient norm stops the run before the update; weights made
    non-finite by it (e.g. by a learning rate far too high) stop it after, naming them."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], clip)
    if not torch.isfinite(grad_norm):
        raise TrainingError(f"{where}: gradient norm is {grad_norm.item()}; the last good state is {last_good(True)}")
    optimizer.step()
    if not torch.isfinite(torch.nn.utils.get_total_norm([p.detach() for _, p in named])):
        bad = [name for name, p in named if not torch.isfinite(p.detach()).all()]
        if bad:  # (else the norm overflowed on huge, finite weights)
            raise TrainingError(
                f"{where}: the update made {len(bad)} weight tensors non-finite ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}): is the learning rate too high? The last good "
                f"state is {last_good(False)}"
            )
    return grad_norm
