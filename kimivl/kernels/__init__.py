"""Device-specific kernels behind the functions the model calls: ``attention`` (fused SDPA or flash-attn, and
on CPU plain matmuls in padded batches of similar lengths) and ``grouped_swiglu`` (the routed experts' grouped
matmuls, with CPU row padding); ``latent_decode_attention`` and ``latent_prefill_attention`` are MLA's decoding step
and prefill pass on its compressed cache (on CPU in chunks and key blocks, on CUDA SDPA). ``training_attention()``
picks the CPU path of batched causal attention for training.
"""

from kimivl.kernels.dispatch import (
    attention,
    latent_decode_attention,
    latent_prefill_attention,
    recompute_contexts,
    training_attention,
)
from kimivl.kernels.grouped_mm import grouped_swiglu

__all__ = [
    "attention",
    "grouped_swiglu",
    "latent_decode_attention",
    "latent_prefill_attention",
    "recompute_contexts",
    "training_attention",
]
