"""A float64 model computes in float64 throughout: routers, LM and ViT RoPE, the position table's bicubic resize and
the logits and loss were float32 (``.float()`` narrowed them), so gradients disagreed with finite differences at
about 1e-4; now they agree to about 1e-8."""

import torch

from kimivl.config import KimiVLConfig
from kimivl.model.kimivl import KimiVL
from kimivl.model.moe import to_dtype

PARAMS = [
    "vision_tower.patch_embed.pos_emb.weight",  # bicubic resize to the grids
    "vision_tower.encoder.blocks.0.wqkv.weight",  # 2D RoPE
    "language_model.model.layers.1.self_attn.q_proj.weight",  # RoPE
    "language_model.model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
    "language_model.model.layers.1.mlp.gate.weight",  # router
    "language_model.lm_head.weight",  # logits and loss
]


def test_float64_gradients_equal_finite_differences():
    cfg = KimiVLConfig.from_preset("tiny")
    cfg.text_config.num_hidden_layers = 2
    torch.manual_seed(0)
    model = to_dtype(KimiVL(cfg), torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    p = cfg.vision_config.patch_size
    grid = torch.tensor([[2, 4], [4, 2]])  # resized position tables
    pixels = torch.randn(16, 3, p, p, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 3000, (1, 20), generator=g)
    ids[0, 3:5] = ids[0, 10:12] = cfg.media_placeholder_token_id
    labels = ids.masked_fill(ids == cfg.media_placeholder_token_id, -100)

    def loss():
        return model(ids, pixels, grid, labels=labels).loss

    out = loss()
    assert out.dtype == torch.float64
    assert model(ids, pixels, grid).logits.dtype == torch.float64
    out.backward()
    params = dict(model.named_parameters())
    worst = 0.0
    for name in PARAMS:
        flat, grad = params[name].data.view(-1), params[name].grad.view(-1)
        for i in grad.abs().topk(2).indices.tolist():
            old, eps = flat[i].item(), 1e-5
            with torch.no_grad():
                flat[i] = old + eps
                up = loss().item()
                flat[i] = old - eps
                down = loss().item()
                flat[i] = old
            fd = (up - down) / (2 * eps)
            worst = max(worst, abs(fd - grad[i].item()) / max(abs(fd), 1e-3))
    assert worst < 1e-6, worst
