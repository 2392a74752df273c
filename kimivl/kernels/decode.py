"""Decode attention straight on MLA's compressed cache: one query per row and head attends to the cached
``[latent | rope key]`` rows, which are at once the one key all heads share (all X values) and the shared value (the
first ``value_dim`` values).

The cache is read once per step, in its stored dtype, chunk by chunk (split-K over the context, as flash-decoding
does): each chunk is widened to float32 in a buffer of ``chunk`` tokens, its scores, softmax and weighted values are
taken in float32, and the chunks' partial maxima, sums and outputs are merged exactly at the end. Per-step memory
beyond the cache is bounded by the chunk, not the context; the matmuls of a chunk use every thread.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DECODE_CHUNK = 1024  # cached tokens per chunk: 1024 x 576 float32 values is 2.3 MB per row, cache-resident


def latent_decode_attention(
    q_BHX: torch.Tensor,
    blocks_BNX: Sequence[torch.Tensor],
    value_dim: int,
    *,
    scale: float,
    key_valid_BK: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v for one query token per row, over the cached tokens held in ``blocks_BNX`` (the
    cache in order, each block (B, N, X) in any dtype; keys are all X values, values the first ``value_dim``).
    ``key_valid_BK`` (bool, B x total cached) marks real keys in padded rows; the last key, the query's own, is
    always seen. ``chunk`` defaults to ``DECODE_CHUNK`` tokens. Returns (B, H, value_dim) in ``q``'s dtype."""
    b, h, x = q_BHX.shape
    chunk = chunk or DECODE_CHUNK
    pieces = [p for blk in blocks_BNX for p in blk.split(chunk, dim=1) if p.shape[1]]
    total = sum(p.shape[1] for p in pieces)
    if not pieces or any(p.shape[0] != b or p.shape[2] != x for p in pieces):
        raise ValueError(
            f"decode attention needs cached blocks of shape ({b}, n, {x}) holding at least one token, got "
            f"{[tuple(p.shape) for p in blocks_BNX]}"
        )
    if key_valid_BK is not None and tuple(key_valid_BK.shape) != (b, total):
        raise ValueError(
            f"key_valid_BK must be ({b}, {total}) for {total} cached tokens, got {tuple(key_valid_BK.shape)}"
        )
    q_BHX_f = q_BHX.float() * scale
    buf_BCX = None
    maxima, sums, outs = [], [], []
    start = 0
    for group in _groups(pieces, chunk):
        n = sum(p.shape[1] for p in group)
        if len(group) == 1 and group[0].dtype == torch.float32:
            kv_BCX = group[0]
        else:
            if buf_BCX is None:
                buf_BCX = torch.empty(b, chunk, x, dtype=torch.float32, device=q_BHX.device)
            kv_BCX = buf_BCX[:, :n]
            if len(group) > 1:
                torch.cat(group, dim=1, out=kv_BCX)
            else:
                kv_BCX.copy_(group[0])
        s_BHC = torch.bmm(q_BHX_f, kv_BCX.transpose(1, 2))
        if key_valid_BK is not None:
            valid_BC = key_valid_BK[:, start : start + n]
            if start + n == total:
                valid_BC = valid_BC.clone()
                valid_BC[:, -1] = True
            s_BHC.masked_fill_(~valid_BC[:, None, :], float("-inf"))
        m_BH1 = s_BHC.amax(-1, keepdim=True)
        p_BHC = (s_BHC - torch.where(torch.isinf(m_BH1), 0.0, m_BH1)).exp_()  # a fully masked chunk weighs 0
        maxima.append(m_BH1)
        sums.append(p_BHC.sum(-1, keepdim=True))
        outs.append(torch.bmm(p_BHC, kv_BCX[..., :value_dim]))
        start += n
    if len(outs) == 1:
        return (outs[0] / sums[0]).to(q_BHX.dtype)
    m_PBH1 = torch.stack(maxima)
    w_PBH1 = (m_PBH1 - m_PBH1.amax(0)).exp_()  # the last chunk always holds a seen key, so the maximum is finite
    o_BHE = (w_PBH1 * torch.stack(outs)).sum(0) / (w_PBH1 * torch.stack(sums)).sum(0)
    return o_BHE.to(q_BHX.dtype)


def _groups(pieces: list[torch.Tensor], chunk: int) -> list[list[torch.Tensor]]:
    """Consecutive pieces (each at most ``chunk`` tokens) gathered into groups of at most ``chunk`` tokens."""
    groups: list[list[torch.Tensor]] = [[]]
    filled = 0
    for p in pieces:
        if filled + p.shape[1] > chunk and groups[-1]:
            groups.append([])
            filled = 0
        groups[-1].append(p)
        filled += p.shape[1]
    return groups
