"""The multimodal projector (spec §5): merged vision tokens (T, kh*kw, C) -> LM embeddings (T, text hidden size).

Layout suffixes: ``T`` merged tokens, ``K`` = kh*kw sub-patches per token, ``C`` vision width, ``F`` = K*C.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kimivl.config import VisionConfig

PRE_NORM_EPS = 1e-5  # fixed in the released model, independent of vision_config.layer_norm_eps


class Projector(nn.Module):
    """LayerNorm on each sub-patch, flatten, then linear_1 -> exact GELU -> linear_2."""

    def __init__(self, vision_config: VisionConfig, text_hidden_size: int):
        super().__init__()
        kh, kw = vision_config.merge_kernel_size
        self.num_sub, self.dim = kh * kw, vision_config.hidden_size
        merged = self.num_sub * self.dim
        self.pre_norm = nn.LayerNorm(self.dim, eps=PRE_NORM_EPS)
        self.linear_1 = nn.Linear(merged, merged)
        self.linear_2 = nn.Linear(merged, text_hidden_size)

    def forward(self, x_TKC: torch.Tensor) -> torch.Tensor:
        if x_TKC.dim() != 3 or tuple(x_TKC.shape[1:]) != (self.num_sub, self.dim):
            raise ValueError(
                f"Projector expects merged tokens of shape (T, {self.num_sub}, {self.dim}) "
                f"(see moonvit.patch_merge), got {tuple(x_TKC.shape)}"
            )
        x_TF = self.pre_norm(x_TKC).flatten(1)
        return self.linear_2(F.gelu(self.linear_1(x_TF)))
