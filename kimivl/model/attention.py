"""Attention backends: flash-attn varlen when importable on CUDA, exact PyTorch SDPA otherwise.

Layouts are named in suffixes: ``T`` packed tokens, ``B`` batch, ``H`` heads, ``S``/``K`` query/key length,
``D``/``E`` query-key/value head dims. Packed inputs carry ``cu_seqlens`` (int32, length segments + 1); tokens of
different segments never attend to each other, and memory stays linear in the total token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional accelerator
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None


def use_flash(x: torch.Tensor) -> bool:
    """True when the flash-attn kernel can run on ``x``."""
    return flash_attn_varlen_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; on CPU, values narrower than the query-key head dim (MLA's 128 vs 192) are
    zero-padded to it, because the fused CPU kernel needs equal head dims and the fallback builds every (S, K) score
    matrix in memory and is several times slower."""
    e = v.shape[-1]
    if v.is_cuda or e >= q.shape[-1]:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, F.pad(v, (0, q.shape[-1] - e)), **kwargs)[..., :e]


# On CUDA without flash-attn, many short segments run as one padded batch (fewer kernel launches) when the padded
# score matrices stay this small (elements); otherwise segments run one by one, so memory stays linear in the
# token count. On CPU, packed segments and padded training batches whose scores fit it run as plain matmuls (1.3-3x
# faster than the fused kernel, forward and backward, for short sequences and narrow heads), in chunks of
# CHUNK_SCORES score elements that stay in cache; similar-length segments share padded batches, and longer segments
# run through the fused kernel.
SCORES_LIMIT = 1 << 24
CHUNK_SCORES = 1 << 22


def varlen_attention(q_THD: torch.Tensor, k_THD: torch.Tensor, v_THE: torch.Tensor, cu_seqlens: torch.Tensor,
                     *, causal: bool, scale: float | None = None) -> torch.Tensor:
    """Attention within each packed segment; returns (T, H, E)."""
    if use_flash(q_THD):
        return _flash_varlen(q_THD, k_THD, v_THE, cu_seqlens, causal=causal, scale=scale)
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if min(lengths, default=0) < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    if sum(lengths) != q_THD.shape[0]:
        raise ValueError(f"cu_seqlens covers {sum(lengths)} tokens but the inputs hold {q_THD.shape[0]}")
    segments = [(a, n) for a, n in zip(bounds, lengths) if n]
    heads = q_THD.shape[1]
    if q_THD.is_cuda:
        longest = max((n for _, n in segments), default=0)
        if len(segments) > 1 and len(segments) * heads * longest * longest <= SCORES_LIMIT:
            return _padded_batch(q_THD, k_THD, v_THE, segments, causal=causal, scale=scale, fused=True)
        buckets = [[seg] for seg in segments]
    else:
        buckets = _similar_lengths(segments, heads)
    # segments running alone are split off (not sliced), so backward moves each gradient once rather than
    # materialising a full-size gradient per segment
    alone = None
    if any(len(bucket) == 1 for bucket in buckets):
        alone = [dict(zip(bounds, t.split(lengths))) for t in (q_THD, k_THD, v_THE)]
    outs = []
    for bucket in buckets:
        if len(bucket) > 1:
            outs.append(_padded_batch(q_THD, k_THD, v_THE, bucket, causal=causal, scale=scale, fused=False))
            continue
        (a, n), = bucket
        q, k, v = (part[a].transpose(0, 1) for part in alone)
        if not q.is_cuda and heads * n * n <= SCORES_LIMIT:
            o = _matmul_attention(q, k, v, _causal_bias(n, q) if causal else None, scale)
        else:
            o = _sdpa(q[None], k[None], v[None], is_causal=causal, scale=scale)[0]
        outs.append(o.transpose(0, 1))
    if not outs:
        return v_THE.new_zeros(*q_THD.shape[:2], v_THE.shape[-1])
    done = [seg for bucket in buckets for seg in bucket]
    if done == segments:
        return torch.cat(outs) if len(outs) > 1 else outs[0]
    # back into token order with one indexed copy (its backward is one gather)
    order = torch.tensor([i for a, n in done for i in range(a, a + n)], device=q_THD.device)
    return v_THE.new_empty(*q_THD.shape[:2], v_THE.shape[-1]).index_copy(0, order, torch.cat(outs))


def _similar_lengths(segments: list[tuple[int, int]], heads: int) -> list[list[tuple[int, int]]]:
    """(start, length) segments grouped, longest first, into buckets of lengths within 2x of the bucket's longest
    whose padded scores fit ``SCORES_LIMIT``."""
    buckets: list[list[tuple[int, int]]] = []
    for seg in sorted(segments, key=lambda s: -s[1]):
        if buckets:
            longest = buckets[-1][0][1]
            if 2 * seg[1] >= longest and (len(buckets[-1]) + 1) * heads * longest * longest <= SCORES_LIMIT:
                buckets[-1].append(seg)
                continue
        buckets.append([seg])
    return buckets


def _padded_batch(q_THD, k_THD, v_THE, segments, *, causal, scale, fused):
    """The (start, length) ``segments`` gathered into one (segments, H, longest, D) batch, padded at the end,
    returning their outputs (sum of lengths, H, E) segment after segment; SDPA when ``fused``, else plain matmuls.
    Causal: every real query's keys are real, so the causal mask alone is exact. Otherwise the mask hides the
    padding keys (padding rows see only themselves, so they stay finite). Padding rows are dropped."""
    device = q_THD.device
    starts = torch.tensor([a for a, _ in segments], device=device)
    lengths = torch.tensor([n for _, n in segments], device=device)
    longest = max(n for _, n in segments)
    offsets = torch.arange(longest, device=device)
    real_NL = offsets[None] < lengths[:, None]
    index = torch.where(real_NL, starts[:, None] + offsets[None], 0).flatten()
    q, k, v = (t.index_select(0, index).unflatten(0, real_NL.shape).transpose(1, 2) for t in (q_THD, k_THD, v_THE))
    if fused and causal:
        o_NHLE = _sdpa(q, k, v, is_causal=True, scale=scale)
    elif fused:
        allowed = real_NL[:, None, None, :] | torch.eye(longest, dtype=torch.bool, device=device)
        o_NHLE = _sdpa(q, k, v, attn_mask=allowed, scale=scale)
    elif causal:
        o_NHLE = _matmul_attention(q, k, v, _causal_bias(longest, q), scale)
    else:  # one row of key biases per (segment, head), shared by all its queries
        o_NHLE = _matmul_attention(q, k, v, _mask_bias(real_NL, q)[:, None, None], scale)
    return o_NHLE.transpose(1, 2).flatten(0, 1).index_select(0, real_NL.flatten().nonzero()[:, 0])


def _mask_bias(allowed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A boolean mask as an additive one in ``like``'s dtype: 0 where allowed, -inf elsewhere."""
    return like.new_zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))


def _causal_bias(n: int, like: torch.Tensor) -> torch.Tensor:
    """(n, n) additive mask: 0 on and below the diagonal, -inf above."""
    return torch.full((n, n), float("-inf"), dtype=like.dtype, device=like.device).triu_(1)


def _matmul_attention(q, k, v, bias, scale):
    """softmax(q k^T * scale + bias) v as plain matmuls over q, k, v of shape (..., L, D). ``bias`` (None, or an
    additive 0 / -inf mask broadcastable to (..., S, K)) enters the scores' matmul, so masking costs no pass of its
    own and masked scores get no gradient. The CPU softmax accumulates in float32 whatever its input dtype. Runs in
    chunks of at most ``CHUNK_SCORES`` score elements; the caller bounds the total (``SCORES_LIMIT``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    *lead, s, d = q.shape
    k_len, e = k.shape[-2], v.shape[-1]
    q3, k3, v3 = q.reshape(-1, s, d), k.reshape(-1, k_len, d), v.reshape(-1, k_len, e)
    if bias is None:
        bias = q.new_zeros(())
    elif bias.dim() > 2:  # one (S or 1, K) mask per leading index
        bias = bias.expand(*lead, *bias.shape[-2:]).reshape(-1, *bias.shape[-2:])
    step = max(1, CHUNK_SCORES // (s * k_len))
    chunks = [t.split(step) for t in (q3, k3, v3)]
    biases = bias.split(step) if bias.dim() == 3 and bias.shape[0] > 1 else [bias] * len(chunks[0])
    outs = [torch.baddbmm(b, qc, kc.transpose(1, 2), beta=1 if b.dim() else 0, alpha=scale).softmax(-1) @ vc
            for qc, kc, vc, b in zip(*chunks, biases)]
    return (torch.cat(outs) if len(outs) > 1 else outs[0]).view(*lead, s, e)


def _flash_varlen(q, k, v, cu_seqlens, *, causal, scale):
    d, e = q.shape[-1], v.shape[-1]
    if e < d:  # flash-attn needs equal head dims: pad values, then drop the padding
        v = F.pad(v, (0, d - e))
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=causal)
    return out[..., :e]


def causal_attention(q_BHSD: torch.Tensor, k_BhKD: torch.Tensor, v_BhKE: torch.Tensor, *,
                     scale: float | None = None, key_valid_BK: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention where the S queries are the last S of the K keys; returns (B, H, S, E).

    ``k``/``v`` may have fewer heads ``h`` than ``q`` (grouped queries). ``key_valid_BK`` (bool) marks real keys
    in batches padded to one length; a query always sees itself, so padding rows stay finite.
    """
    b, h, s, _ = q_BHSD.shape
    k = k_BhKD.shape[2]
    gqa = k_BhKD.shape[1] != h
    # training on CPU: plain matmuls, as for packed segments; inference keeps the fused kernel's float32 scores
    matmul = (not q_BHSD.is_cuda and q_BHSD.requires_grad and torch.is_grad_enabled() and not gqa and s > 1
              and b * h * s * k <= SCORES_LIMIT)
    if key_valid_BK is None and (s == k or s == 1) and not matmul:
        return _sdpa(q_BHSD, k_BhKD, v_BhKE, is_causal=s > 1, scale=scale, enable_gqa=gqa)
    allowed = torch.ones(s, k, dtype=torch.bool, device=q_BHSD.device).tril(k - s)
    if key_valid_BK is not None:
        allowed = (allowed & key_valid_BK[:, None, None, :]) | allowed.triu(k - s)
    if matmul:
        return _matmul_attention(q_BHSD, k_BhKD, v_BhKE, _mask_bias(allowed, q_BHSD), scale)
    return _sdpa(q_BHSD, k_BhKD, v_BhKE, attn_mask=allowed, scale=scale, enable_gqa=gqa)
