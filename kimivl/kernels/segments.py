"""Packed segments gathered into padded batches: one kernel call for many segments instead of one each."""

from __future__ import annotations

import torch

from kimivl.kernels import fused
from kimivl.kernels.matmul import causal_bias, mask_bias, matmul_attention

PAD_SCORES = 1 << 16  # padding score elements a segment may add to a batch rather than run in a call of its own


def similar_lengths(segments: list[tuple[int, int]], heads: int, limit: int) -> list[list[tuple[int, int]]]:
    """(start, length) segments grouped, longest first, into buckets: a segment joins the bucket of the one before
    when its padding to the bucket's longest adds at most ``PAD_SCORES`` score elements (heads * (longest^2 -
    length^2): short segments share a call whatever their lengths, long ones only with lengths close to their own)
    and the padded scores (heads * bucket size * longest^2 elements) stay within ``limit``."""
    buckets: list[list[tuple[int, int]]] = []
    for seg in sorted(segments, key=lambda s: -s[1]):
        if buckets:
            longest = buckets[-1][0][1]
            cheap = heads * (longest * longest - seg[1] * seg[1]) <= PAD_SCORES
            if cheap and (len(buckets[-1]) + 1) * heads * longest * longest <= limit:
                buckets[-1].append(seg)
                continue
        buckets.append([seg])
    return buckets


def padded_batch(
    q_THD: torch.Tensor,
    k_THD: torch.Tensor,
    v_THE: torch.Tensor,
    segments: list[tuple[int, int]],
    *,
    causal: bool,
    scale: float | None,
    fused_kernel: bool,
) -> torch.Tensor:
    """The (start, length) ``segments`` gathered into one (segments, H, longest, D) batch, padded at the end,
    returning their outputs (sum of lengths, H, E) segment after segment; SDPA when ``fused_kernel``, else plain
    matmuls. Causal: every real query's keys are real, so the causal mask alone is exact. Otherwise the mask hides
    the padding keys (padding rows see only themselves, so they stay finite). Padding rows are dropped."""
    device = q_THD.device
    starts = torch.tensor([a for a, _ in segments], device=device)
    lengths = torch.tensor([n for _, n in segments], device=device)
    longest = max(n for _, n in segments)
    offsets = torch.arange(longest, device=device)
    real_NL = offsets[None] < lengths[:, None]
    index = torch.where(real_NL, starts[:, None] + offsets[None], 0).flatten()
    q, k, v = (t.index_select(0, index).unflatten(0, real_NL.shape).transpose(1, 2) for t in (q_THD, k_THD, v_THE))
    if fused_kernel and causal:
        o_NHLE = fused.sdpa(q, k, v, is_causal=True, scale=scale)
    elif fused_kernel:
        allowed = real_NL[:, None, None, :] | torch.eye(longest, dtype=torch.bool, device=device)
        o_NHLE = fused.sdpa(q, k, v, attn_mask=allowed, scale=scale)
    elif causal:
        o_NHLE = matmul_attention(q, k, v, causal_bias(longest, q), scale)
    else:  # one row of key biases per (segment, head), shared by all its queries
        o_NHLE = matmul_attention(q, k, v, mask_bias(real_NL, q)[:, None, None], scale)
    return o_NHLE.transpose(1, 2).flatten(0, 1).index_select(0, real_NL.flatten().nonzero()[:, 0])
