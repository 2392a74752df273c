"""The attention function the model calls, which picks the kernel that runs, and the setting that selects its CPU
path for training.

Layouts are named in suffixes: ``T`` packed tokens, ``B`` batch, ``H`` heads, ``S``/``K`` query/key length,
``D``/``E`` query-key/value head dims. Paths:

- packed segments (``cu_seqlens``): flash-attn's varlen kernel on CUDA when importable; else on CUDA many short
  segments as one fused padded batch while its scores stay within ``SCORES_LIMIT`` elements, longer ones one by one;
  on CPU, whatever the setting, segments whose scores fit run as plain matmuls, similar lengths sharing padded
  batches, and longer ones through the fused kernel one by one. Memory stays linear in the total token count.
- batched causal rows: the fused kernel (on CPU its scores are float32 whatever the input dtype: the inference
  numbers); on CPU inside ``training_attention()``, plain matmuls, 1.3-3x faster forward and backward for short rows.
- MLA on its compressed cache (``latent_decode_attention``, ``latent_prefill_attention``): on CPU split-K decoding
  (``kernels.decode``) and prefill in key blocks (``kernels.prefill``), memory bounded by span and block; on CUDA SDPA
  over the cache joined into one tensor (its flash / memory-efficient kernels; GPU memory holds the context's keys).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from kimivl.kernels import decode, fused, prefill
from kimivl.kernels.matmul import causal_bias, mask_bias, matmul_attention
from kimivl.kernels.segments import padded_batch, similar_lengths

SCORES_LIMIT = 1 << 24  # score elements of one padded batch or plain-matmul call

_matmul_rows = False  # batched causal rows on CPU as plain matmuls (training_attention)


@contextlib.contextmanager
def training_attention(on: bool = True) -> Iterator[None]:
    """Within it (``on``), batched causal attention on CPU runs as plain matmuls, as packed segments always do there:
    faster forward and backward for short rows, with scores in the input dtype (bf16 under autocast) where the fused
    kernel keeps float32 ones. Outside it the fused kernel runs, whether or not gradients are on. The setting is
    process-wide; activation checkpointing recomputes a layer with the setting of its forward."""
    global _matmul_rows
    before, _matmul_rows = _matmul_rows, on
    try:
        yield
    finally:
        _matmul_rows = before


def recompute_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``torch.utils.checkpoint``'s ``context_fn``: the recomputation in backward takes the attention path its
    forward took, even where backward runs outside ``training_attention``."""
    return contextlib.nullcontext(), training_attention(_matmul_rows)


def attention(
    q_BSHD: torch.Tensor,
    k_BKHD: torch.Tensor,
    v_BKHE: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_valid_BK: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v per head (``scale`` defaults to D^-0.5); returns (B, S, H, E).

    With ``cu_seqlens`` (int32, segments + 1 bounds) the single row is a pack of segments that never attend to each
    other, causal or not. Otherwise attention is causal, the S queries being the last S of the K keys; ``k``/``v`` may
    have fewer heads than ``q`` (grouped queries), and ``key_valid_BK`` (bool) marks real keys in rows padded to one
    length (a query always sees itself, so padding rows stay finite).
    """
    if cu_seqlens is not None:
        if q_BSHD.shape[0] != 1 or key_valid_BK is not None:
            raise ValueError(
                f"packed attention (cu_seqlens) takes one row and no key mask, got a batch of "
                f"{q_BSHD.shape[0]}{' and a key mask' if key_valid_BK is not None else ''}"
            )
        return _packed(q_BSHD[0], k_BKHD[0], v_BKHE[0], cu_seqlens, causal=causal, scale=scale)[None]
    if not causal:
        raise ValueError("non-causal attention takes packed segments (cu_seqlens)")
    o_BHSE = _batched(q_BSHD.transpose(1, 2), k_BKHD.transpose(1, 2), v_BKHE.transpose(1, 2), scale, key_valid_BK)
    return o_BHSE.transpose(1, 2)


def _packed(
    q_THD: torch.Tensor,
    k_THD: torch.Tensor,
    v_THE: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """Attention within each packed segment; returns (T, H, E)."""
    if fused.use_flash(q_THD):
        return fused.flash_varlen(q_THD, k_THD, v_THE, cu_seqlens, causal=causal, scale=scale)
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
            return padded_batch(q_THD, k_THD, v_THE, segments, causal=causal, scale=scale, fused_kernel=True)
        buckets = [[seg] for seg in segments]
    else:
        buckets = similar_lengths(segments, heads, SCORES_LIMIT)
    # segments running alone are split off (not sliced), so backward moves each gradient once rather than
    # materialising a full-size gradient per segment
    alone = None
    if any(len(bucket) == 1 for bucket in buckets):
        alone = [dict(zip(bounds, t.split(lengths))) for t in (q_THD, k_THD, v_THE)]
    outs = []
    for bucket in buckets:
        if len(bucket) > 1:
            outs.append(padded_batch(q_THD, k_THD, v_THE, bucket, causal=causal, scale=scale, fused_kernel=False))
            continue
        ((a, n),) = bucket
        q, k, v = (part[a].transpose(0, 1) for part in alone)
        if not q.is_cuda and heads * n * n <= SCORES_LIMIT:
            o = matmul_attention(q, k, v, causal_bias(n, q) if causal else None, scale)
        else:
            o = fused.sdpa(q[None], k[None], v[None], is_causal=causal, scale=scale)[0]
        outs.append(o.transpose(0, 1))
    if not outs:
        return v_THE.new_zeros(*q_THD.shape[:2], v_THE.shape[-1])
    done = [seg for bucket in buckets for seg in bucket]
    if done == segments:
        return torch.cat(outs) if len(outs) > 1 else outs[0]
    # back into token order with one indexed copy (its backward is one gather)
    order = torch.tensor([i for a, n in done for i in range(a, a + n)], device=q_THD.device)
    return v_THE.new_empty(*q_THD.shape[:2], v_THE.shape[-1]).index_copy(0, order, torch.cat(outs))


def _batched(
    q_BHSD: torch.Tensor,
    k_BhKD: torch.Tensor,
    v_BhKE: torch.Tensor,
    scale: float | None,
    key_valid_BK: torch.Tensor | None,
) -> torch.Tensor:
    """Causal attention of rows; returns (B, H, S, E) in ``q``'s dtype. On CPU, keys shared by several heads (MLA's
    absorbed decoding) are attended to in float32 (float64 in a float64 model), where the fused kernel is many times
    faster."""
    b, h, s, _ = q_BHSD.shape
    k = k_BhKD.shape[2]
    gqa = k_BhKD.shape[1] != h
    dtype = q_BHSD.dtype
    if gqa and not q_BHSD.is_cuda:
        wide = torch.promote_types(dtype, torch.float32)  # float64 for a float64 model
        q_BHSD, k_BhKD, v_BhKE = q_BHSD.to(wide), k_BhKD.to(wide), v_BhKE.to(wide)
    matmul = _matmul_rows and not q_BHSD.is_cuda and not gqa and s > 1 and b * h * s * k <= SCORES_LIMIT
    if key_valid_BK is None and (s == k or s == 1) and not matmul:
        return fused.sdpa(q_BHSD, k_BhKD, v_BhKE, is_causal=s > 1, scale=scale, enable_gqa=gqa).to(dtype)
    allowed = torch.ones(s, k, dtype=torch.bool, device=q_BHSD.device).tril(k - s)
    if key_valid_BK is not None:
        allowed = (allowed & key_valid_BK[:, None, None, :]) | allowed.triu(k - s)
    if matmul:
        return matmul_attention(q_BHSD, k_BhKD, v_BhKE, mask_bias(allowed, q_BHSD), scale)
    return fused.sdpa(q_BHSD, k_BhKD, v_BhKE, attn_mask=allowed, scale=scale, enable_gqa=gqa).to(dtype)


def latent_decode_attention(
    q_BHX: torch.Tensor,
    blocks_BNX: Sequence[torch.Tensor],
    value_dim: int,
    *,
    scale: float,
    key_valid_BK: torch.Tensor | None = None,
    chunk: int | None = None,
    span: int | None = None,
) -> torch.Tensor:
    """One query token per row and head over the cached ``[latent | rope key]`` rows (keys all X values, values the
    first ``value_dim``); arguments as ``kernels.decode.latent_decode_attention`` (``chunk`` and ``span`` are its CPU
    split). Returns (B, H, value_dim) in ``q``'s dtype."""
    if q_BHX.is_cuda:
        return sdpa_decode(q_BHX, blocks_BNX, value_dim, scale=scale, key_valid_BK=key_valid_BK)
    return decode.latent_decode_attention(
        q_BHX, blocks_BNX, value_dim, scale=scale, key_valid_BK=key_valid_BK, chunk=chunk, span=span
    )


def latent_prefill_attention(
    q_BSHD: torch.Tensor,
    blocks_BNX: Sequence[torch.Tensor],
    expand: prefill.Expand,
    *,
    scale: float,
    key_valid_BK: torch.Tensor | None = None,
    key_block: int | None = None,
) -> torch.Tensor:
    """A chunk of queries (the last S cached tokens) over the whole cache, causal; arguments as
    ``kernels.prefill.latent_prefill_attention`` (``key_block`` is its CPU split). Returns (B, S, H, E)."""
    if q_BSHD.is_cuda:
        return sdpa_prefill(q_BSHD, blocks_BNX, expand, scale=scale, key_valid_BK=key_valid_BK)
    return prefill.latent_prefill_attention(
        q_BSHD, blocks_BNX, expand, scale=scale, key_valid_BK=key_valid_BK, key_block=key_block
    )


def sdpa_decode(q_BHX, blocks_BNX, value_dim, *, scale, key_valid_BK=None) -> torch.Tensor:
    """The CUDA decoding step: SDPA with the H heads as H query rows of one key head, over the joined cache."""
    kv_B1KX = (blocks_BNX[0] if len(blocks_BNX) == 1 else torch.cat(list(blocks_BNX), 1))[:, None]
    mask = None
    if key_valid_BK is not None:
        mask = key_valid_BK.clone()
        mask[:, -1] = True  # a row's own key
        mask = mask[:, None, None]
    q_B1HX = q_BHX[:, None].to(kv_B1KX.dtype)
    o = fused.sdpa(q_B1HX, kv_B1KX, kv_B1KX[..., :value_dim], attn_mask=mask, scale=scale)
    return o[:, 0].to(q_BHX.dtype)


def sdpa_prefill(q_BSHD, blocks_BNX, expand, *, scale, key_valid_BK=None) -> torch.Tensor:
    """The CUDA prefill pass: the whole cache expanded to per-head keys and values, then causal SDPA."""
    k_BKHD, v_BKHE = expand(blocks_BNX[0] if len(blocks_BNX) == 1 else torch.cat(list(blocks_BNX), 1))
    return attention(q_BSHD, k_BKHD, v_BKHE, scale=scale, key_valid_BK=key_valid_BK)
