"""The fused attention kernels: flash-attn's varlen kernel when importable on CUDA, PyTorch's SDPA otherwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional accelerator
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None


def use_flash(x: torch.Tensor) -> bool:
    """True when the flash-attn kernel can run on ``x``: a 16-bit CUDA tensor on an Ampere or newer GPU (flash-attn 2
    refuses older ones, such as a T4 or V100)."""
    return (
        flash_attn_varlen_func is not None
        and x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and torch.cuda.get_device_capability(x.device)[0] >= 8
    )


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; on CPU, values narrower than the query-key head dim (MLA's 128 vs 192) are
    zero-padded to it, because the fused CPU kernel needs equal head dims and the fallback builds every (S, K) score
    matrix in memory and is several times slower."""
    e = v.shape[-1]
    if v.is_cuda or e >= q.shape[-1]:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, F.pad(v, (0, q.shape[-1] - e)), **kwargs)[..., :e]


def flash_varlen(
    q_THD: torch.Tensor,
    k_THD: torch.Tensor,
    v_THE: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """flash-attn over packed segments; returns (T, H, E)."""
    d, e = q_THD.shape[-1], v_THE.shape[-1]
    if e < d:  # flash-attn needs equal head dims: pad values, then drop the padding
        v_THE = F.pad(v_THE, (0, d - e))
    cu = cu_seqlens.to(device=q_THD.device, dtype=torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    out = flash_attn_varlen_func(q_THD, k_THD, v_THE, cu, cu, max_len, max_len, softmax_scale=scale, causal=causal)
    return out[..., :e]
