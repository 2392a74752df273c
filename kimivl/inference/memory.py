"""Inference memory by formula: the compressed cache at a context length, and the activations a prefill holds at its
peak when a prompt of that length is processed in chunks of ``chunk`` tokens (batch 1).

The peak comes at the last chunk, whose ``c`` queries attend to all ``L`` cached tokens. Layers run one after another
and free their intermediates, so the peak is the prompt's embeddings and the residual stream plus the larger of one
layer's attention and MLP, each in the model's dtype (``b`` bytes) unless noted:

- prompt: ``L D`` for the whole prompt's input embeddings (text and image features merged before the first chunk),
  the one term that grows with the context
- residual stream: ``3 c D`` (the hidden state in and out, its norm)
- attention (``kernels.latent_prefill_attention``: per-head keys and values built one key block of ``K`` =
  min(``key_block``, ``L - c``) cached tokens at a time, after the chunk's own ``c``; ``K_e`` = max(``c``, ``K``) of
  them at once): ``K_e (C + R)`` for the block's rows joined, ``K_e H (N + V)`` for kv_b_proj's keys and values,
  ``2 K_e H (N + R)`` for the per-head keys and the values widened to the key dim (the fused CPU kernel needs equal
  dims), ``4 c H (N + R)`` for queries, their parts and the block's output, and ``8 c H V`` bytes for the float32
  running output and the block's, merged in place (``4 c H V`` when the chunk is the prompt)
- MLP: a routed layer holds ``c k (2 D + 4 I)`` for the tokens' expert rows (input, gate and up, activation, output),
  ``3 c I_s`` for the shared experts and ``3 c E`` float32 router scores; the dense layers ``3 c I_dense``

with D hidden size, H heads, C kv_lora_rank, R rope dim, N/V nope/value head dims, E experts (k chosen), I/I_s the
routed/shared expert widths. No other term grows with ``L`` once ``L - c`` exceeds the key block (the fused kernel never
builds the (c, K) scores; the merge carries one log-sum-exp per query and head). It is an estimate of the tensors the
code allocates, not a measurement (kimivl.inference.generate prefills in chunks of ``PREFILL_CHUNK`` tokens;
``benchmarks/long_context.py`` measures the peak).
"""

from __future__ import annotations

import torch

from kimivl.config import TextConfig
from kimivl.inference.cache import MLACache
from kimivl.kernels.prefill import PREFILL_KEY_BLOCK


def cache_bytes(config: TextConfig, tokens: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """The compressed cache of one sequence of ``tokens`` tokens (whole layers, no block rounding)."""
    return tokens * MLACache.bytes_per_token(config, dtype)


def prefill_activation_bytes(
    config: TextConfig,
    context: int,
    chunk: int,
    dtype: torch.dtype = torch.bfloat16,
    key_block: int = PREFILL_KEY_BLOCK,
) -> dict[str, int]:
    """Peak activation bytes of a prefill of ``context`` tokens in chunks of ``chunk`` tokens (batch 1) whose
    attention expands ``key_block`` cached tokens at a time, by the module's formula:
    ``{"prompt", "residual", "attention", "mlp", "peak"}``."""
    if context < 1 or chunk < 1 or key_block < 1:
        raise ValueError(
            f"context, chunk and key_block must be positive token counts, got {context}, {chunk} and {key_block}"
        )
    t, b = config, dtype.itemsize
    c = min(chunk, context)
    expanded = max(c, min(key_block, context - c))
    h, qk = t.num_attention_heads, t.qk_nope_head_dim + t.qk_rope_head_dim
    prompt = context * t.hidden_size * b
    residual = 3 * c * t.hidden_size * b
    merged = (8 if c < context else 4) * c * h * t.v_head_dim  # float32 outputs
    attention = merged + b * (
        expanded * (t.kv_lora_rank + t.qk_rope_head_dim)
        + expanded * h * (t.qk_nope_head_dim + t.v_head_dim)
        + 2 * expanded * h * qk
        + 4 * c * h * qk
    )
    moe = [t.is_moe_layer(i) for i in range(t.num_hidden_layers)]
    mlp = 3 * c * t.intermediate_size * b if not all(moe) else 0
    if any(moe):
        routed = c * t.num_experts_per_tok * (2 * t.hidden_size + 4 * t.moe_intermediate_size) * b
        shared = 3 * c * t.moe_intermediate_size * t.n_shared_experts * b
        mlp = max(mlp, routed + shared + 3 * c * t.n_routed_experts * 4)
    peak = prompt + residual + max(attention, mlp)
    return {"prompt": prompt, "residual": residual, "attention": attention, "mlp": mlp, "peak": peak}
