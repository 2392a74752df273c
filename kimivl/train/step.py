"""One optimiser step, the same for every stage kind: a non-finite loss stops training before its backward; the
gradients are clipped, the step is refused when their norm is not finite, and after the update the trained weights are
checked, so a run never goes on from (or saves) non-finite weights."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from kimivl.distributed.muon import local
from kimivl.distributed.world import World

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where the last good state is."""


# ``last_good(weights_ok)`` says where the last good state is; ``weights_ok`` tells it whether the model's weights are
# still good (they are before the update, so it may save them), or not (it must name an earlier checkpoint)
LastGood = Callable[[bool], str]


class UntrainedRows:
    """The backward of a loss part, joint rows or RL answers alike, where a trained weight is on its path; a part that
    reaches none (a text row while only the vision side trains, which freeze patterns can hide from the data check)
    adds no gradient, and is warned about once."""

    def __init__(self):
        self.said = False

    def backward(self, part: torch.Tensor, what: str) -> None:
        """``part.backward()``, or the warning that ``what`` ("stage: step 3 has a row that") reaches no trained
        weight."""
        if part.requires_grad:
            part.backward()
        elif not self.said:
            self.said = True
            log.warning(
                "%s reaches no trained weight (no images while the language model is frozen): such rows add no "
                "gradient, and train nothing",
                what,
            )


def check_loss(loss: torch.Tensor, where: str, last_good: LastGood, world: World | None = None) -> None:
    """Raise a ``TrainingError`` when any element of ``loss`` is not finite; ``where`` names the stage and step. With
    a sharded ``world`` every rank raises when any rank's loss is not finite (saving the state is collective)."""
    bad = ~torch.isfinite(loss.detach()).all()
    if world is not None and world.active:
        bad = world.sum(bad.float()) > 0
    if bad:
        value = loss.item() if loss.numel() == 1 and not torch.isfinite(loss).all() else "not finite"
        whose = "a rank's loss" if world is not None and world.active else "loss"
        raise TrainingError(f"{where}: {whose} is {value}; the last good state is {last_good(True)}")


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    clip: float,
    where: str,
    last_good: LastGood,
    world: World | None = None,
) -> torch.Tensor:
    """Clip the trained parameters' gradients to norm ``clip``, step ``optimizer``, check the updated weights; returns
    the gradient norm before clipping. A non-finite gradient norm stops the run before the update; weights made
    non-finite by it (e.g. by a learning rate far too high) stop it after, naming them. With a sharded ``world`` the
    norms are over the whole model (every rank's shards) and every rank decides alike."""
    world = world or World()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    grads = [p.grad for _, p in named if p.grad is not None]
    grad_norm = total_norm(grads, world)
    if not torch.isfinite(grad_norm):
        raise TrainingError(f"{where}: gradient norm is {grad_norm.item()}; the last good state is {last_good(True)}")
    coefficient = torch.clamp(clip / (grad_norm + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
    for g in grads:
        local(g).mul_(coefficient.to(g.dtype))
    optimizer.step()
    if not torch.isfinite(total_norm([p.detach() for _, p in named], world)):
        bad = [name for name, p in named if not torch.isfinite(local(p.detach())).all()]
        bad = list(dict.fromkeys(n for part in world.gather(bad) for n in part))  # every rank's, no repeats
        if bad:  # (else the norm overflowed on huge, finite weights)
            raise TrainingError(
                f"{where}: the update made {len(bad)} weight tensors non-finite ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}): is the learning rate too high? The last good "
                f"state is {last_good(False)}"
            )
    return grad_norm


def total_norm(tensors: list[torch.Tensor], world: World) -> torch.Tensor:
    """The 2-norm of all ``tensors`` together, float32; shards of a sharded model count once (each replica group
    holds one copy)."""
    if not world.active:
        return torch.nn.utils.get_total_norm(tensors).float()
    device = torch.device(world.device)
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for t in tensors:
        squares += local(t).float().square().sum().to(device)
    return (world.sum(squares) / world.dp_replicate).sqrt()
