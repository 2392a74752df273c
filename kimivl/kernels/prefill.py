"""Prefill attention of a chunk of queries over MLA's compressed cache, in key blocks: the chunk's ``S`` queries (the
last ``S`` cached tokens) attend to every cached token, but per-head keys and values are built from the latents one
block of ``key_block`` tokens at a time, attended to by the fused kernel, which also returns each query's
log-sum-exp, and merged exactly into a running float32 output (a merge of partial softmaxes, as flash attention does
within one call). Memory beyond the cache is bounded by the chunk and the key block, not the context.

The chunk's own keys come first (a square causal block, which always holds each query's own key, so the running
log-sum-exp is finite from the start); then the earlier context, block by block, which every query sees whole but for
padding keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# cached tokens expanded per block: 4096 x 16 heads x (192 + 128) bf16 values (key, value) is 42 MB at the a3b
PREFILL_KEY_BLOCK = 4096

Expand = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def latent_prefill_attention(
    q_BSHD: torch.Tensor,
    blocks_BNX: Sequence[torch.Tensor],
    expand: Expand,
    *,
    scale: float,
    key_valid_BK: torch.Tensor | None = None,
    key_block: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v per head, the ``S`` queries being the last ``S`` of the cached tokens held in
    ``blocks_BNX`` (the cache in order, (B, N, X) pieces) and attending causally. ``expand`` maps cached rows
    (B, n, X) to per-head keys (B, n, H, D) and values (B, n, H, E). ``key_valid_BK`` (bool, B x total cached) marks
    real keys in padded rows (a query always sees itself). Returns (B, S, H, E) in ``q``'s dtype."""
    b, s, h, d = q_BSHD.shape
    key_block = key_block or PREFILL_KEY_BLOCK
    total = sum(blk.shape[1] for blk in blocks_BNX)
    if total < s or any(blk.shape[0] != b for blk in blocks_BNX):
        raise ValueError(
            f"prefill attention needs the {s} queries' rows among {b}-row cached blocks, got "
            f"{[tuple(blk.shape) for blk in blocks_BNX]}"
        )
    if key_valid_BK is not None and tuple(key_valid_BK.shape) != (b, total):
        raise ValueError(
            f"key_valid_BK must be ({b}, {total}) for {total} cached tokens, got {tuple(key_valid_BK.shape)}"
        )
    past = total - s
    q_BHSD = q_BSHD.transpose(1, 2)

    own_BSX = _rows(blocks_BNX, past, total)
    own_mask = None
    if key_valid_BK is not None:
        allowed = torch.ones(s, s, dtype=torch.bool, device=q_BSHD.device).tril()
        allowed = (allowed & key_valid_BK[:, None, past:]) | torch.eye(s, dtype=torch.bool, device=q_BSHD.device)
        own_mask = _bias(allowed[:, None], q_BSHD.dtype)
    o_BHSE, lse_BHS = _partial(q_BHSD, own_BSX, expand, scale, own_mask, causal=own_mask is None)
    for start in range(0, past, key_block):
        end = min(start + key_block, past)
        mask = seen = None
        if key_valid_BK is not None:
            valid_BN = key_valid_BK[:, start:end]
            seen = valid_BN.any(-1)
            if not bool(seen.any()):
                continue  # padding only
            mask = _bias(valid_BN[:, None, None], q_BSHD.dtype)
        o_i, lse_i = _partial(q_BHSD, _rows(blocks_BNX, start, end), expand, scale, mask, causal=False)
        if seen is not None:  # a row without a real key here adds nothing (the kernel reports 0 for it, not -inf)
            lse_i.masked_fill_(~seen[:, None, None], float("-inf"))
        lse = torch.logaddexp(lse_BHS, lse_i)
        o_BHSE.mul_((lse_BHS - lse).exp_()[..., None]).add_(o_i.mul_((lse_i - lse).exp_()[..., None]))
        lse_BHS = lse
    return o_BHSE.transpose(1, 2).to(q_BSHD.dtype)


def _partial(q_BHSD, rows_BNX, expand, scale, mask, *, causal):
    """The block's attention output (B, H, S, E) in float32 (float64 in a float64 model; a tensor of its own: the
    merge scales it in place) and each query's log-sum-exp (B, H, S)."""
    k_BNHD, v_BNHE = expand(rows_BNX)
    d, e = k_BNHD.shape[-1], v_BNHE.shape[-1]
    # the fused CPU kernel needs equal head dims: zero-padded values (the padding dropped after), or zero-padded
    # queries and keys, which leave the scores as they were (the scale is given)
    if e < d:
        v_BNHE = F.pad(v_BNHE, (0, d - e))
    elif e > d:
        q_BHSD, k_BNHD = F.pad(q_BHSD, (0, e - d)), F.pad(k_BNHD, (0, e - d))
    k_BHND, v_BHND = k_BNHD.transpose(1, 2), v_BNHE.transpose(1, 2)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q_BHSD, k_BHND, v_BHND, 0.0, causal, attn_mask=mask, scale=scale
    )
    return o[..., :e].to(torch.promote_types(o.dtype, torch.float32)), lse


def _rows(blocks_BNX: Sequence[torch.Tensor], start: int, end: int) -> torch.Tensor:
    """Cached tokens ``start:end`` as one (B, end - start, X) tensor (a view when one block holds them)."""
    pieces, pos = [], 0
    for blk in blocks_BNX:
        n = blk.shape[1]
        lo, hi = max(start - pos, 0), min(end - pos, n)
        if lo < hi:
            pieces.append(blk[:, lo:hi])
        pos += n
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as the additive one (0 / -inf, in the queries' dtype) that the fused kernel takes."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
