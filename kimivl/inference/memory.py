"""Inference memory by formula: the compressed cache at a context length, and the activations a prefill holds at its
peak when a prompt of that length is processed in chunks of ``chunk`` tokens (batch 1).

The peak comes at the last chunk, whose ``c`` queries attend to all ``L`` cached tokens. Layers run one after another
and free their intermediates, so the peak is the residual stream plus the larger of one layer's attention and MLP,
each in the model's dtype (``b`` bytes) unless noted:

- residual stream: ``4 c D`` (the hidden state in and out, its norm, the embedding)
- attention (the per-head path that prefill takes over the whole cache): ``L (C + R)`` for the cache's blocks joined,
  ``L H (N + V)`` for kv_b_proj's keys and values, ``2 L H (N + R)`` for the per-head keys and the values widened to
  the key dim (CPU SDPA's fused kernel needs equal dims), ``3 c H (N + R)`` for queries and output, and when the
  chunk is not the whole prompt ``c L (1 + b)`` for its causal mask over the cache (bool, and in the model's dtype
  inside SDPA)
- MLP: a routed layer holds ``c k (2 D + 4 I)`` for the tokens' expert rows (input, gate and up, activation, output),
  ``3 c I_s`` for the shared experts and ``3 c E`` float32 router scores; the dense layers ``3 c I_dense``

with D hidden size, H heads, C kv_lora_rank, R rope dim, N/V nope/value head dims, E experts (k chosen), I/I_s the
routed/shared expert widths. The attention term is linear in ``L`` for a given ``c`` (the fused kernel never builds
the (c, L) scores); the rest is linear in ``c``. It is an estimate of the tensors the code allocates, not a measurement
(kimivl.inference.generate prefills in chunks of ``PREFILL_CHUNK`` tokens).
"""

from __future__ import annotations

import torch

from kimivl.config import TextConfig
from kimivl.inference.cache import MLACache


def cache_bytes(config: TextConfig, tokens: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """The compressed cache of one sequence of ``tokens`` tokens (whole layers, no block rounding)."""
    return tokens * MLACache.bytes_per_token(config, dtype)


def prefill_activation_bytes(
    config: TextConfig, context: int, chunk: int, dtype: torch.dtype = torch.bfloat16
) -> dict[str, int]:
    """Peak activation bytes of a prefill of ``context`` tokens in chunks of ``chunk`` tokens (batch 1), by the
    module's formula: ``{"residual", "attention", "mlp", "peak"}``."""
    if context < 1 or chunk < 1:
        raise ValueError(f"context and chunk must be positive token counts, got {context} and {chunk}")
    t, b = config, dtype.itemsize
    c, n_keys = min(chunk, context), context
    h, qk = t.num_attention_heads, t.qk_nope_head_dim + t.qk_rope_head_dim
    residual = 4 * c * t.hidden_size * b
    attention = b * (
        n_keys * (t.kv_lora_rank + t.qk_rope_head_dim)
        + n_keys * h * (t.qk_nope_head_dim + t.v_head_dim)
        + 2 * n_keys * h * qk
        + 3 * c * h * qk
    )
    if c < n_keys:
        attention += c * n_keys * (1 + b)
    moe = [t.is_moe_layer(i) for i in range(t.num_hidden_layers)]
    mlp = 3 * c * t.intermediate_size * b if not all(moe) else 0
    if any(moe):
        routed = c * t.num_experts_per_tok * (2 * t.hidden_size + 4 * t.moe_intermediate_size) * b
        shared = 3 * c * t.moe_intermediate_size * t.n_shared_experts * b
        mlp = max(mlp, routed + shared + 3 * c * t.n_routed_experts * 4)
    return {"residual": residual, "attention": attention, "mlp": mlp, "peak": residual + max(attention, mlp)}
