"""Multi-head latent attention (MLA) without query compression, with interleaved RoPE on the rope dims.

Per token only the normalised latent ``c`` (kv_lora_rank) and the rotated shared rope key (qk_rope_head_dim) need
caching; ``kv_b_proj`` expands the latent into per-head ``k_nope`` and ``v``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kimivl.config import TextConfig
from kimivl.kernels import attention, latent_decode_attention, latent_prefill_attention
from kimivl.model.norm import RMSNorm
from kimivl.model.plain import plain_layer


def rope_rotation(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit complex rotations (positions.shape + (dim/2,)): pair i turns by pos * theta^(-2i/dim), computed in
    ``dtype`` (float32, or float64 for a float64 model)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=dtype) / dim)
    angles = positions.to(dtype)[..., None] * inv_freq
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of ``x`` (..., dim) by ``rot`` (complex, broadcastable to (..., dim/2)),
    in float32 (float64 for float64 ``x``)."""
    # a fresh copy: a one-token slice of a wider row (the rope key after an odd kv_lora_rank) is a contiguous view at
    # an odd offset, which .contiguous() keeps and view_as_complex refuses
    x_wide = x.to(torch.promote_types(x.dtype, torch.float32), memory_format=torch.contiguous_format, copy=True)
    xc = torch.view_as_complex(x_wide.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


class MLA(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.scale = 1.0 / math.sqrt(cfg.qk_head_dim)
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.kv_rank + self.rope_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def compress(self, x_BSD: torch.Tensor, rot_BSR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cacheable part: normalised latent (B, S, kv_rank) and rotated shared rope key (B, S, rope_dim)."""
        c_BSC, kr_BSR = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(c_BSC), apply_rope(kr_BSR, rot_BSR)

    def queries(self, x_BSD: torch.Tensor, rot_BSR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head query parts: nope (B, S, H, nope_dim) and rotated rope (B, S, H, rope_dim)."""
        b, s, _ = x_BSD.shape
        q_BSHD = self.q_proj(x_BSD).view(b, s, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q_BSHD.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_rope, rot_BSR[:, :, None])

    def forward(
        self,
        x_BSD: torch.Tensor,
        rot_BSR: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        cache=None,
        key_valid_BK: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention of ``x`` over itself and, with ``cache`` (an object whose ``update(c, kr)`` stores the
        new latents and ``blocks()`` returns all cached ``[latent | rope key]`` rows as (B, N, C + R) pieces in
        order), over the cached tokens: single-token steps run absorbed on the cache (reading ``kv_b_proj``'s weight;
        a wrapped or hooked ``kv_b_proj`` is called, on the longer steps' path), longer ones expand it to per-head
        keys and values a block at a time. ``key_valid_BK`` marks real (non-padding) keys. With ``cu_seqlens`` the
        single row is a pack of samples; a cache given with it must be empty, and takes the pack's latents (a packed
        prefill: attention stays within each sample)."""
        b, s, _ = x_BSD.shape
        if cu_seqlens is not None and (b != 1 or (cache is not None and cache.blocks())):
            raise ValueError("packed attention (cu_seqlens) takes one packed row, and a cache only while it is empty")
        q_nope, q_rope = self.queries(x_BSD, rot_BSR)
        c_BKC, kr_BKR = self.compress(x_BSD, rot_BSR)
        if cache is not None:
            cache.update(c_BKC, kr_BKR)
            if s == 1 and cu_seqlens is None and plain_layer(self.kv_b_proj, nn.Linear):
                return self._absorbed(q_nope, q_rope, cache.blocks(), key_valid_BK)
        q_BSHD = torch.cat([q_nope, q_rope], dim=-1)
        if cache is not None and cu_seqlens is None:
            o = latent_prefill_attention(
                q_BSHD, cache.blocks(), self._expand, scale=self.scale, key_valid_BK=key_valid_BK
            )
        else:
            k_BKHD, v_BKHE = self._keys_values(c_BKC, kr_BKR)
            o = attention(q_BSHD, k_BKHD, v_BKHE, scale=self.scale, cu_seqlens=cu_seqlens, key_valid_BK=key_valid_BK)
        return self.o_proj(o.reshape(b, s, self.n_heads * self.v_dim))

    def _keys_values(self, c_BKC: torch.Tensor, kr_BKR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys (B, K, H, nope + rope) and values (B, K, H, v_dim) from latents and the shared rope key."""
        b, k_len, _ = c_BKC.shape
        kv = self.kv_b_proj(c_BKC).view(b, k_len, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v_BKHE = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_BKHD = torch.cat([k_nope, kr_BKR[:, :, None].expand(-1, -1, self.n_heads, -1)], dim=-1)
        return k_BKHD, v_BKHE

    def _expand(self, rows_BKX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``_keys_values`` of cached ``[latent | rope key]`` rows."""
        return self._keys_values(*rows_BKX.split([self.kv_rank, self.rope_dim], dim=-1))

    def _absorbed(self, q_nope_B1HN, q_rope_B1HR, blocks_BNX, key_valid_BK):
        """One step's attention straight on the compressed cache ``[latent | rope key]``: kv_b_proj's key half is
        folded into the query and its value half applied after, so per-head keys and values are never built (one
        shared 576-wide key, read once in its stored dtype)."""
        w_HXC = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk_HNC, w_uv_HEC = w_HXC.split([self.nope_dim, self.v_dim], dim=1)
        q_lat_BHC = torch.einsum("bhn,hnc->bhc", q_nope_B1HN[:, 0], w_uk_HNC)
        q_BHX = torch.cat([q_lat_BHC, q_rope_B1HR[:, 0]], dim=-1)
        o_BHC = latent_decode_attention(q_BHX, blocks_BNX, self.kv_rank, scale=self.scale, key_valid_BK=key_valid_BK)
        o_BHE = torch.einsum("bhc,hec->bhe", o_BHC, w_uv_HEC)
        return self.o_proj(o_BHE.flatten(1))[:, None]
