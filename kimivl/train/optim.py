"""Muon for hidden matrices, AdamW for everything else, in one optimizer (spec §10).

Muon step for a matrix W (rows m, cols n) with gradient G, lr, weight decay wd, momentum mu:
    B <- mu * B + G;  U = G + mu * B (Nesterov) or B;  O = NS5(U)
    W <- W * (1 - lr * wd) - lr * 0.2 * sqrt(max(m, n)) * O
NS5 is the quintic Newton-Schulz iteration that pushes every singular value of U / |U|_F towards 1 (to roughly
0.7..1.2); the 0.2 * sqrt(max(m, n)) factor gives the update the RMS of a typical AdamW update (Moonlight), so one
lr and one weight decay serve both algorithms. Tensors with more than two dims are stacks of matrices over their
leading dims (the grouped experts, (E, out, in)) and every matrix is orthogonalised on its own. Parameters sharded
by FSDP (DTensors) get the same update: see ``kimivl.distributed.muon``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from kimivl.distributed.muon import local, orthogonalize_sharded, row_sharded
from kimivl.model.moe import GroupedExperts
from kimivl.model.moonvit import PositionEmbedding

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
RMS_MATCH = 0.2


def newton_schulz(
    g: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Approximate U V^T for each matrix in the last two dims of ``g`` (..., m, n); the iterations run in
    ``dtype`` (bfloat16 is several times faster and, as in the reference Muon, accurate enough), the result is
    float32."""
    a, b, c = coefficients
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide orientation so that the Gram matrix is the small one
        x = x.mT
    x = (x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)).to(dtype)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.float()
    return x.mT if tall else x


class MuonAdamW(Optimizer):
    """One optimizer, two algorithms chosen per param group by ``algorithm`` ("muon" or "adamw").

    Muon groups may set ``chunks`` > 1: the rows of each matrix are then split into that many equal blocks that are
    orthogonalised (and RMS-scaled) separately, e.g. the fused [gate; up] rows of ``gate_up_proj``. Decoupled
    weight decay in both algorithms is ``param *= 1 - lr * weight_decay``. State lives in the parameter's dtype;
    Newton-Schulz runs in ``ns_dtype`` ("float32" by default, or "bfloat16").
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        ns_dtype: str = "float32",
    ):
        if ns_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"ns_dtype must be 'float32' or 'bfloat16', got {ns_dtype!r}")
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(
                f"need lr >= 0, weight_decay >= 0, 0 <= momentum < 1; got {lr}, {weight_decay}, {momentum}"
            )
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_steps": ns_steps,
            "ns_coefficients": tuple(ns_coefficients),
            "betas": tuple(betas),
            "eps": eps,
            "algorithm": "muon",
            "chunks": 1,
            "ns_dtype": ns_dtype,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["algorithm"] not in ("muon", "adamw"):
                raise ValueError(f"param group algorithm must be 'muon' or 'adamw', got {group['algorithm']!r}")
            if group["algorithm"] == "muon":
                for p in group["params"]:
                    if p.ndim < 2 or p.shape[-2] % group["chunks"]:
                        raise ValueError(
                            f"Muon needs matrices (or stacks of them) whose rows split into "
                            f"{group['chunks']} chunks; got shape {tuple(p.shape)}. Put vectors "
                            "in an 'adamw' group"
                        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sharded = []  # Muon matrices whose rows FSDP split over ranks: orthogonalised by an owner rank each
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MuonAdamW does not support sparse gradients")
                if group["algorithm"] == "adamw":
                    self._adamw(p, group)
                    continue
                u = self._momentum(p, group)
                if row_sharded(p):
                    sharded.append((p, group, u))
                else:
                    self._apply_muon(p, group, self._orthogonalize(u, group))
        if sharded:
            orthogonalized = orthogonalize_sharded(
                [(p, u, functools.partial(self._orthogonalize, group=g)) for p, g, u in sharded]
            )
            for (p, group, _), o in zip(sharded, orthogonalized):
                self._apply_muon(p, group, o)
        return loss

    def init_state(self) -> None:
        """Create the state of every parameter that has none, as its first step would (to load a checkpoint into)."""
        for group in self.param_groups:
            for p in group["params"]:
                self._state(p, group)

    def _state(self, p: torch.Tensor, group: dict) -> dict:
        """``p``'s state, created at its start when it has none."""
        state = self.state[p]
        if not state and group["algorithm"] == "muon":
            state["momentum_buffer"] = torch.zeros_like(p)
        elif not state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        return state

    def _momentum(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """Update the momentum buffer; returns this rank's part of U (Nesterov or plain momentum)."""
        buf, grad, mu = local(self._state(p, group)["momentum_buffer"]), local(p.grad), group["momentum"]
        buf.mul_(mu).add_(grad)
        return grad.add(buf, alpha=mu) if group["nesterov"] else buf

    @staticmethod
    def _orthogonalize(u: torch.Tensor, group: dict) -> torch.Tensor:
        """NS5 of each of the ``chunks`` row blocks of each matrix of ``u``, in ``u``'s shape."""
        o = newton_schulz(
            u.unflatten(-2, (group["chunks"], -1)),
            group["ns_steps"],
            group["ns_coefficients"],
            dtype=getattr(torch, group["ns_dtype"]),
        )
        return o.reshape(u.shape)

    @staticmethod
    def _apply_muon(p: torch.Tensor, group: dict, o: torch.Tensor) -> None:
        scale = RMS_MATCH * math.sqrt(max(p.shape[-2] // group["chunks"], p.shape[-1]))
        w = local(p)
        w.mul_(1 - group["lr"] * group["weight_decay"])
        w.add_(o.to(w.dtype), alpha=-group["lr"] * scale)

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        state = self._state(p, group)
        (b1, b2), lr, g, w = group["betas"], group["lr"], local(p.grad), local(p)
        state["step"] += 1
        t = state["step"]
        exp_avg, exp_avg_sq = local(state["exp_avg"]), local(state["exp_avg_sq"])
        exp_avg.lerp_(g, 1 - b1)
        exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - b2**t)).add_(group["eps"])
        w.mul_(1 - lr * group["weight_decay"])
        w.addcdiv_(exp_avg, denom, value=-lr / (1 - b1**t))


GROUPS = ("muon", "muon_gate_up", "adamw", "adamw_no_decay")


def _group_of(module_name: str, module: nn.Module, param_name: str, param: torch.Tensor) -> str:
    if isinstance(module, GroupedExperts):
        return "muon_gate_up" if param_name == "gate_up_proj" else "muon"
    if isinstance(module, nn.Linear) and param_name == "weight" and not module_name.endswith("lm_head"):
        return "muon"
    if param.ndim < 2 or isinstance(module, PositionEmbedding):
        return "adamw_no_decay"
    return "adamw"


def partition_params(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters by group, each once (frozen ones are left out):

    - ``muon``: every ``nn.Linear`` weight except ``lm_head`` (vision blocks, projector, attention, dense MLP,
      shared experts) and the experts' ``down_proj`` stack;
    - ``muon_gate_up``: the experts' ``gate_up_proj`` stack, gate and up rows orthogonalised apart, as the
      official per-expert ``gate_proj`` / ``up_proj`` matrices would be;
    - ``adamw``: ``embed_tokens``, ``lm_head``, the patch-embedding conv and the router ``gate.weight`` (a small
      float32 matrix whose scale sets the sigmoid scores, so it gets the conservative optimizer), and any other
      matrix, such as a ``nn.MultiheadAttention``'s fused ``in_proj_weight`` (the vit stage's training-only heads);
    - ``adamw_no_decay``: norms, biases and the position-embedding table.
    Buffers such as the router's ``e_score_correction_bias`` are never parameters (see ``kimivl.train.balance``).
    """
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{module_name}.{param_name}" if module_name else param_name
            groups[_group_of(module_name, module, param_name, p)].append((name, p))
    return groups


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_dtype: str = "float32",
    lr_scale: dict[str, float] | None = None,
) -> MuonAdamW:
    """``MuonAdamW`` over ``partition_params(model)``; each param group carries its ``name``. Empty groups are
    dropped, so a resumed run must freeze the same parts as the run that saved the state. ``lr_scale`` maps a
    submodule name (``vision_tower``) to a multiplier of ``lr`` for its parameters; those form their own groups,
    named ``muon@vision_tower`` and so on, after the unscaled ones; a parameter under two of them (``language_model``
    and ``language_model.lm_head``) takes the nearer one's."""
    lr_scale = dict(lr_scale or {})
    modules = dict(model.named_modules())
    for prefix, factor in lr_scale.items():
        if prefix not in modules or not factor > 0:
            raise ValueError(f"lr_scale {{{prefix}: {factor}}}: needs a submodule of the model and a factor > 0")
    settings = {
        "muon": {"algorithm": "muon"},
        "muon_gate_up": {"algorithm": "muon", "chunks": 2},
        "adamw": {"algorithm": "adamw"},
        "adamw_no_decay": {"algorithm": "adamw", "weight_decay": 0.0},
    }
    split: dict[tuple[str, str | None], list[nn.Parameter]] = {}
    for name, named in partition_params(model).items():
        for pname, p in named:
            prefix = max((k for k in lr_scale if pname.startswith(k + ".")), key=len, default=None)
            split.setdefault((name, prefix), []).append(p)
    param_groups = [
        {
            "name": name if prefix is None else f"{name}@{prefix}",
            "params": params,
            "lr": lr * (1.0 if prefix is None else lr_scale[prefix]),
            **settings[name],
        }
        for (name, prefix), params in sorted(split.items(), key=lambda kv: kv[0][1] is not None)
    ]
    if not param_groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    return MuonAdamW(
        param_groups,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=nesterov,
        ns_steps=ns_steps,
        betas=betas,
        eps=eps,
        ns_dtype=ns_dtype,
    )
