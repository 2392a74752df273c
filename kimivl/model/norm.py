"""RMSNorm computed in float32, as the released language model does."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm upcasts bf16/fp16 inputs to float32 itself (same bits as an explicit .float() round trip)
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
