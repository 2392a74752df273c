"""MLA with odd latent or head sizes in float32: a one-token row (batch 1, the decoding step) slices the rope key or
query at an odd offset, which ``view_as_complex`` refused ("storage_offset divisible by 2"); such a step equals the
same token at the end of the whole sequence's forward."""

import dataclasses

import pytest
import torch

from kimivl.config import KimiVLConfig
from kimivl.inference.cache import MLACache
from kimivl.model.init import init_weights
from kimivl.model.language_model import LanguageModel


@torch.no_grad()
@pytest.mark.parametrize("rank,nope,heads", [(11, 8, 2), (12, 7, 1), (13, 5, 1)])
def test_one_token_steps_with_odd_sizes_equal_the_full_forward(rank, nope, heads):
    cfg = dataclasses.replace(
        KimiVLConfig.from_preset("tiny").text_config,
        kv_lora_rank=rank,
        qk_nope_head_dim=nope,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        num_hidden_layers=2,
    )
    lm = LanguageModel(cfg).eval()
    init_weights(lm, seed=4, std=0.1)
    x = torch.randn(1, 6, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    full = lm(x)
    torch.testing.assert_close(lm(x[:, :1]), full[:, :1], atol=1e-5, rtol=1e-5)  # one token, no cache
    cache = MLACache(cfg, 1, 6)
    steps = [lm(x[:, :3], cache=cache)] + [lm(x[:, i : i + 1], cache=cache) for i in range(3, 6)]
    assert full.abs().max() > 0.1
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
