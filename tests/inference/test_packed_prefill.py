"""A packed prefill: several prompts in one row (``cu_seqlens``) through the language model into an empty cache give
each prompt the cache values and hidden states of its own prefill (float32), across a cache block boundary."""

import pytest
import torch

from kimivl.inference.cache import BLOCK_TOKENS, MLACache


def test_a_packed_prefill_fills_the_cache_as_each_prompt_alone(tiny_model):
    lm = tiny_model.language_model
    cfg = lm.config
    torch.manual_seed(1)
    lengths = [5, 17, BLOCK_TOKENS + 30, 9]  # the third crosses a block of the pack's cache and of its own
    embeds = [torch.randn(1, n, cfg.hidden_size) for n in lengths]
    with torch.inference_mode():
        alone = []
        for e in embeds:
            cache = MLACache(cfg, 1, e.shape[1])
            alone.append((lm(e, cache=cache), cache.tokens()[:, 0]))
        cache = MLACache(cfg, 1, sum(lengths))
        cu = torch.tensor([0, *lengths]).cumsum(0, dtype=torch.int32)
        hidden = lm(torch.cat(embeds, 1), cu_seqlens=cu, cache=cache)
    assert cache.length == sum(lengths)
    values = cache.tokens()[:, 0]
    for (h, v), a, b in zip(alone, cu[:-1].tolist(), cu[1:].tolist()):
        assert v.abs().max() > 0.1
        torch.testing.assert_close(values[:, a:b], v, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(hidden[:, a:b], h, atol=2e-5, rtol=1e-5)


def test_a_packed_row_takes_only_an_empty_cache(tiny_model):
    lm = tiny_model.language_model
    cfg = lm.config
    cache = MLACache(cfg, 1, 16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with torch.inference_mode():
        lm(torch.randn(1, 4, cfg.hidden_size), cache=cache)
        with pytest.raises(ValueError, match="a cache only while it is empty"):
            lm(torch.randn(1, 8, cfg.hidden_size), cu_seqlens=cu, cache=cache)
        with pytest.raises(ValueError, match="one packed row"):
            lm(torch.randn(2, 8, cfg.hidden_size), cu_seqlens=cu, cache=MLACache(cfg, 2, 16))
