"""The model's decoding step on the compressed cache: logits equal full recomputation in float32 when the context
spans many split-K chunks (batched, left-padded), and in bf16 equal the former path (whole cache widened to float32)."""

import torch

from kimivl.inference.cache import MLACache
from kimivl.kernels import decode
from kimivl.model import mla


def decode_logits(model, prompts, steps, dtype=torch.float32):
    """Logits of each cached step (prefill, then ``steps`` single-token steps feeding fixed tokens), left-padded."""
    lm = model.language_model
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    cache = MLACache(lm.config, len(prompts), width + steps, dtype=dtype)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    hidden = lm(lm.model.embed_tokens(ids), position_ids=positions, cache=cache, attention_mask=mask)
    out = [lm.logits(hidden[:, -1])]
    for step in range(steps):
        token = torch.full((len(prompts), 1), 100 + step)
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        hidden = lm(lm.model.embed_tokens(token), position_ids=positions, cache=cache, attention_mask=mask)
        out.append(lm.logits(hidden[:, -1]))
    return torch.stack(out, 1)


@torch.no_grad()
def test_decode_equals_full_recomputation_across_chunks(tiny_model, monkeypatch):
    monkeypatch.setattr(decode, "DECODE_CHUNK", 7)  # 40-token contexts: six chunks, the padded row's first all masked
    monkeypatch.setattr("kimivl.inference.cache.BLOCK_TOKENS", 5)  # cache blocks that chunks both join and split
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 3000, (n,), generator=g).tolist() for n in (33, 21)]
    steps = 6
    cached = decode_logits(tiny_model, prompts, steps)
    for row, p in enumerate(prompts):
        ids = torch.tensor([p + [100 + i for i in range(steps)]])
        full = tiny_model.language_model.logits(
            tiny_model.language_model(tiny_model.language_model.model.embed_tokens(ids))
        )
        torch.testing.assert_close(cached[row], full[0, len(p) - 1 :], atol=2e-5, rtol=2e-5)


def former_decode(q_BHX, blocks_BNX, value_dim, *, scale, key_valid_BK=None):
    """The path before split-K: the whole cache widened to float32 and one fused softmax."""
    k_B1KX = torch.cat(blocks_BNX, 1).float()[:, None]
    mask = None
    if key_valid_BK is not None:
        mask = key_valid_BK.clone()
        mask[:, -1] = True
        mask = mask[:, None, None]
    o = torch.nn.functional.scaled_dot_product_attention(
        q_BHX.float()[:, :, None], k_B1KX, k_B1KX[..., :value_dim], attn_mask=mask, scale=scale, enable_gqa=True
    )
    return o[:, :, 0].to(q_BHX.dtype)


@torch.no_grad()
def test_bf16_decode_equals_the_former_path(tiny_model, monkeypatch):
    monkeypatch.setattr(decode, "DECODE_CHUNK", 16)
    tiny_model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(5, 3000, (n,), generator=g).tolist() for n in (50, 37)]
    ours = decode_logits(tiny_model, prompts, 5, torch.bfloat16)
    monkeypatch.setattr(mla, "latent_decode_attention", former_decode)
    theirs = decode_logits(tiny_model, prompts, 5, torch.bfloat16)
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=0.03, rtol=0.02)
