"""What a stage trains (whole parts, less the parameters its ``freeze`` globs name) and what training it holds in
memory: weights, gradients and optimiser state, known before any weight is allocated (a meta-device model works)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from kimivl.model.moe import GroupedExperts
from kimivl.train.optim import partition_params
from kimivl.train.recipe import PARTS

STATES = {"muon": 1, "muon_gate_up": 1, "adamw": 2, "adamw_no_decay": 2}  # optimiser tensors per parameter


def set_trainable(model: nn.Module, parts: list[str], freeze: list[str] = ()) -> None:
    """Train the ``parts`` of ``model`` (the others are frozen), less the parameters whose name matches one of the
    ``freeze`` patterns (``fnmatch``, e.g. ``language_model.*.mlp.experts.*`` for the routed experts). A pattern that
    matches no trained parameter, or freezing everything, is a ``ValueError``."""
    for part in PARTS:
        getattr(model, part).requires_grad_(part in parts)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for pattern in freeze:
        hits = [name for name in trained if fnmatchcase(name, pattern)]
        if not hits:
            example = next(iter(trained), "")
            raise ValueError(
                f"freeze pattern {pattern!r} matches no parameter of the trained parts {list(parts)} "
                f"(names look like {example!r})"
            )
        for name in hits:
            trained[name].requires_grad_(False)
    if not any(p.requires_grad for p in trained.values()):
        raise ValueError(f"freeze {list(freeze)} leaves nothing of {list(parts)} to train")


def _bf16_values(name: str, p: nn.Parameter) -> bool:
    return not (p.detach().view(torch.int32) & 0xFFFF).any()  # no mantissa bits that bfloat16 lacks


def hold_frozen_in_bf16(
    model: nn.Module, lossless: Callable[[str, nn.Parameter], bool] = _bf16_values
) -> list[nn.Parameter]:
    """Store each frozen float32 matrix that bf16 autocast multiplies in bfloat16 anyway (``nn.Linear`` weights, the
    experts' stacks) in bfloat16, when that loses nothing: its values are bfloat16 values, as in a weight loaded from a
    bfloat16 checkpoint and not trained since. Training under autocast then computes exactly what it did, and those
    weights take half the memory. ``lossless(name, param)`` decides instead of looking at the values (a meta-device
    plan knows which weights come from the checkpoint). Returns the changed parameters, for ``restore_float32``."""
    held = []
    for module_name, module in model.named_modules():
        names = (
            ("gate_up_proj", "down_proj")
            if isinstance(module, GroupedExperts)
            else ("weight",)
            if isinstance(module, nn.Linear)
            else ()
        )
        for name in names:
            p = getattr(module, name)
            if p.requires_grad or p.dtype != torch.float32 or not lossless(f"{module_name}.{name}", p):
                continue
            p.data = p.data.to(torch.bfloat16)
            held.append(p)
    return held


def restore_float32(params: list[nn.Parameter]) -> None:
    """Undo ``hold_frozen_in_bf16`` (exactly: the values were bfloat16 values)."""
    for p in params:
        p.data = p.data.float()


@dataclass
class MemoryPlan:
    """Parameter counts and bytes held while training (activations come on top)."""

    trained: int
    total: int
    weights: int
    gradients: int
    optimizer: int

    @property
    def counts(self) -> str:
        """``trains X of Y parameters``."""
        count = (lambda n: f"{n / 1e9:.2f}B") if self.total >= 1e9 else (lambda n: f"{n / 1e6:.2f}M")
        return f"trains {count(self.trained)} of {count(self.total)} parameters"

    def __str__(self) -> str:
        def gb(n: int) -> str:
            return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"

        return (
            f"{self.counts}; holds weights {gb(self.weights)}, "
            f"gradients {gb(self.gradients)}, optimiser state {gb(self.optimizer)} "
            f"(total {gb(self.weights + self.gradients + self.optimizer)}, activations on top)"
        )


def memory_plan(model: nn.Module) -> MemoryPlan:
    """What ``build_optimizer(model)`` and backward will hold for ``model`` as it is frozen now: every weight, a
    gradient per trained parameter, and Muon's momentum (one tensor) or AdamW's two moments, each in the parameter's
    dtype."""
    params = list(model.parameters())
    groups = partition_params(model)
    trained = [(STATES[g], p) for g, named in groups.items() for _, p in named]
    return MemoryPlan(
        trained=sum(p.numel() for _, p in trained),
        total=sum(p.numel() for p in params),
        weights=sum(p.numel() * p.element_size() for p in params),
        gradients=sum(p.numel() * p.element_size() for _, p in trained),
        optimizer=sum(n * p.numel() * p.element_size() for n, p in trained),
    )
