"""kimivl.kernels.latent_decode_attention: split-K decoding over cached blocks equals one softmax over the whole
cache (float64 reference), with padding masks and chunks that are fully masked; in bf16 it matches the former path
(the whole cache widened to float32, one softmax) to bf16 rounding, and its extra memory is bounded by the span."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from kimivl.kernels import latent_decode_attention


def reference(q_BHX, kv_BKX, value_dim, scale, valid_BK=None):
    """One softmax over every cached token in float64 (the last key always seen)."""
    s_BHK = torch.einsum("bhx,bkx->bhk", q_BHX.double(), kv_BKX.double()) * scale
    if valid_BK is not None:
        valid_BK = valid_BK.clone()
        valid_BK[:, -1] = True
        s_BHK = s_BHK.masked_fill(~valid_BK[:, None], float("-inf"))
    return torch.einsum("bhk,bke->bhe", s_BHK.softmax(-1), kv_BKX[..., :value_dim].double())


@pytest.mark.parametrize("span", [None, 16])  # the whole cache widened at once / one chunk of each row at a time
@pytest.mark.parametrize("chunk", [5, 8, 64])
def test_split_k_equals_one_softmax_float32(chunk, span):
    g = torch.Generator().manual_seed(0)
    b, h, x, e = 3, 4, 24, 16
    sizes = [7, 3, 16, 1, 9]  # blocks of uneven sizes: chunks both split blocks and join them
    blocks = [torch.randn(b, n, x, generator=g) * 2 for n in sizes]
    q = torch.randn(b, h, x, generator=g) * 2
    kv = torch.cat(blocks, 1)
    k = kv.shape[1]
    valid = torch.ones(b, k, dtype=torch.bool)
    valid[1, :20] = False  # a left-padded row: its first chunks hold no seen key at all
    valid[2, :-1] = False  # only its own key is seen
    for mask in (None, valid):
        out = latent_decode_attention(q, blocks, e, scale=0.3, key_valid_BK=mask, chunk=chunk, span=span)
        assert out.shape == (b, h, e) and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), reference(q, kv, e, 0.3, mask), atol=2e-6, rtol=2e-6)
    alone = latent_decode_attention(q, blocks, e, scale=0.3, key_valid_BK=valid, chunk=chunk, span=span)[2]
    torch.testing.assert_close(alone, kv[2, -1, :e].expand(h, e))


def test_bf16_cache_matches_the_former_float32_path():
    g = torch.Generator().manual_seed(1)
    b, h, x, e, k = 2, 8, 72, 64, 3000
    kv = (torch.randn(b, k, x, generator=g) * 3).bfloat16()
    q = (torch.randn(b, h, x, generator=g)).bfloat16()
    out = latent_decode_attention(q, [kv], e, scale=x**-0.5, chunk=256)
    # the former path: the whole cache widened to float32, one fused softmax, back to the query's dtype
    k_B1KX = kv.float()[:, None]
    former = torch.nn.functional.scaled_dot_product_attention(
        q.float()[:, :, None], k_B1KX, k_B1KX[..., :e], scale=x**-0.5, enable_gqa=True
    )[:, :, 0].bfloat16()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, former, atol=0, rtol=2**-7)  # at most one bf16 rounding step apart
    torch.testing.assert_close(out.double(), reference(q, kv, e, x**-0.5), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("b", [1, 2])
def test_extra_memory_is_bounded_by_the_span(b):
    h, x, e, k, chunk, span = 8, 576, 512, 16384, 512, 2048
    kv = torch.randn(b, k, x).bfloat16()
    q = torch.randn(b, h, x).bfloat16()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        latent_decode_attention(q, [kv[:, :8000], kv[:, 8000:]], e, scale=0.05, chunk=chunk, span=span)
    largest = max(ev.cpu_memory_usage for ev in prof.events() if ev.cpu_memory_usage > 0)
    whole = kv.numel() * 4  # what a float32 copy of this cache takes: 37.7 MB per row
    assert largest == span * x * 4 < whole / 4  # the widened span over all rows, the largest allocation


def test_a_short_context_widens_no_more_than_itself():
    """A context shorter than the span (a serving step) allocates its own size, not the span's, every step."""
    h, x, e, k = 4, 96, 64, 300
    kv = torch.randn(1, k, x).bfloat16()
    q = torch.randn(1, h, x).bfloat16()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        latent_decode_attention(q, [kv[:, :256], kv[:, 256:]], e, scale=0.1)
    assert max(ev.cpu_memory_usage for ev in prof.events() if ev.cpu_memory_usage > 0) == k * x * 4


def test_bad_blocks_are_named():
    q = torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match="at least one token"):
        latent_decode_attention(q, [], 4, scale=1.0)
    with pytest.raises(ValueError, match=r"\(1, n, 8\)"):
        latent_decode_attention(q, [torch.randn(1, 3, 6)], 4, scale=1.0)
    with pytest.raises(ValueError, match="key_valid_BK"):
        latent_decode_attention(
            q, [torch.randn(1, 3, 8)], 4, scale=1.0, key_valid_BK=torch.ones(1, 4, dtype=torch.bool)
        )
