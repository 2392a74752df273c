"""MoonViT, patch merge and projector on the tiny config (CPU, fp32)."""

import cmath
import math

import pytest
import torch
import torch.nn.functional as F

from kimivl.config import KimiVLConfig
from kimivl.model.moonvit import MoonViT, PositionEmbedding, apply_rope_2d, patch_merge, rope_2d_freqs
from kimivl.model.projector import Projector


@pytest.fixture(scope="module")
def config():
    return KimiVLConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def vit(config):
    torch.manual_seed(0)
    model = MoonViT(config.vision_config).eval()
    with torch.no_grad():  # non-trivial norms and a visible position table
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.patch_embed.pos_emb.weight.normal_()
    return model


def pixels(grid_hws, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(h * w for h, w in grid_hws)
    return torch.randn(n, 3, 14, 14, generator=g)


def test_state_dict_keys(vit, config):
    vc = config.vision_config
    expected = {
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "patch_embed.pos_emb.weight",
        "encoder.final_layernorm.weight",
        "encoder.final_layernorm.bias",
    }
    for i in range(vc.num_hidden_layers):
        for name in ("norm0", "norm1", "wqkv", "wo", "mlp.fc0", "mlp.fc1"):
            expected |= {f"encoder.blocks.{i}.{name}.weight", f"encoder.blocks.{i}.{name}.bias"}
    sd = vit.state_dict()
    assert set(sd) == expected
    c = vc.hidden_size
    assert sd["patch_embed.proj.weight"].shape == (c, 3, 14, 14)
    assert sd["patch_embed.pos_emb.weight"].shape == (vc.init_pos_emb_height, vc.init_pos_emb_width, c)
    assert sd["encoder.blocks.0.wqkv.weight"].shape == (3 * c, c)
    assert sd["encoder.blocks.0.mlp.fc0.weight"].shape == (vc.intermediate_size, c)


def reference_forward(vit, pixel_values, h, w):
    """MoonViT on one image written out independently: conv patchify, dense softmax attention, cmath RoPE."""
    vc = vit.config
    nh, d = vc.num_attention_heads, vc.head_dim
    pe = vit.patch_embed
    x = F.conv2d(pixel_values, pe.proj.weight, pe.proj.bias, stride=14).flatten(1)
    table = pe.pos_emb.weight.permute(2, 0, 1)[None]
    x = x + F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)[0].flatten(1).T
    rot = torch.empty(h * w, d // 2, dtype=torch.complex64)
    for n in range(h * w):
        r, c = divmod(n, w)
        for i in range(d // 4):
            f = 1.0 / vc.rope_theta ** (4 * i / d)
            rot[n, 2 * i], rot[n, 2 * i + 1] = cmath.exp(1j * c * f), cmath.exp(1j * r * f)

    def rope(t):  # (L, nh, d)
        return torch.view_as_real(torch.view_as_complex(t.reshape(h * w, nh, d // 2, 2)) * rot[:, None]).flatten(2)

    for blk in vit.encoder.blocks:
        y = F.layer_norm(x, (x.shape[-1],), blk.norm0.weight, blk.norm0.bias, vc.layer_norm_eps)
        q, k, v = (blk.wqkv(y)[:, j * nh * d : (j + 1) * nh * d].reshape(h * w, nh, d) for j in range(3))
        q, k = rope(q), rope(k)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(h * w, nh * d)
        x = x + blk.wo(o)
        y = F.layer_norm(x, (x.shape[-1],), blk.norm1.weight, blk.norm1.bias, vc.layer_norm_eps)
        u = blk.mlp.fc0(y)
        x = x + blk.mlp.fc1(0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3))))
    fl = vit.encoder.final_layernorm
    return F.layer_norm(x, (x.shape[-1],), fl.weight, fl.bias, vc.layer_norm_eps)


@torch.no_grad()
def test_matches_independent_reference(vit):
    pv = pixels([(3, 5)])
    out = vit(pv, torch.tensor([[3, 5]]))
    torch.testing.assert_close(out, reference_forward(vit, pv, 3, 5), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_packed_equals_separate(vit):
    grids = [(4, 6), (2, 8), (16, 16)]
    pv = pixels(grids)
    packed = vit(pv, torch.tensor(grids))
    alone = [vit(p, torch.tensor([g])) for g, p in zip(grids, pv.split([h * w for h, w in grids]))]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_no_leak_between_images(vit):
    grids = torch.tensor([[4, 6], [6, 4]])
    pv = pixels([(4, 6), (6, 4)])
    other = pv.clone()
    other[24:] = torch.randn(24, 3, 14, 14)
    a, b = vit(pv, grids), vit(other, grids)
    torch.testing.assert_close(a[:24], b[:24], atol=1e-6, rtol=0)
    assert not torch.allclose(a[24:], b[24:])


def test_rope_pair_ordering():
    h, w, d, theta = 3, 5, 16, 10000.0
    q = torch.randn(h * w, 1, d)
    out = apply_rope_2d(q, rope_2d_freqs([(h, w)], d, theta))
    for n in range(h * w):
        r, c = divmod(n, w)
        for i in range(d // 4):
            f = 1.0 / theta ** (4 * i / d)
            for pair, angle in ((2 * i, c * f), (2 * i + 1, r * f)):
                z = complex(q[n, 0, 2 * pair], q[n, 0, 2 * pair + 1]) * cmath.exp(1j * angle)
                got = complex(out[n, 0, 2 * pair], out[n, 0, 2 * pair + 1])
                assert abs(got - z) < 1e-5, (n, pair)


def test_rope_restarts_per_image():
    f = rope_2d_freqs([(2, 3), (4, 2)], 16, 10000.0)
    torch.testing.assert_close(f[6:], rope_2d_freqs([(4, 2)], 16, 10000.0), atol=0, rtol=0)


def test_position_table_resize(vit):
    pos = vit.patch_embed.pos_emb
    th, tw, c = pos.weight.shape
    hand = torch.arange(th * tw * c, dtype=torch.float32).reshape(th, tw, c).sin()
    with torch.no_grad():
        saved = pos.weight.clone()
        pos.weight.copy_(hand)
        try:
            want = (
                F.interpolate(
                    hand.permute(2, 0, 1)[None], size=(5, 7), mode="bicubic", align_corners=False, antialias=False
                )[0]
                .permute(1, 2, 0)
                .reshape(35, c)
            )
            torch.testing.assert_close(pos.table(5, 7), want, atol=2e-6, rtol=0)
            assert torch.equal(pos.table(th, tw), hand.reshape(th * tw, c))
            torch.testing.assert_close(
                pos(torch.zeros(35 + th * tw, c), [(5, 7), (th, tw)]),
                torch.cat([want, hand.reshape(-1, c)]),
                atol=2e-6,
                rtol=0,
            )
            for h, w in ((1, 1), (2, 40), (37, 3)):  # down to one cell, one side stretched, mixed
                want = F.interpolate(hand.permute(2, 0, 1)[None], size=(h, w), mode="bicubic", align_corners=False)
                torch.testing.assert_close(
                    pos.table(h, w), want[0].permute(1, 2, 0).reshape(h * w, c), atol=2e-6, rtol=0
                )
        finally:
            pos.weight.copy_(saved)


def test_position_table_gradient_equals_the_bicubic_kernels():
    weight = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(0))
    pos = PositionEmbedding(6, 5, 3)
    upstream = torch.randn(9 * 4, 3)
    with torch.no_grad():
        pos.weight.copy_(weight)
    (pos.table(9, 4) * upstream).sum().backward()
    ref = weight.clone().requires_grad_()
    resized = F.interpolate(ref.permute(2, 0, 1)[None], size=(9, 4), mode="bicubic", align_corners=False)
    (resized[0].permute(1, 2, 0).reshape(36, 3) * upstream).sum().backward()
    torch.testing.assert_close(pos.weight.grad, ref.grad, atol=1e-5, rtol=0)


def test_position_table_trains_after_inference_mode():
    """The resize weights are cached: one first built under inference mode must still serve a training step."""
    pos = PositionEmbedding(4, 4, 2)
    with torch.inference_mode():
        pos.table(11, 13)
    pos.table(11, 13).sum().backward()
    assert pos.weight.grad is not None and pos.weight.grad.abs().sum() > 0


def test_gradient_reaches_position_table(vit):
    vit.zero_grad()
    vit(pixels([(4, 4)]), torch.tensor([[4, 4]])).square().sum().backward()
    assert vit.patch_embed.pos_emb.weight.grad.abs().sum() > 0
    vit.zero_grad()


def test_bf16_forward(vit, config):
    model = MoonViT(config.vision_config).to(torch.bfloat16)
    out = model(pixels([(2, 4)]), torch.tensor([[2, 4]]))
    assert out.dtype == torch.bfloat16 and out.shape == (8, config.vision_config.hidden_size)
    assert torch.isfinite(out).all()


def test_patch_merge_order():
    x = torch.arange(24 + 8, dtype=torch.float32)[:, None].repeat(1, 3)  # images 4x6 then 2x4, value = index
    merged = patch_merge(x, torch.tensor([[4, 6], [2, 4]]))
    assert merged.shape == (6 + 2, 4, 3)
    assert merged[0, :, 0].tolist() == [0, 1, 6, 7]
    assert merged[1, :, 0].tolist() == [2, 3, 8, 9]
    assert merged[3, :, 0].tolist() == [12, 13, 18, 19]
    assert merged[6, :, 0].tolist() == [24, 25, 28, 29]
    assert merged[7, :, 0].tolist() == [26, 27, 30, 31]


def test_patch_merge_rejects_indivisible_grid():
    with pytest.raises(ValueError, match="not divisible"):
        patch_merge(torch.zeros(15, 3), torch.tensor([[3, 5]]))


def test_projector_norms_each_sub_patch(config):
    vc, c = config.vision_config, config.vision_config.hidden_size
    proj = Projector(vc, config.text_config.hidden_size)
    with torch.no_grad():
        proj.pre_norm.weight.normal_()
        proj.pre_norm.bias.normal_()
    x = torch.randn(5, 4, c) * torch.tensor([1.0, 3.0, 0.1, 10.0])[:, None]  # sub-patches of different scales
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    y = ((x - mean) / torch.sqrt(var + 1e-5) * proj.pre_norm.weight + proj.pre_norm.bias).reshape(5, 4 * c)
    u = y @ proj.linear_1.weight.T + proj.linear_1.bias
    u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
    want = u @ proj.linear_2.weight.T + proj.linear_2.bias
    torch.testing.assert_close(proj(x), want, atol=1e-5, rtol=1e-5)
    assert proj(x).shape == (5, config.text_config.hidden_size)
    with pytest.raises(ValueError, match="merged tokens"):
        proj(x.reshape(5, 4 * c))


@pytest.mark.parametrize(
    "pv_shape, grid, match",
    [
        ((24, 3, 14, 14), [[4, 5]], "describes 20 patches"),
        ((20, 3, 16, 16), [[4, 5]], "pixel_values must have shape"),
        ((20, 1, 14, 14), [[4, 5]], "pixel_values must have shape"),
        ((20, 588), [[4, 5]], "pixel_values must have shape"),
        ((20, 3, 14, 14), [[4, 5, 1]], r"shape \(num_images, 2\)"),
        ((20, 3, 14, 14), [4, 5], r"shape \(num_images, 2\)"),
        ((0, 3, 14, 14), torch.zeros(0, 2, dtype=torch.long), "empty"),
        ((0, 3, 14, 14), [[0, 5]], "must be positive"),
        ((512, 3, 14, 14), [[1, 512]], "below 512"),
    ],
)
def test_bad_inputs_raise(vit, pv_shape, grid, match):
    grid = grid if isinstance(grid, torch.Tensor) else torch.tensor(grid)
    with pytest.raises(ValueError, match=match):
        vit(torch.zeros(pv_shape), grid)


def test_float_grid_rejected(vit):
    with pytest.raises(ValueError, match="integers"):
        vit(torch.zeros(20, 3, 14, 14), torch.tensor([[4.0, 5.0]]))
