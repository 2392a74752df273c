"""Chunked prefill on the compressed cache in key blocks, in the model: logits at every prompt position equal the
uncached forward (float32, left-padded batch, chunks and key blocks that split cache blocks; values wider than keys
too), greedy generation and logits equal the former path (the whole cache expanded to per-head keys and values in
each pass), and a pass's live memory stays flat as the context grows where the former path's grows with it."""

import dataclasses

import pytest
import torch

from kimivl.inference.cache import MLACache
from kimivl.inference.generate import generate_ids
from kimivl.inference.sampling import SamplingParams
from kimivl.kernels import dispatch
from kimivl.model import mla
from kimivl.model.init import init_weights
from kimivl.model.language_model import LanguageModel
from tests.kernels.test_prefill import live_peak


def padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


@torch.no_grad()
@pytest.mark.parametrize("chunk,key_block", [(16, 8), (5, 3), (50, 16)])
def test_chunks_in_key_blocks_equal_the_uncached_forward(tiny_model, monkeypatch, chunk, key_block):
    monkeypatch.setattr("kimivl.kernels.prefill.PREFILL_KEY_BLOCK", key_block)
    monkeypatch.setattr("kimivl.inference.cache.BLOCK_TOKENS", 5)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(5, 3000, (n,), generator=g).tolist() for n in (50, 21)]  # 29 padding keys in row 1
    ids, mask, positions = padded(prompts)
    lm = tiny_model.language_model
    embeds = lm.model.embed_tokens(ids)
    full = lm.logits(lm(embeds, position_ids=positions, attention_mask=mask))
    cache = MLACache(lm.config, 2, ids.shape[1])
    parts = []
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        part = embeds[:, start:end]
        hidden = lm(part, position_ids=positions[:, start:end], cache=cache, attention_mask=mask[:, :end])
        parts.append(lm.logits(hidden))
    cached = torch.cat(parts, 1)
    assert full.abs().max() > 0.1
    for row, p in enumerate(prompts):  # real positions only: padding queries see only themselves in both
        torch.testing.assert_close(cached[row, -len(p) :], full[row, -len(p) :], atol=2e-5, rtol=2e-5)


@torch.no_grad()
def test_values_wider_than_keys_prefill_as_the_uncached_forward(tiny_config, monkeypatch):
    """v_head_dim above qk_nope + qk_rope (a valid config): the fused kernel needs equal head dims, so the cached
    prefill pads queries and keys; its logits equal the uncached forward's."""
    monkeypatch.setattr("kimivl.kernels.prefill.PREFILL_KEY_BLOCK", 8)
    cfg = dataclasses.replace(tiny_config.text_config, v_head_dim=40)  # keys 16 + 8 = 24 wide
    lm = LanguageModel(cfg).eval()
    init_weights(lm, seed=3, std=0.1)
    g = torch.Generator().manual_seed(6)
    ids, mask, positions = padded([torch.randint(5, 3000, (n,), generator=g).tolist() for n in (30, 17)])
    embeds = lm.model.embed_tokens(ids)
    full = lm.logits(lm(embeds, position_ids=positions, attention_mask=mask))
    cache = MLACache(cfg, 2, ids.shape[1])
    parts = [
        lm.logits(
            lm(
                embeds[:, a : a + 12],
                position_ids=positions[:, a : a + 12],
                cache=cache,
                attention_mask=mask[:, : a + 12],
            )
        )
        for a in range(0, ids.shape[1], 12)
    ]
    cached = torch.cat(parts, 1)
    assert full.abs().max() > 0.1
    torch.testing.assert_close(cached[0], full[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(cached[1, -17:], full[1, -17:], atol=2e-5, rtol=2e-5)


@torch.no_grad()
def test_greedy_and_logits_equal_the_former_path(tiny_model, monkeypatch):
    """float32 greedy tokens of a padded batch, prefilled in chunks of 24 with key blocks of 16, equal those of the
    former prefill (SDPA over the whole cache expanded, which CUDA still takes)."""
    monkeypatch.setattr("kimivl.kernels.prefill.PREFILL_KEY_BLOCK", 16)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(5, 3000, (n,), generator=g).tolist() for n in (90, 61, 7)]
    params = SamplingParams(max_new_tokens=12)
    ours = generate_ids(tiny_model, prompts, params=params, prefill_chunk=24)
    lm = tiny_model.language_model
    ids, mask, positions = padded(prompts)
    cache = MLACache(lm.config, 3, ids.shape[1])
    new = lm.logits(lm(lm.model.embed_tokens(ids), position_ids=positions, cache=cache, attention_mask=mask))
    monkeypatch.setattr(mla, "latent_prefill_attention", dispatch.sdpa_prefill)
    assert generate_ids(tiny_model, prompts, params=params, prefill_chunk=24) == ours
    cache = MLACache(lm.config, 3, ids.shape[1])
    former = lm.logits(lm(lm.model.embed_tokens(ids), position_ids=positions, cache=cache, attention_mask=mask))
    real = mask.bool()
    torch.testing.assert_close(new[real], former[real], atol=2e-5, rtol=2e-5)


@torch.no_grad()
def test_a_pass_holds_no_more_memory_at_a_longer_context(tiny_model, monkeypatch):
    """The last 128-token pass of a prefill at 1,024 and at 3,968 cached tokens (random latents before it): the same
    live peak (key blocks of 128), where the former path's grows by the per-head keys and values of the extra
    context."""
    monkeypatch.setattr("kimivl.kernels.prefill.PREFILL_KEY_BLOCK", 128)
    lm = tiny_model.language_model
    g = torch.Generator().manual_seed(7)
    chunk = 128

    def last_pass_peak(context):
        cache = MLACache(lm.config, 1, context)
        t = lm.config
        cache.load(torch.randn(t.num_hidden_layers, 1, context - chunk, t.kv_lora_rank + t.qk_rope_head_dim))
        cache.reserve(context)  # the cache's own growth is not the pass's
        embeds = lm.model.embed_tokens(torch.randint(5, 3000, (1, chunk), generator=g))
        return live_peak(lambda: lm(embeds, cache=cache))

    short, long = last_pass_peak(1024), last_pass_peak(3968)
    assert long <= 1.1 * short
    monkeypatch.setattr(mla, "latent_prefill_attention", dispatch.sdpa_prefill)
    former_short, former_long = last_pass_peak(1024), last_pass_peak(3968)
    assert former_long > 2 * former_short and former_long > 2 * long
