"""Parameter counts per part of a Kimi-VL configuration, computed on the meta device (nothing allocated)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kimivl.config import KimiVLConfig


@dataclass
class PartCount:
    total: int
    active: int  # used per token: routed experts count only num_experts_per_tok of n_routed_experts


def parameter_counts(config: KimiVLConfig) -> dict[str, PartCount]:
    """Counts for ``vision_tower``, ``multi_modal_projector``, ``language_model`` and ``total``."""
    from kimivl.model.kimivl import KimiVL

    with torch.device("meta"):
        model = KimiVL(config)
    tc = config.text_config
    idle = (tc.n_routed_experts - tc.num_experts_per_tok) / tc.n_routed_experts
    counts = {}
    for name in ("vision_tower", "multi_modal_projector", "language_model"):
        total = routed = 0
        for pname, p in getattr(model, name).named_parameters():
            total += p.numel()
            if ".experts." in f".{pname}" and "shared_experts" not in pname:
                routed += p.numel()
        counts[name] = PartCount(total, total - round(routed * idle))
    counts["total"] = PartCount(sum(c.total for c in counts.values()), sum(c.active for c in counts.values()))
    return counts
