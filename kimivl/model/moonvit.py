"""MoonViT: the native-resolution vision tower (spec §4), plus the patch merge that feeds the projector.

Images arrive packed: ``pixel_values`` (N, 3, p, p) holds the row-major patches of every image back to back and
``grid_hws`` (M, 2) gives each image's (h, w) in patches. Layout suffixes: ``N`` packed patches, ``C`` width,
``H`` heads, ``D`` head dim, ``P`` = D/2 rotary pairs, ``T`` merged tokens, ``K`` = kh*kw sub-patches per token.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kimivl.config import VisionConfig
from kimivl.kernels import attention
from kimivl.model.plain import plain_layer

MAX_GRID = 512  # size of the released RoPE table: grids with h or w >= this are rejected (spec §3 step 3)

Grid = tuple[int, int]


def check_grids(grid_hws: torch.Tensor, num_patches: int, max_grid: int | None = MAX_GRID) -> list[Grid]:
    """Validate ``grid_hws`` (M, 2) against ``num_patches`` packed patches; return the grids as (h, w) tuples."""
    if not isinstance(grid_hws, torch.Tensor) or grid_hws.dim() != 2 or grid_hws.shape[1] != 2:
        shape = tuple(grid_hws.shape) if isinstance(grid_hws, torch.Tensor) else type(grid_hws).__name__
        raise ValueError(f"grid_hws must be an integer tensor of shape (num_images, 2), got {shape}")
    if grid_hws.dtype.is_floating_point or grid_hws.dtype.is_complex or grid_hws.dtype == torch.bool:
        raise ValueError(f"grid_hws must hold integers (patches per side), got dtype {grid_hws.dtype}")
    if grid_hws.shape[0] == 0:
        raise ValueError("grid_hws is empty: pass at least one image")
    grids = [(h, w) for h, w in grid_hws.tolist()]
    for i, (h, w) in enumerate(grids):
        if h <= 0 or w <= 0:
            raise ValueError(f"image {i} has grid (h={h}, w={w}); both sides must be positive")
        if max_grid is not None and (h >= max_grid or w >= max_grid):
            raise ValueError(
                f"image {i} has grid (h={h}, w={w}); each side must be below {max_grid} patches "
                "(downscale the image first)"
            )
    total = sum(h * w for h, w in grids)
    if total != num_patches:
        raise ValueError(f"grid_hws describes {total} patches (sum of h*w) but {num_patches} were given")
    return grids


def rope_2d_freqs(
    grids: list[Grid], head_dim: int, theta: float, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Unit complex rotations (N, D/2), computed in ``dtype`` (float32, or float64 for a float64 model): pair 2i
    turns by col*f_i, pair 2i+1 by row*f_i.

    f_i = 1 / theta^(4i/D) for i < D/4; positions restart at (0, 0) for every image.
    """
    hs = torch.tensor([h for h, _ in grids], device=device)
    ws = torch.tensor([w for _, w in grids], device=device)
    counts = hs * ws
    n = sum(h * w for h, w in grids)
    image_N = torch.repeat_interleave(torch.arange(len(grids), device=device), counts, output_size=n)
    local_N = torch.arange(n, device=device) - (counts.cumsum(0) - counts)[image_N]
    w_N = ws[image_N]
    inv_freq_Q = 1.0 / theta ** (torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].to(dtype) / head_dim)
    col_NQ = (local_N % w_N).to(dtype)[:, None] * inv_freq_Q
    row_NQ = (local_N // w_N).to(dtype)[:, None] * inv_freq_Q
    angle_NP = torch.stack((col_NQ, row_NQ), dim=-1).flatten(1)
    return torch.polar(torch.ones_like(angle_NP), angle_NP)


def apply_rope_2d(x_ND: torch.Tensor, freqs_NP: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (2j, 2j+1) of the last dim of ``x_N...D`` by ``freqs_NP``, in float32 (float64 for
    float64 ``x_N...D``)."""
    x_NP = torch.view_as_complex(x_ND.to(torch.promote_types(x_ND.dtype, torch.float32)).unflatten(-1, (-1, 2)))
    freqs_NP = freqs_NP.view(freqs_NP.shape[0], *[1] * (x_ND.dim() - 2), freqs_NP.shape[1])
    return torch.view_as_real(x_NP * freqs_NP).flatten(-2).type_as(x_ND)


def cu_seqlens_of(grids: list[Grid], device=None) -> torch.Tensor:
    """Cumulative patch counts (M+1,) int32, the segment bounds for varlen attention."""
    lengths = torch.tensor([0] + [h * w for h, w in grids], dtype=torch.int32)
    return lengths.cumsum(0, dtype=torch.int32).to(device)


@functools.lru_cache(maxsize=256)
def bicubic_matrix(n_out: int, n_in: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n_out, n_in) weights of PyTorch's 1-D bicubic resize (align_corners=False, edges clamped) in ``dtype``, read
    off by resizing the identity: a 2-D bicubic resize is this matrix applied along each axis. Cached per device and
    dtype, and built outside inference mode, so that a matrix first made during generation can later be used in
    training."""
    with torch.inference_mode(False), torch.no_grad():
        eye_1CH1 = torch.eye(n_in, dtype=dtype)[None, :, :, None]
        a_oi = F.interpolate(eye_1CH1, size=(n_out, 1), mode="bicubic", align_corners=False)[0, :, :, 0].T
        return a_oi.contiguous().to(device)


class PositionEmbedding(nn.Module):
    """Learnable (height, width, C) table, bicubically resized to each image's grid and added."""

    def __init__(self, height: int, width: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(height, width, dim))
        nn.init.normal_(self.weight, std=0.02)

    def table(self, h: int, w: int) -> torch.Tensor:
        """The table resized to (h, w) as ``F.interpolate(mode="bicubic")`` would (within float32 rounding), flattened
        row-major to (h*w, C). Run as two small float32 (float64 in a float64 model) matmuls: their backward is
        several times faster on CPU than the bicubic kernel's."""
        height, width = self.weight.shape[:2]
        if (h, w) == (height, width):
            return self.weight.flatten(0, 1)
        device, dtype = self.weight.device, torch.promote_types(self.weight.dtype, torch.float32)
        with torch.autocast(device.type, enabled=False):
            a_hH, a_wW = (bicubic_matrix(n, m, device, dtype) for n, m in ((h, height), (w, width)))
            resized_hwC = torch.einsum("hH,HWC,wW->hwC", a_hH, self.weight.to(dtype), a_wW)
        return resized_hwC.flatten(0, 1).to(self.weight.dtype)

    def forward(self, x_NC: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        tables = {g: self.table(*g) for g in dict.fromkeys(grids)}  # resize once per distinct grid
        return x_NC + torch.cat([tables[g] for g in grids])


class PatchEmbed(nn.Module):
    """Conv2d(3, C, p, stride p) on each patch (run as one matmul; a wrapped or hooked ``proj`` is called), then the
    resized position table."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        p, c = config.patch_size, config.hidden_size
        self.proj = nn.Conv2d(3, c, kernel_size=p, stride=p)
        self.pos_emb = PositionEmbedding(config.init_pos_emb_height, config.init_pos_emb_width, c)

    def forward(self, pixel_values: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        weight = self.proj.weight
        if plain_layer(self.proj, nn.Conv2d):
            x_NC = F.linear(pixel_values.flatten(1).to(weight.dtype), weight.flatten(1), self.proj.bias)
        else:
            x_NC = self.proj(pixel_values.to(weight.dtype)).flatten(1)
        return self.pos_emb(x_NC, grids)


class MLP(nn.Module):
    """fc1(gelu_tanh(fc0(x)))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc0 = nn.Linear(dim, hidden)
        self.fc1 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class EncoderBlock(nn.Module):
    """Pre-norm block: attention within each image (2D RoPE on q and k), then the MLP."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        c = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.norm0 = nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.wqkv = nn.Linear(c, 3 * c)
        self.wo = nn.Linear(c, c)
        self.norm1 = nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.mlp = MLP(c, config.intermediate_size)

    def forward(self, x_NC: torch.Tensor, freqs_NP: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        n, c = x_NC.shape
        qkv_N3HD = self.wqkv(self.norm0(x_NC)).view(n, 3, self.num_heads, self.head_dim)
        qk_N2HD = apply_rope_2d(qkv_N3HD[:, :2], freqs_NP)
        out_NHD = attention(
            qk_N2HD[None, :, 0],
            qk_N2HD[None, :, 1],
            qkv_N3HD[None, :, 2],
            causal=False,
            scale=1.0 / math.sqrt(self.head_dim),
            cu_seqlens=cu_seqlens,
        )[0]
        x_NC = x_NC + self.wo(out_NHD.reshape(n, c))
        return x_NC + self.mlp(self.norm1(x_NC))


class Encoder(nn.Module):
    """The blocks, then ``final_layernorm``."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x_NC: torch.Tensor, freqs_NP: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x_NC = block(x_NC, freqs_NP, cu_seqlens)
        return self.final_layernorm(x_NC)


class MoonViT(nn.Module):
    """The vision tower: packed patches of many images -> per-patch features (N, C), images kept apart."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.encoder = Encoder(config)

    def forward(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, p, p):
            raise ValueError(
                f"pixel_values must have shape (num_patches, 3, {p}, {p}), got {tuple(pixel_values.shape)}"
            )
        grids = check_grids(grid_hws, pixel_values.shape[0])
        x_NC = self.patch_embed(pixel_values, grids)
        wide = torch.promote_types(x_NC.dtype, torch.float32)
        freqs_NP = rope_2d_freqs(grids, self.config.head_dim, self.config.rope_theta, device=x_NC.device, dtype=wide)
        return self.encoder(x_NC, freqs_NP, cu_seqlens_of(grids, device=x_NC.device))


def patch_merge(x_NC: torch.Tensor, grid_hws: torch.Tensor, kernel_size: tuple[int, int] = (2, 2)) -> torch.Tensor:
    """Group each kh x kw block of patches into one token: (N, C) -> (sum of h/kh * w/kw, kh*kw, C).

    Tokens are row-major over blocks, images concatenated; sub-patches ordered (0,0), (0,1), ..., (kh-1,kw-1).
    """
    if x_NC.dim() != 2:
        raise ValueError(f"patch_merge expects features of shape (num_patches, C), got {tuple(x_NC.shape)}")
    grids = check_grids(grid_hws, x_NC.shape[0], max_grid=None)
    kh, kw = kernel_size
    for i, (h, w) in enumerate(grids):
        if h % kh or w % kw:
            raise ValueError(
                f"image {i} has grid (h={h}, w={w}), not divisible by the merge kernel ({kh}, {kw}); "
                "pad images to a multiple of patch_size * merge kernel"
            )
    c = x_NC.shape[1]
    pieces = [
        x_LC.view(h // kh, kh, w // kw, kw, c).permute(0, 2, 1, 3, 4).reshape(-1, kh * kw, c)
        for (h, w), x_LC in zip(grids, x_NC.split([h * w for h, w in grids]))
    ]
    return torch.cat(pieces)
