"""The compressed MLA cache: per token and layer only the normalised latent (kv_lora_rank) and the rotated shared
rope key (qk_rope_head_dim) are kept: 576 values at the a3b shape, against 2 x heads x 128-192 for per-head K/V."""

from __future__ import annotations

import torch

from kimivl.config import TextConfig


class MLACache:
    """Preallocated latents for ``batch`` rows of up to ``max_len`` tokens, filled left to right."""

    def __init__(
        self,
        config: TextConfig,
        batch: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        if max_len > config.max_position_embeddings:
            raise ValueError(f"cache of {max_len} tokens exceeds the context of {config.max_position_embeddings}")
        # one buffer per layer and token: [latent | rope key], so attention reads both without a concatenation
        width = config.kv_lora_rank + config.qk_rope_head_dim
        self.joint = torch.zeros(config.num_hidden_layers, batch, max_len, width, dtype=dtype, device=device)
        self.rank = config.kv_lora_rank
        self.max_len = max_len
        self.length = 0

    def layer(self, i: int) -> _LayerCache:
        return _LayerCache(self, i)

    def advance(self, n: int) -> None:
        self.length += n

    @staticmethod
    def bytes_per_token(config: TextConfig, dtype: torch.dtype = torch.bfloat16) -> int:
        """Cache bytes per token for the whole model."""
        return config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * dtype.itemsize

    @staticmethod
    def uncompressed_bytes_per_token(config: TextConfig, dtype: torch.dtype = torch.bfloat16) -> int:
        """What caching per-head keys (nope + rope) and values would cost."""
        per_layer = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
        return config.num_hidden_layers * per_layer * dtype.itemsize

    def nbytes(self) -> int:
        return self.joint.nbytes


class _LayerCache:
    def __init__(self, cache: MLACache, i: int):
        self.cache, self.i = cache, i

    def update(self, c_BSC: torch.Tensor, kr_BSR: torch.Tensor) -> None:
        """Store the new tokens' latents after those cached (the cache's length moves on at ``advance``)."""
        cache, start = self.cache, self.cache.length
        end = start + c_BSC.shape[1]
        if end > cache.max_len:
            raise ValueError(f"cache full: {end} tokens exceed its {cache.max_len}")
        cache.joint[self.i, :, start:end, : cache.rank] = c_BSC
        cache.joint[self.i, :, start:end, cache.rank :] = kr_BSR
        self.end = end

    def blocks(self) -> list[torch.Tensor]:
        """Every cached token's ``[latent | rope key]`` up to the last update, as (B, N, C + R) pieces in order."""
        return [self.cache.joint[self.i, :, : self.end]]

    def latents(self) -> torch.Tensor:
        """Every cached token's ``[latent | rope key]`` up to the last update, as one (B, K, C + R) tensor."""
        return self.cache.joint[self.i, :, : self.end]
