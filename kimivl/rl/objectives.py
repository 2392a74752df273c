"""RL objectives on groups of k samples per problem: online policy mirror descent (OPMD, the Kimi-VL-Thinking /
k1.5 objective), GRPO for comparison, and the length reward.

Samples are laid out problem by problem: rewards ``(P * k,)`` reshape to ``(P, k)``. Losses return one value per
sample, so a trainer may back-propagate them in chunks and average (every loss here is a per-sample mean).
"""

from __future__ import annotations

import torch


def _groups(values: torch.Tensor, k: int) -> torch.Tensor:
    if values.dim() != 1 or k < 1 or values.numel() % k:
        raise ValueError(f"expected a flat tensor of problems x {k} samples, got shape {tuple(values.shape)}")
    return values.view(-1, k)


def length_reward(lengths: torch.Tensor, correct: torch.Tensor, k: int) -> torch.Tensor:
    """Kimi's length reward among each problem's k samples: lambda = 0.5 - (len - min) / (max - min); correct
    samples get lambda, wrong ones min(0, lambda), so a short wrong answer is never rewarded. When all k samples
    have the same length there is nothing to compare and every lambda is 0."""
    lengths_PK = _groups(lengths.float(), k)
    lo, hi = lengths_PK.min(1, keepdim=True).values, lengths_PK.max(1, keepdim=True).values
    lam_PK = torch.where(hi > lo, 0.5 - (lengths_PK - lo) / (hi - lo).clamp_min(1e-9), torch.zeros_like(lengths_PK))
    ok_PK = _groups(correct, k).bool()
    return torch.where(ok_PK, lam_PK, lam_PK.clamp(max=0.0)).flatten()


def group_baseline(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Each sample's r - mean reward of its problem's k samples (OPMD's advantage); exactly 0 where they are equal."""
    r_PK = _groups(rewards.float(), k)
    return _zero_where_equal(r_PK, r_PK - r_PK.mean(1, keepdim=True)).flatten()


def _zero_where_equal(r_PK: torch.Tensor, advantage_PK: torch.Tensor) -> torch.Tensor:
    """``advantage_PK`` with the problems whose k rewards are all equal set to 0: their mean's float32 rounding (0.7
    x 8) left advantages of 6e-8 (GRPO scaled it to 0.06), which the optimizers' normalised updates turned into full
    steps on no signal."""
    return advantage_PK.masked_fill((r_PK == r_PK[:, :1]).all(1, keepdim=True), 0.0)


def group_normalised(rewards: torch.Tensor, k: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's advantage (r - mean) / (std + eps) within each problem (population std; equal rewards give 0)."""
    r_PK = _groups(rewards.float(), k)
    mean, std = r_PK.mean(1, keepdim=True), r_PK.std(1, unbiased=False, keepdim=True)
    return _zero_where_equal(r_PK, (r_PK - mean) / (std + eps)).flatten()


def opmd_loss(logp: torch.Tensor, logp_ref: torch.Tensor, advantage: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-sample (r - r_mean - tau * (log pi_theta(y|x) - log pi_ref(y|x)))^2 on sequence log-probs (N,).
    No value network, no clipping; its minimiser over pi is pi_ref * exp((r - r_mean) / tau), renormalised."""
    return (advantage - tau * (logp - logp_ref)) ** 2


MAX_LOG_RATIO = 80.0  # GRPO's log-ratios are cut here, under float32's exp overflow (88.7)


def grpo_loss(
    logp_tokens: list[torch.Tensor],
    logp_old_tokens: list[torch.Tensor],
    advantage: torch.Tensor,
    clip_eps: float = 0.2,
    level: str = "token",
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Per-sample clipped-ratio surrogate, negated: -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A).

    ``level='token'``: rho per token, averaged over the sample's tokens (GRPO); ``'sequence'``: rho is the
    sequence probability ratio. ``kl_coef`` adds the k3 estimate of KL(pi_theta || pi_old) per token,
    exp(old - new) - (old - new) - 1, averaged the same way. Log-ratios are cut at ``MAX_LOG_RATIO`` in rho and in
    both parts of the KL term, so both stay finite, constant and without gradient past the cut (cutting only the KL's
    exp left its -(old - new) pushing such a token further from the old policy). The old policy here is the
    iteration's reference (the sampling policy); a fixed initial reference as in the GRPO paper would need a second
    frozen copy.
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"GRPO level must be 'token' or 'sequence', got {level!r}")
    out = []
    for new, old, a in zip(logp_tokens, logp_old_tokens, advantage):
        log_ratio = (new - old) if level == "token" else (new - old).sum(0, keepdim=True)
        rho = log_ratio.clamp(max=MAX_LOG_RATIO).exp()  # finite: a sequence's ratio of e^100 made 0 * inf = NaN
        surrogate = torch.minimum(rho * a, rho.clamp(1 - clip_eps, 1 + clip_eps) * a).mean()
        loss = -surrogate
        if kl_coef:
            d = (old - new).clamp(max=MAX_LOG_RATIO)
            loss = loss + kl_coef * (d.exp() - d - 1).mean()
        out.append(loss)
    return torch.stack(out) if out else advantage.new_zeros(0)


def kl_estimate(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Mean k3 estimate of KL(pi_ref || pi_theta) per sequence: E[rho - 1 - log rho], rho = pi_theta(y|x) /
    pi_ref(y|x) (non-negative; unbiased for samples of pi_ref itself, so only a guide for rollouts drawn with a
    temperature or ``top_p``, as RL's are)."""
    log_rho = (logp - logp_ref).double()  # float32's exp overflows past a log-ratio of 88.7, float64's past 709
    return (log_rho.exp() - 1 - log_rho).mean()
