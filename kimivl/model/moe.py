"""Mixture of experts: sigmoid router with a selection-only bias and grouped top-k, grouped SwiGLU experts,
shared experts.

Routed experts are stored stacked, ``gate_up_proj`` (E, 2I, D) and ``down_proj`` (E, D, I), so that all experts run
as two grouped matmuls over tokens sorted by expert. State-dict hooks present them under the official per-expert
names ``experts.{e}.{gate,up,down}_proj.weight``, numbered from ``expert_offset`` (0 here; expert parallelism,
``kimivl.distributed.expert_parallel``, leaves a module a slice of the experts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimivl.config import TextConfig
from kimivl.kernels import grouped_swiglu


class _ZeroWidth(nn.Linear):
    """A linear layer with no hidden units (no shared experts): nothing to initialise, and torch warns if asked."""

    def reset_parameters(self) -> None:
        pass


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense MLP and the shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        linear = nn.Linear if hidden else _ZeroWidth
        self.gate_proj = linear(dim, hidden, bias=False)
        self.up_proj = linear(dim, hidden, bias=False)
        self.down_proj = linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid scores; choice by score + ``e_score_correction_bias`` within the best groups; weights from the
    unbiased scores. Held in float32 whatever narrower dtype the rest of the model takes (the bias moves in tiny
    steps), float64 in a float64 model: kimivl casts models with ``to_dtype``, which casts the routers so. Scores
    likewise in float32 (float64 for float64 inputs), autocast or not, so training picks the experts inference does."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (weights (T, k), expert ids (T, k), scores (T, E)); weights and scores in float32, or float64 for
        float64 ``x_TD``."""
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(x_TD.device.type, enabled=False):  # autocast would run the linear in bf16
            scores_TE = F.linear(x_TD.to(dtype), self.weight.to(dtype)).sigmoid()
        choice_TE = scores_TE.detach() + self.e_score_correction_bias
        if self.n_group > 1:
            t, e = choice_TE.shape
            grouped = choice_TE.view(t, self.n_group, e // self.n_group)
            group_score_TG = grouped.topk(2, dim=-1).values.sum(-1)
            keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
            keep_TG.scatter_(1, group_score_TG.topk(self.topk_group, dim=-1).indices, True)
            choice_TE = grouped.masked_fill(~keep_TG[..., None], float("-inf")).view(t, e)
        idx_TK = choice_TE.topk(self.top_k, dim=-1).indices
        w_TK = scores_TE.gather(1, idx_TK)
        if self.norm_topk_prob:
            w_TK = w_TK / (w_TK.sum(-1, keepdim=True) + 1e-20)
        return w_TK * self.scaling, idx_TK, scores_TE


# The routers' state-dict keys end so (``MoE.gate``), in the official layout as here; no other module is named gate.
ROUTER_KEY_SUFFIXES = (".gate.weight", ".gate.e_score_correction_bias")


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype routers take in a model, or a checkpoint, of ``dtype``: float32, or ``dtype`` where it is wider."""
    return max(dtype, torch.float32, key=lambda d: d.itemsize)


def to_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)`` except the routers' weights and ``e_score_correction_bias``, which take float32 or
    ``dtype``, whichever is wider (float64 for a float64 model), never rounded through a narrower ``dtype``; returns
    ``model``. A plain ``model.to(dtype)`` casts the routers too (the router still scores in float32, from the
    rounded values); device moves such as ``model.to("cuda")`` change no dtype, so routers kept in float32 stay
    float32."""
    if not dtype.is_floating_point:
        raise ValueError(f"a model is cast to a floating-point dtype, not {dtype}")
    for module in model.modules():
        cast = router_dtype(dtype) if isinstance(module, Router) else dtype
        module._apply(lambda t, cast=cast: t.to(cast) if t.is_floating_point() else t, recurse=False)
    return model


class GroupedExperts(nn.Module):
    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.n_experts, self.hidden = n_experts, hidden
        self.expert_offset = 0  # global id of the first expert held
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.register_state_dict_post_hook(_split_experts)
        self.register_load_state_dict_pre_hook(_stack_experts)

    def official_views(self) -> dict[str, torch.Tensor]:
        """Per-expert views under the official names (relative to this module), by global expert id."""
        out = {}
        for i in range(self.n_experts):
            e = self.expert_offset + i
            out |= expert_views("gate_up_proj", self.gate_up_proj[i : i + 1], self.hidden, e)
            out |= expert_views("down_proj", self.down_proj[i : i + 1], self.hidden, e)
        return out

    def forward(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """Each token through its ``idx_TK`` experts, weighted by ``w_TK`` and summed: (T, D)."""
        return grouped_swiglu(x_TD, idx_TK, w_TK, self.gate_up_proj, self.down_proj)


def expert_views(stack: str, t: torch.Tensor, hidden: int, first: int) -> dict[str, torch.Tensor]:
    """Views of the experts ``t`` of a ``gate_up_proj`` or ``down_proj`` stack (the first of global id ``first``)
    under the official names relative to the experts module: ``{e}.gate_proj.weight`` and ``{e}.up_proj.weight``
    (the two halves of ``gate_up_proj``'s rows, ``hidden`` each), or ``{e}.down_proj.weight``."""
    if stack == "gate_up_proj":
        pairs = (
            (f"{first + i}.{p}.weight", w[a:b])
            for i, w in enumerate(t)
            for p, a, b in (("gate_proj", 0, hidden), ("up_proj", hidden, None))
        )
    else:
        pairs = ((f"{first + i}.down_proj.weight", w) for i, w in enumerate(t))
    return dict(pairs)


def _split_experts(module: GroupedExperts, state_dict, prefix, local_metadata):
    for name in ("gate_up_proj", "down_proj"):
        state_dict.pop(prefix + name, None)
    for key, view in module.official_views().items():
        state_dict[prefix + key] = view.detach()  # shares storage: loading copies into the stacked parameter


def _stack_experts(module: GroupedExperts, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """The official per-expert tensors stacked into ``gate_up_proj`` and ``down_proj``. Those absent from a partial
    state dict keep the module's values and are reported missing under their official names (an error when strict);
    a tensor of another shape keeps them too, reported as ``load_state_dict`` reports one (always an error)."""
    held = module.official_views()
    if not {prefix + k for k in held} & state_dict.keys():
        return
    device = next(state_dict[prefix + k].device for k in held if prefix + k in state_dict)

    def take(key):
        given = state_dict.pop(prefix + key, None)
        if given is None:
            missing.append(prefix + key)
        elif given.shape == held[key].shape:
            return given
        else:
            errors.append(
                f"size mismatch for {prefix + key}: copying a param with shape {given.shape} from checkpoint, "
                f"the shape in current model is {held[key].shape}."
            )
        if held[key].is_meta:  # a model built on the meta device, loaded a shard at a time: a later one fills it
            return torch.empty_like(held[key], device=device)
        return held[key].detach().to(device)

    per = [
        [take(f"{e}.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")]
        for e in range(module.expert_offset, module.expert_offset + module.n_experts)
    ]
    state_dict[prefix + "gate_up_proj"] = torch.stack([torch.cat(w[:2]) for w in per])
    state_dict[prefix + "down_proj"] = torch.stack([w[2] for w in per])


class MoE(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        w_TK, idx_TK, _ = self.gate(x_TD)
        routed_TD = self.experts(x_TD, idx_TK, w_TK)
        return routed_TD.view_as(x) + self.shared_experts(x)
