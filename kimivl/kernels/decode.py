"""Decode attention straight on MLA's compressed cache: one query per row and head attends to the cached
``[latent | rope key]`` rows, which are at once the one key all heads share (all X values) and the shared value (the
first ``value_dim`` values).

The cache is read once per step, in its stored dtype (split-K over the context, as flash-decoding does): a span of
cached tokens at a time is widened to float32 (float64 in a float64 model) in one buffer, cut into chunks whose
scores, softmax and weighted values are taken in that dtype, all the span's chunks in one batched matmul (so the
threads share them), and the chunks' partial maxima, sums and outputs are merged exactly at the end. Per-step memory
beyond the cache is bounded by the span, not the context.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DECODE_CHUNK = 1024  # cached tokens per partial softmax
DECODE_SPAN = 4096  # cached tokens widened at once over all rows: 4096 x 576 float32 values is 9.4 MB


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
    """softmax(q k^T * scale) v for one query token per row, over the cached tokens held in ``blocks_BNX`` (the
    cache in order, each block (B, N, X) in any dtype; keys are all X values, values the first ``value_dim``).
    ``key_valid_BK`` (bool, B x total cached) marks real keys in padded rows; the last key, the query's own, is
    always seen. ``chunk`` (default ``DECODE_CHUNK``) is the tokens of one partial softmax, ``span`` (default
    ``DECODE_SPAN``) the tokens widened at once over all rows, at least one chunk per row. Returns (B, H, value_dim)
    in ``q``'s dtype."""
    b, h, x = q_BHX.shape
    chunk = chunk or DECODE_CHUNK
    per_row = max(1, (span or DECODE_SPAN) // (b * chunk)) * chunk  # tokens of each row widened at once
    pieces = [p for blk in blocks_BNX for p in blk.split(per_row, dim=1) if p.shape[1]]
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
    wide = torch.promote_types(q_BHX.dtype, torch.float32)  # float64 for a float64 model
    q_B1HX = (q_BHX.to(wide) * scale)[:, None]
    buf_BSX = None
    maxima, sums, outs = [], [], []
    start = 0
    for group in _groups(pieces, per_row):
        n = sum(p.shape[1] for p in group)
        if len(group) == 1 and group[0].dtype == wide:
            kv_BNX = group[0]
        else:
            if buf_BSX is None:  # no larger than the context: a short one allocates little per step
                buf_BSX = torch.empty(b, min(per_row, total), x, dtype=wide, device=q_BHX.device)
            kv_BNX = buf_BSX[:, :n]
            if len(group) > 1:
                torch.cat(group, dim=1, out=kv_BNX)
            else:
                kv_BNX.copy_(group[0])
        whole = n // chunk * chunk  # the span's whole chunks go as one batch, a shorter rest after them
        for lo, hi, size in ((0, whole, chunk), (whole, n, n - whole)):
            if hi == lo:
                continue
            n_chunks = (hi - lo) // size  # batched as (rows x chunks) matmuls: a view of the buffer
            kv_NCX = kv_BNX[:, lo:hi].reshape(b * n_chunks, size, x)
            s_NHC = torch.bmm(q_B1HX.expand(b, n_chunks, h, x).reshape(-1, h, x), kv_NCX.transpose(1, 2))
            if key_valid_BK is not None:
                valid_BC = key_valid_BK[:, start + lo : start + hi]
                if start + hi == total:  # the query's own key, the last, is always seen
                    valid_BC = valid_BC.clone()
                    valid_BC[:, -1] = True
                s_NHC.masked_fill_(~valid_BC.reshape(-1, 1, size), float("-inf"))
            m_NH1 = s_NHC.amax(-1, keepdim=True)
            p_NHC = (s_NHC - torch.where(torch.isinf(m_NH1), 0.0, m_NH1)).exp_()  # a fully masked chunk weighs 0
            maxima.append(m_NH1.view(b, n_chunks, h, 1))
            sums.append(p_NHC.sum(-1, keepdim=True).view(b, n_chunks, h, 1))
            outs.append(torch.bmm(p_NHC, kv_NCX[..., :value_dim]).view(b, n_chunks, h, value_dim))
        start += n
    if len(outs) == 1 and outs[0].shape[1] == 1:
        return (outs[0] / sums[0])[:, 0].to(q_BHX.dtype)
    m_BPH1 = torch.cat(maxima, 1)
    w_BPH1 = (m_BPH1 - m_BPH1.amax(1, keepdim=True)).exp_()  # the last chunk always holds a seen key
    o_BHE = (w_BPH1 * torch.cat(outs, 1)).sum(1) / (w_BPH1 * torch.cat(sums, 1)).sum(1)
    return o_BHE.to(q_BHX.dtype)


def _groups(pieces: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive pieces (each at most ``limit`` tokens) gathered into groups of at most ``limit`` tokens."""
    groups: list[list[torch.Tensor]] = [[]]
    filled = 0
    for p in pieces:
        if filled + p.shape[1] > limit and groups[-1]:
            groups.append([])
            filled = 0
        groups[-1].append(p)
        filled += p.shape[1]
    return groups
