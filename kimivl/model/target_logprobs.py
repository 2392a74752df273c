"""Log-probabilities of target tokens through the LM head, computed only at the positions that have a target and
never holding more than ``LOGITS_LIMIT`` float32 logits at once.

A full (positions, vocab) logit tensor is what makes training memory explode at Kimi-VL's 163,840-token vocabulary
(8,192 positions: 5.4 GB of float32 logits, and as much again for their gradient). Small cases take the plain
autograd path; larger ones run in chunks of positions whose logits are recomputed in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimivl.model.plain import plain_layer

LOGITS_LIMIT = 1 << 26  # float32 logit elements materialised at once (256 MiB)


def target_logprobs(
    hidden_ND: torch.Tensor, head: torch.Tensor | nn.Module, targets_N: torch.Tensor, limit: int | None = None
) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[target] per position, float32 (float64 for float64 hidden states), in the
    targets' shape: ``hidden`` (..., D) and ``targets`` (...) with the same leading dimensions, (N, D) and (N,) or
    (B, S, D) and (B, S) alike; differentiable in hidden and the head. ``head``: the head's weight (V, D) or the head
    itself, whose weight is read when it is a plain bias-free ``nn.Linear`` (``plain_layer``); any other head (a
    LoRA wrapper, a hooked layer) is called on all positions at once, holding their logits whatever ``limit``.
    Under autocast the head's matmuls run in the autocast dtype, as ``nn.Linear`` would. ``limit``: logits held at
    once (default ``LOGITS_LIMIT``)."""
    if hidden_ND.dim() < 2 or hidden_ND.shape[:-1] != targets_N.shape:
        raise ValueError(
            f"hidden {tuple(hidden_ND.shape)} and targets {tuple(targets_N.shape)} disagree: hidden must be "
            "(..., hidden size) and targets (...), with the same leading dimensions"
        )
    if isinstance(head, nn.Module) and (not plain_layer(head, nn.Linear) or head.bias is not None):
        return F.log_softmax(_widened(head(hidden_ND)), -1).gather(-1, targets_N[..., None]).squeeze(-1)
    weight_VD = head.weight if isinstance(head, nn.Module) else head
    if targets_N.dim() != 1:  # any leading shape: the positions flattened, and the result shaped as the targets
        flat = target_logprobs(hidden_ND.reshape(-1, hidden_ND.shape[-1]), weight_VD, targets_N.reshape(-1), limit)
        return flat.reshape(targets_N.shape)
    limit = LOGITS_LIMIT if limit is None else limit
    vocab = weight_VD.shape[0]
    if hidden_ND.shape[0] * vocab <= limit:
        logits_NV = _widened(F.linear(hidden_ND, weight_VD))
        return F.log_softmax(logits_NV, -1).gather(-1, targets_N[:, None]).squeeze(-1)
    device = hidden_ND.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden_ND.dtype
    return _ChunkedLogprobs.apply(hidden_ND, weight_VD, targets_N, dtype, limit)


def next_token_loss(
    hidden_BSD: torch.Tensor, head: torch.Tensor | nn.Module, labels_BS: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean next-token cross-entropy through ``head`` (its weight or itself, as ``target_logprobs`` takes) at the
    scored positions only. ``labels`` are aligned with the inputs (unscored positions set to ``ignore_index``); the
    shift happens here: the hidden state at s predicts the label at s + 1. 0, with a graph, when nothing is scored
    (float32, float64 for float64 hidden states, as the loss is)."""
    if hidden_BSD.shape[:-1] != labels_BS.shape:
        raise ValueError(
            f"hidden {tuple(hidden_BSD.shape)} and labels {tuple(labels_BS.shape)} disagree on (batch, seq)"
        )
    targets = labels_BS[:, 1:]
    scored = targets != ignore_index
    logprobs_N = target_logprobs(hidden_BSD[:, :-1][scored], head, targets[scored])
    if not len(logprobs_N):
        return _widened(hidden_BSD.sum() * 0.0)
    return -logprobs_N.mean()


def _widened(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32, or float64 when they are float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _logits(hidden_ND, weight_VD, dtype):
    with torch.autocast(hidden_ND.device.type, enabled=False):
        return _widened(hidden_ND.to(dtype) @ weight_VD.to(dtype).T)


class _ChunkedLogprobs(torch.autograd.Function):
    """Chunks of positions with at most ``limit`` logits; keeps each position's log-sum-exp and recomputes its
    logits in backward, where only the gradients asked for are computed (a frozen head's is neither allocated nor
    multiplied out)."""

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, dtype, limit):
        rows = max(1, limit // weight_VD.shape[0])
        out_N = torch.empty(targets_N.shape, dtype=torch.promote_types(dtype, torch.float32), device=hidden_ND.device)
        lse_N = torch.empty_like(out_N)
        w = weight_VD.to(dtype)
        for s in range(0, len(targets_N), rows):
            logits_nV = _logits(hidden_ND[s : s + rows], w, dtype)
            lse_N[s : s + rows] = logits_nV.logsumexp(-1)
            out_N[s : s + rows] = logits_nV.gather(-1, targets_N[s : s + rows, None]).squeeze(-1) - lse_N[s : s + rows]
        ctx.save_for_backward(hidden_ND, weight_VD, targets_N, lse_N)
        ctx.dtype, ctx.rows = dtype, rows
        ctx.block = max(1, limit // weight_VD.shape[1])  # vocabulary rows per block of the weight's gradient
        return out_N

    @staticmethod
    def backward(ctx, grad_N):
        hidden_ND, weight_VD, targets_N, lse_N = ctx.saved_tensors
        dtype, rows, block = ctx.dtype, ctx.rows, ctx.block
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden_ND) if want_hidden else None
        grad_weight = None
        if want_weight:
            grad_weight = torch.zeros(
                weight_VD.shape, dtype=torch.promote_types(weight_VD.dtype, torch.float32), device=weight_VD.device
            )
        w = weight_VD.to(dtype)
        with torch.autocast(hidden_ND.device.type, enabled=False):
            for s in range(0, len(targets_N), rows):
                h = hidden_ND[s : s + rows].to(dtype)
                # d logprob / d logits = onehot(target) - softmax
                probs_nV = (_logits(h, w, dtype) - lse_N[s : s + rows, None]).exp_()
                probs_nV[torch.arange(len(h), device=h.device), targets_N[s : s + rows]] -= 1
                g_nV = (probs_nV * -grad_N[s : s + rows, None]).to(dtype)
                if want_hidden:
                    grad_hidden[s : s + rows] = g_nV @ w
                if want_weight:
                    for v in range(0, len(w), block):  # vocabulary blocks bound the float32 copy of the product
                        grad_weight[v : v + block] += g_nV[:, v : v + block].T @ h
        if want_weight:
            grad_weight = grad_weight.to(weight_VD.dtype)
        return grad_hidden, grad_weight, None, None, None
