"""Device-specific kernels behind the functions the model calls: ``attention`` (fused SDPA or flash-attn, and
on CPU plain matmuls in padded batches of similar lengths) and ``grouped_swiglu`` (the routed experts' grouped
matmuls, with CPU row padding); ``latent_decode_attention`` is MLA's decoding step on its compressed cache, chunk by
chunk. ``training_attention()`` picks the CPU path of batched causal attention for training.
"""

from kimivl.kernels.decode import latent_decode_attention
from kimivl.kernels.dispatch import attention, recompute_contexts, training_attention
from kimivl.kernels.grouped_mm import grouped_swiglu

__all__ = ["attention", "grouped_swiglu", "latent_decode_attention", "recompute_contexts", "training_attention"]
