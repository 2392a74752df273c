"""The compressed MLA cache: per token and layer only the normalised latent (kv_lora_rank) and the rotated shared
rope key (qk_rope_head_dim) are kept: 576 values at the a3b shape, against 2 x heads x 128-192 for per-head K/V.

Memory is allocated as tokens arrive, in blocks (each spanning every layer), so a request that may run to
``max_len`` tokens but stops early holds only the blocks it filled; growing never copies what is cached. Blocks hold
``BLOCK_TOKENS`` tokens, and as the cache grows, the largest power-of-two multiple of that up to ``GROWTH`` times it
that is at most a quarter of what is held: a long context is read in few pieces (at 32K, 24 blocks instead of 128),
and at most a quarter more than the filled length is ever allocated. Each block starts at a multiple of its size.
Decode attention reads the blocks in order (``kimivl.kernels.latent_decode_attention``)."""

from __future__ import annotations

import bisect

import torch

from kimivl.config import TextConfig

BLOCK_TOKENS = 256  # tokens of the first blocks: 256 x 27 layers x 576 bf16 values is 8 MB per row at the a3b shape
GROWTH = 16  # the largest blocks hold this many times BLOCK_TOKENS (4096 tokens: one decode span)


class MLACache:
    """Latents for ``batch`` rows of up to ``max_len`` tokens, filled left to right; blocks of ``block`` tokens
    (default ``BLOCK_TOKENS``), growing to ``GROWTH`` times that, are allocated when the tokens reach them (or
    ahead, with ``reserve``). ``max_len`` less the left ``padding`` of the longest row must fit the context."""

    def __init__(
        self,
        config: TextConfig,
        batch: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        block: int | None = None,
        padding: int = 0,
    ):
        if max_len - padding > config.max_position_embeddings:
            raise ValueError(
                f"cache of {max_len} tokens ({padding} of them left padding) exceeds the context of "
                f"{config.max_position_embeddings}"
            )
        block = BLOCK_TOKENS if block is None else block
        if block < 1:
            raise ValueError(f"cache blocks need at least one token, got block={block}")
        # per block, layer and token: [latent | rope key], so attention reads both without a concatenation
        self.shape = (config.num_hidden_layers, batch, config.kv_lora_rank + config.qk_rope_head_dim)
        self.dtype, self.device, self.block = dtype, torch.device(device), block
        self.rank = config.kv_lora_rank
        self.max_len = max_len
        self.length = 0
        self.joint: list[torch.Tensor] = []  # blocks (layers, batch, n, width)
        self.starts: list[int] = []  # the first token of each block
        self.capacity = 0

    def layer(self, i: int) -> _LayerCache:
        return _LayerCache(self, i)

    def advance(self, n: int) -> None:
        self.length += n

    def reserve(self, end: int) -> None:
        """Allocate blocks until tokens up to ``end`` fit (the last block is cut at ``max_len``)."""
        if end > self.max_len:
            raise ValueError(f"cache full: {end} tokens exceed its {self.max_len}")
        layers, batch, width = self.shape
        while self.capacity < end:
            n = self.block
            while n * 2 <= min(self.capacity // 4, self.block * GROWTH):
                n *= 2
            n = min(n, self.max_len - self.capacity)
            self.joint.append(torch.empty(layers, batch, n, width, dtype=self.dtype, device=self.device))
            self.starts.append(self.capacity)
            self.capacity += n

    def block_at(self, pos: int) -> int:
        """The index of the block holding token ``pos``."""
        return bisect.bisect_right(self.starts, pos) - 1

    def tokens(self) -> torch.Tensor:
        """Every cached token of every row as one (layers, batch, length, width) tensor."""
        layers, batch, width = self.shape
        if not self.joint:
            return torch.empty(layers, batch, 0, width, dtype=self.dtype, device=self.device)
        return torch.cat(self.joint, dim=2)[:, :, : self.length]

    def load(self, values: torch.Tensor) -> None:
        """Hold exactly ``values`` (layers, rows, n, width) as tokens 0..n-1 of ``rows`` rows (a server re-lays its
        batch this way when rows join or leave); the blocks are allocated anew."""
        layers, _, width = self.shape
        if values.dim() != 4 or values.shape[0] != layers or values.shape[3] != width:
            raise ValueError(f"cache values must be ({layers}, rows, tokens, {width}), got {tuple(values.shape)}")
        self.shape = (layers, values.shape[1], width)
        self.joint, self.starts, self.capacity, self.length = [], [], 0, 0
        n = values.shape[2]
        self.reserve(n)
        pos = 0
        for blk in self.joint:
            take = min(n - pos, blk.shape[2])
            blk[:, :, :take] = values[:, :, pos : pos + take]
            pos += take
        self.length = n

    def write(self, row: int, values: torch.Tensor) -> None:
        """Overwrite every cached token of batch row ``row`` with ``values`` (layers, length, width), in place (a server
        puts a new request into the row a finished one left this way, without re-laying the other rows)."""
        layers, batch, width = self.shape
        if not 0 <= row < batch or values.shape != (layers, self.length, width):
            raise ValueError(
                f"row {row} of {batch} takes ({layers}, {self.length}, {width}), got {tuple(values.shape)}"
            )
        pos = 0
        for blk in self.joint:
            take = min(self.length - pos, blk.shape[2])
            if take <= 0:
                break
            blk[:, row, :take] = values[:, pos : pos + take]
            pos += take

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
        """Bytes allocated (whole blocks)."""
        return sum(b.nbytes for b in self.joint)


class _LayerCache:
    def __init__(self, cache: MLACache, i: int):
        self.cache, self.i = cache, i
        self.end = cache.length

    def update(self, c_BSC: torch.Tensor, kr_BSR: torch.Tensor) -> None:
        """Store the new tokens' latents after those cached (the cache's length moves on at ``advance``)."""
        cache, pos = self.cache, self.cache.length
        end = pos + c_BSC.shape[1]
        cache.reserve(end)
        while pos < end:
            k = cache.block_at(pos)
            blk = cache.joint[k][self.i]
            at = pos - cache.starts[k]
            n = min(end - pos, blk.shape[1] - at)
            src = pos - cache.length
            blk[:, at : at + n, : cache.rank] = c_BSC[:, src : src + n]
            blk[:, at : at + n, cache.rank :] = kr_BSR[:, src : src + n]
            pos += n
        self.end = end

    def blocks(self) -> list[torch.Tensor]:
        """Every cached token's ``[latent | rope key]`` up to the last update, as (B, N, C + R) pieces in order."""
        out, pos = [], 0
        for blk in self.cache.joint:
            if pos >= self.end:
                break
            out.append(blk[self.i, :, : self.end - pos])
            pos += blk.shape[2]
        return out

    def latents(self) -> torch.Tensor:
        """Every cached token's ``[latent | rope key]`` up to the last update, as one (B, K, C + R) tensor."""
        blocks = self.blocks()
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
