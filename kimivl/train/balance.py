"""Aux-loss-free expert balancing (DeepSeek-V3): after each optimizer step, nudge every router's
``e_score_correction_bias`` by ``rate * sign(mean_load - load)``. The bias only changes which experts are chosen,
never the weights they get, and it is updated outside backprop.

``ExpertLoadTracker`` counts expert choices with forward hooks on the routers, registered from outside, so the model
itself stays free of training code.
"""

from __future__ import annotations

import torch
from torch import nn

from kimivl.model.moe import Router


@torch.no_grad()
def update_bias(router_bias: torch.Tensor, expert_counts: torch.Tensor, rate: float) -> torch.Tensor:
    """In place: raise the bias of experts chosen less than average by ``rate``, lower the over-loaded ones by
    ``rate``, leave exactly average ones alone. Returns ``router_bias``."""
    if router_bias.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            "the router bias must be float32 or float64 (tiny steps vanish in lower precision), got "
            f"{router_bias.dtype}"
        )
    if expert_counts.shape != router_bias.shape:
        raise ValueError(f"expert_counts {tuple(expert_counts.shape)} must match the bias {tuple(router_bias.shape)}")
    load = expert_counts.to(device=router_bias.device, dtype=torch.float32)
    return router_bias.add_(rate * torch.sign(load.mean() - load))


class ExpertLoadTracker:
    """Context manager counting, per MoE layer, how many tokens chose each routed expert.

    ``counts`` maps the router's module name (e.g. ``language_model.model.layers.1.mlp.gate``) to an int64 (E,)
    tensor accumulated over every forward since the last ``reset()``. With ``keep_routing=True``, ``routing`` also
    maps each name to the latest forward's (scores_TE, idx_TK), scores still attached to the graph, for
    ``losses.sequence_aux_loss``. Forwards re-run in backward by activation checkpointing are not counted again.
    """

    def __init__(self, model: nn.Module, keep_routing: bool = False):
        self.routers = {name: m for name, m in model.named_modules() if isinstance(m, Router)}
        if not self.routers:
            raise ValueError("the model has no MoE routers to track")
        self.keep_routing = keep_routing
        self.counts: dict[str, torch.Tensor] = {}
        self.routing: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list = []
        self.reset()

    def __enter__(self) -> ExpertLoadTracker:
        self._handles = [router.register_forward_hook(self._hook(name)) for name, router in self.routers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str):
        def record(module: Router, args, output) -> None:
            if torch._C._current_graph_task_id() != -1:  # inside backward: activation checkpointing's recompute
                return
            _, idx_TK, scores_TE = output
            self.counts[name] += torch.bincount(idx_TK.flatten(), minlength=scores_TE.shape[-1])
            if self.keep_routing:
                self.routing[name] = (scores_TE, idx_TK)

        return record

    def reset(self) -> None:
        """Zero the counts and drop kept routing."""
        self.counts = {
            name: torch.zeros_like(r.e_score_correction_bias, dtype=torch.long) for name, r in self.routers.items()
        }
        self.routing = {}

    def imbalance(self) -> dict[str, float]:
        """Max over mean expert load per layer (1.0 is perfectly even); layers with no tokens yet are left out."""
        return {name: float(c.max() / c.float().mean()) for name, c in self.counts.items() if c.sum() > 0}

    def update_biases(self, rate: float) -> None:
        """``update_bias`` on every trained router (its weight requires grad: a frozen layer, or a frozen language
        model, keeps its routing) from the counts so far, then ``reset()``. Under data parallelism, all-reduce
        ``counts`` (sum) first so that every rank moves its biases alike."""
        for name, router in self.routers.items():
            if router.weight.requires_grad:
                update_bias(router.e_score_correction_bias, self.counts[name], rate)
        self.reset()
