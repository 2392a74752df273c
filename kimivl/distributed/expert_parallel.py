"""Expert parallelism: the routed experts of every MoE layer split over the ranks of a process group.

``apply_expert_parallel(model, group)`` changes a built model from outside (``kimivl/model/`` stays single-device).
With M ranks in ``group`` and E routed experts per layer (M must divide E), rank r keeps experts
[r E/M, (r+1) E/M) of every ``GroupedExperts``: its ``gate_up_proj`` (E/M, 2I, D) and ``down_proj`` (E/M, D, I)
keep their names, ``n_experts`` becomes the local count E/M and ``expert_offset`` the global id of the first local
expert. The router stays whole on every rank and picks global expert ids as before.

A forward on each rank, for its own tokens: the (token, expert) pairs are sorted by expert, hence by owning rank;
the ranks exchange how many rows each sends each (``all_to_all_single`` on the counts), then the rows themselves,
their expert ids and routing weights; each rank runs ``grouped_swiglu`` over its local experts on what it received
(the weight scales the hidden activation exactly as in one process); the outputs go back with the reverse exchange
and each token sums its k rows. The exchanges of rows, weights and outputs are differentiable (the backward of an
all-to-all is the reverse all-to-all), so gradients reach the input, the routing weights (hence the router) and the
local experts. Every rank must run the same MoE layers in the same order, as data parallel training does; a rank
that receives no rows still takes part in every exchange and gets zero expert gradients.

Checkpoints: ``official_views`` and the state-dict hooks of ``GroupedExperts`` name a rank's experts by their global
ids (``experts.{expert_offset + i}.{gate,up,down}_proj.weight``), so a rank's state dict holds exactly its own
experts under the official names, and loading one accepts exactly those (other experts' keys are unexpected).
``expert_ranges(model)`` tells which global ids each module holds, for reading only those from an official
checkpoint.

Gradient scaling (for FSDP on top): each rank's backward puts into its local experts the contributions of the tokens
of all M ranks of its EP group (the other ranks' gradients arrive through the reverse all-to-all), whereas a
replicated parameter's gradient on a rank holds only that rank's tokens. If the loss is averaged over the D
data-parallel ranks by dividing the summed gradient by D, the replicated parameters' reduction (over D ranks)
divides by D, and the experts' reduction, over the D/M ranks that hold the same experts, must divide by D too, not by
D/M, else expert gradients come out M times too large: ``parallelize`` scales the local experts' weight gradients
by 1/M (``weight_grad_scale``) and lets FSDP take its usual mean over the D/M ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from kimivl.kernels import grouped_swiglu
from kimivl.model.moe import GroupedExperts


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup, weight_grad_scale: float = 1.0) -> None:
    """Split the routed experts of every ``GroupedExperts`` in ``model`` over the ranks of ``group`` (in place):
    this rank keeps its E/M experts as the same-named parameters and its forward exchanges tokens with the other
    ranks. Works on a model on the meta device too (before loading), and must come before FSDP. Raises ``ValueError``
    when the model has no routed experts, when it was already split or sharded, or when the group size does not divide
    the expert count. ``weight_grad_scale`` multiplies the local experts' weight gradients (``parallelize`` passes
    1/M, so that FSDP's mean over the ranks holding the same experts gives the mean over every rank)."""
    m, r = group.size(), group.rank()
    experts = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, GroupedExperts)]
    if not experts:
        raise ValueError("expert parallelism needs routed experts, but the model has no MoE layer: use ep = 1")
    for name, mod in experts:
        if isinstance(mod.gate_up_proj, DTensor):
            raise ValueError(f"{name} is already sharded (FSDP): apply expert parallelism before fully_shard")
        if getattr(mod, "ep_group", None) is not None:
            raise ValueError(f"expert parallelism was already applied to {name}: apply it once, to a whole model")
        if mod.n_experts % m:
            raise ValueError(
                f"{name} has {mod.n_experts} routed experts, which {m} expert-parallel ranks cannot split evenly: "
                f"choose an ep that divides {mod.n_experts}"
            )
    for _, mod in experts:
        local = mod.n_experts // m
        lo = r * local
        for pname in ("gate_up_proj", "down_proj"):
            p = getattr(mod, pname)
            setattr(mod, pname, nn.Parameter(p.detach()[lo : lo + local].clone(), requires_grad=p.requires_grad))
        mod.n_experts, mod.expert_offset, mod.ep_group = local, lo, group
        mod.weight_grad_scale = weight_grad_scale
        mod.forward = _expert_parallel_forward.__get__(mod)


def expert_ranges(model: nn.Module) -> dict[str, range]:
    """Global expert ids held by each ``GroupedExperts`` of ``model``, by module name (all of them without expert
    parallelism): the official checkpoint keys ``{name}.{e}.{gate,up,down}_proj.weight`` this rank loads and saves."""
    return {
        name: range(mod.expert_offset, mod.expert_offset + mod.n_experts)
        for name, mod in model.named_modules()
        if isinstance(mod, GroupedExperts)
    }


def _expert_parallel_forward(
    self: GroupedExperts, x_TD: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor
) -> torch.Tensor:
    """``GroupedExperts.forward`` for global expert ids ``idx_TK`` when this rank holds only its slice of experts."""
    group, k = self.ep_group, idx_TK.shape[1]
    flat_N = idx_TK.reshape(-1)
    order_N = flat_N.argsort(stable=True)
    expert_N = flat_N[order_N]
    token_N = order_N // k
    send_M = torch.bincount(expert_N // self.n_experts, minlength=group.size())
    recv_M = torch.empty_like(send_M)
    dist.all_to_all_single(recv_M, send_M, group=group)
    sent, received = send_M.tolist(), recv_M.tolist()
    x_RD = _AllToAll.apply(x_TD.index_select(0, token_N), received, sent, group)
    w_R = _AllToAll.apply(w_TK.reshape(-1)[order_N], received, sent, group)
    expert_R = expert_N.new_empty(sum(received))
    dist.all_to_all_single(expert_R, expert_N, received, sent, group=group)
    local_R1 = (expert_R - self.expert_offset)[:, None]
    gate_up, down = self.gate_up_proj, self.down_proj
    if self.weight_grad_scale != 1:
        gate_up, down = (_ScaleGrad.apply(p, self.weight_grad_scale) for p in (gate_up, down))
    y_RD = grouped_swiglu(x_RD, local_R1, w_R[:, None], gate_up, down)
    y_ND = _AllToAll.apply(y_RD, sent, received, group)
    return torch.zeros_like(x_TD).index_add_(0, token_N, y_ND)


class _ScaleGrad(torch.autograd.Function):
    """The identity, its gradient scaled: what a local expert's weights receive, which sums its whole expert group's
    tokens, scaled as the data-parallel mean expects (see ``apply_expert_parallel``'s ``weight_grad_scale``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of dim-0 rows (``out_splits`` received from, ``in_splits`` sent to each rank); its
    backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad, in_splits, out_splits, ctx.group), None, None, None
