"""The DeepSeek-V3-style decoder: MLA attention, a dense first layer, MoE layers after it.

Module names mirror the official checkpoint (``language_model.model.layers.{L}...``, ``language_model.lm_head``).
"""

from __future__ import annotations

import torch
from torch import nn

from kimivl.config import TextConfig
from kimivl.model.mla import MLA, rope_rotation
from kimivl.model.moe import MoE, SwiGLU
from kimivl.model.norm import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.self_attn = MLA(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, rot: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rot, **attn_kwargs)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    """Decoder + untied head. ``forward`` returns final hidden states (B, S, D); ``logits`` maps them to float32
    (float64 in a float64 model)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.model = TextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def rotation(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """RoPE rotations for ``position_ids``, computed in float32, or float64 for float64 ``dtype``."""
        cfg = self.config
        return rope_rotation(
            position_ids, cfg.qk_rope_head_dim, cfg.rope_theta, torch.promote_types(dtype, torch.float32)
        )

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache=None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, S, D). ``cache`` (see ``kimivl.inference.cache.MLACache``) holds the past
        tokens' latents and is extended in place (with ``cu_seqlens``, a packed row, only an empty cache: it takes the
        pack's latents, one sample after another); ``attention_mask`` (B, past + S), 1 for real tokens and 0 for
        padding (in any dtype; one row may be all padding, not the whole mask), is needed only for batches padded to
        one length. The cache is for inference: a forward given one is refused while gradients are on and anything
        requires them."""
        b, s, _ = inputs_embeds.shape
        if b == 0 or s == 0:
            raise ValueError(f"no tokens to run: inputs of shape {tuple(inputs_embeds.shape)}; give at least one")
        if cache is not None and torch.is_grad_enabled():
            if inputs_embeds.requires_grad or any(p.requires_grad for p in self.parameters()):
                raise ValueError(
                    "a forward with a cache cannot be differentiated (the cache is written in place): the cache is "
                    "for inference, run it under torch.no_grad() or torch.inference_mode(); for gradients, run the "
                    "whole sequence without a cache"
                )
        past = cache.length if cache is not None else 0
        key_valid, mask_facts = None, []  # the mask's facts are read with the positions' range, in one synchronisation
        if attention_mask is not None:
            if cu_seqlens is not None:
                raise ValueError("attention_mask and cu_seqlens do not go together: a packed row has no padding")
            if attention_mask.shape != (b, past + s):
                raise ValueError(
                    f"attention_mask must cover past and new tokens: expected {(b, past + s)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            key_valid = attention_mask.bool()
            mask_facts = [((attention_mask == 0) | (attention_mask == 1)).all(), key_valid.any()]
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, s)
        if position_ids is None:
            if cu_seqlens is not None:
                position_ids = positions_from_cu_seqlens(cu_seqlens, s)[None]
            else:
                position_ids = torch.arange(past, past + s, device=inputs_embeds.device).expand(b, s)
        elif not is_integer(position_ids):
            raise ValueError(f"position_ids must hold integers, got dtype {position_ids.dtype}")
        elif position_ids.shape != (b, s):
            raise ValueError(f"position_ids must be (batch, seq) = {(b, s)}, got shape {tuple(position_ids.shape)}")
        low, high, *mask_facts = torch.stack([*torch.aminmax(position_ids), *mask_facts]).tolist()
        if mask_facts:
            check_mask(*mask_facts)
        if low < 0:
            raise ValueError(f"position_ids must be >= 0, got {low}")
        if high >= self.config.max_position_embeddings:
            raise ValueError(f"position {high} is past the context of {self.config.max_position_embeddings} tokens")
        rot = self.rotation(position_ids, inputs_embeds.dtype)
        h = inputs_embeds
        for i, layer in enumerate(self.model.layers):
            layer_cache = cache.layer(i) if cache is not None else None
            h = layer(h, rot, cu_seqlens=cu_seqlens, key_valid_BK=key_valid, cache=layer_cache)
        if cache is not None:
            cache.advance(s)
        return self.model.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """``cu_seqlens`` must be the bounds of the packed samples of a row of ``total`` tokens: integers (N+1,) from 0,
    non-decreasing, ending at ``total``."""
    if cu_seqlens.dim() != 1 or len(cu_seqlens) < 2 or not is_integer(cu_seqlens):
        raise ValueError(
            "cu_seqlens must be a 1-D integer tensor of sample bounds (0, end of sample 1, ..., total), got "
            f"shape {tuple(cu_seqlens.shape)} and dtype {cu_seqlens.dtype}"
        )
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or any(a > b for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {bounds}")
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens ends at {bounds[-1]} but the packed row has {total} tokens")


def check_mask(zero_or_one: bool, any_real: bool) -> None:
    """An ``attention_mask`` must hold only 0 and 1 and mark some token real (one row may be all padding)."""
    if not zero_or_one:
        raise ValueError(
            "attention_mask must hold 1 for real tokens and 0 for padding; got other values (an additive mask of 0 "
            "and -inf would be read the wrong way round; packed samples' segment ids would be read as one sample: "
            "pack with cu_seqlens)"
        )
    if not any_real:
        raise ValueError(
            "attention_mask marks no token as real (all 0): give 1 for real tokens and 0 for padding (an additive "
            "mask with no padding is all 0)"
        )


def is_integer(t: torch.Tensor) -> bool:
    """Whether ``t`` holds integers (token ids, positions, bounds): not float, complex or bool."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Positions that restart at 0 at every packed sample boundary: (total,)."""
    cu = cu_seqlens.to(torch.long)
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths)
    return torch.arange(total, device=cu.device) - starts
