"""kimivl.kernels.latent_prefill_attention: a chunk of queries over the compressed cache in key blocks (partial
softmaxes merged) equals one causal softmax over the whole context (float64 reference), with padding that empties
whole key blocks; in bf16 within bf16 rounding; its live memory does not grow with the context; and the CUDA paths
(SDPA over the joined cache), run here on CPU tensors, equal the CPU kernels."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from kimivl.kernels import dispatch, latent_decode_attention, latent_prefill_attention


def expander(x, h, d, e, seed=0):
    """Per-head keys (H x D, the last 4 dims shared by all heads as MLA's rope key) and values (H x E) from rows."""
    g = torch.Generator().manual_seed(seed)
    w_k = torch.randn(x, h * (d - 4), generator=g) / x**0.5
    w_v = torch.randn(x, h * e, generator=g) / x**0.5

    def expand(rows_BNX):
        b, n, _ = rows_BNX.shape
        k_nope = (rows_BNX @ w_k.to(rows_BNX.dtype)).view(b, n, h, d - 4)
        k_rope = rows_BNX[..., -4:, None].transpose(-1, -2).expand(b, n, h, 4)
        return torch.cat([k_nope, k_rope], -1), (rows_BNX @ w_v.to(rows_BNX.dtype)).view(b, n, h, e)

    return expand


def reference(q_BSHD, kv_BKX, expand, scale, valid_BK=None):
    """One causal softmax over every cached token in float64 (a query always sees itself)."""
    s, k_len = q_BSHD.shape[1], kv_BKX.shape[1]
    k_BKHD, v_BKHE = (t.double() for t in expand(kv_BKX.float()))
    scores = torch.einsum("bshd,bkhd->bhsk", q_BSHD.double(), k_BKHD) * scale
    allowed = torch.ones(s, k_len, dtype=torch.bool).tril(k_len - s)
    if valid_BK is not None:
        allowed = (allowed & valid_BK[:, None, None]) | allowed.triu(k_len - s)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhsk,bkhe->bshe", scores.softmax(-1), v_BKHE)


@pytest.mark.parametrize("key_block", [3, 8, 64])
@pytest.mark.parametrize("d,e", [(12, 8), (12, 12), (8, 12)])  # values narrower, as wide, wider than keys
def test_key_blocks_equal_one_softmax_float32(key_block, d, e):
    g = torch.Generator().manual_seed(0)
    b, h, x, s = 3, 4, 20, 6
    sizes = [7, 3, 16, 1, 9]  # cache blocks of uneven sizes; the chunk's own 6 keys straddle the last two
    blocks = [torch.randn(b, n, x, generator=g) for n in sizes]
    kv = torch.cat(blocks, 1)
    k_len = kv.shape[1]
    q = torch.randn(b, s, h, d, generator=g) * 2
    expand = expander(x, h, d, e)
    valid = torch.ones(b, k_len, dtype=torch.bool)
    valid[1, :30] = False  # left padding filling whole key blocks and two of the chunk's own queries
    valid[2, :-1] = False  # every query of this row sees only itself
    for mask in (None, valid):
        out = latent_prefill_attention(q, blocks, expand, scale=0.3, key_valid_BK=mask, key_block=key_block)
        assert out.shape == (b, s, h, e) and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), reference(q, kv, expand, 0.3, mask), atol=2e-6, rtol=2e-6)


def test_bf16_within_rounding_and_one_chunk_is_the_whole_cache():
    g = torch.Generator().manual_seed(1)
    b, h, x, d, e = 2, 4, 40, 24, 16
    kv = torch.randn(b, 300, x, generator=g).bfloat16()
    expand = expander(x, h, d, e)
    for s in (40, 300):  # a chunk after 260 cached tokens, and a prefill in one pass
        q = torch.randn(b, s, h, d, generator=g).bfloat16()
        out = latent_prefill_attention(q, [kv[:, :100], kv[:, 100:]], expand, scale=d**-0.5, key_block=64)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), reference(q, kv, expand, d**-0.5), atol=2e-2, rtol=2e-2)


def live_peak(fn) -> int:
    """The most bytes held at once by tensors allocated inside ``fn`` (op by op, from the profiler's records)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for ev in sorted(prof.events(), key=lambda ev: ev.time_range.start):
        live += ev.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_live_memory_does_not_grow_with_the_context():
    g = torch.Generator().manual_seed(2)
    h, x, d, e, s, key_block = 8, 96, 48, 32, 128, 256
    expand = expander(x, h, d, e)
    q = torch.randn(1, s, h, d, generator=g).bfloat16()
    peaks = {}
    for k_len in (1024, 8192):
        kv = torch.randn(1, k_len, x, generator=g).bfloat16()
        blocks = list(kv.split(1000, 1))
        peaks[k_len] = live_peak(lambda: latent_prefill_attention(q, blocks, expand, scale=0.1, key_block=key_block))
    whole = 8192 * h * (2 * d + e) * 2  # per-head keys and values of the whole context: 9.4 MB
    assert peaks[8192] <= 1.1 * peaks[1024]
    assert peaks[8192] < whole / 4


def test_cuda_paths_equal_the_cpu_kernels():
    """The SDPA mappings taken on CUDA, run on CPU tensors: same answers as split-K decoding and key-block prefill."""
    g = torch.Generator().manual_seed(3)
    b, h, x, d, e = 2, 4, 40, 24, 16
    blocks = [torch.randn(b, n, x, generator=g) for n in (50, 30, 7)]
    valid = torch.ones(b, 87, dtype=torch.bool)
    valid[0, :60] = False
    valid[1, 40:] = False  # a row whose newest keys, its own among them, are marked padding: it still sees its own
    q_dec = torch.randn(b, h, x, generator=g)
    q_pre = torch.randn(b, 20, h, d, generator=g)
    expand = expander(x, h, d, e)
    for mask in (None, valid):
        torch.testing.assert_close(
            dispatch.sdpa_decode(q_dec, blocks, 32, scale=0.2, key_valid_BK=mask),
            latent_decode_attention(q_dec, blocks, 32, scale=0.2, key_valid_BK=mask, chunk=16),
        )
        torch.testing.assert_close(
            dispatch.sdpa_prefill(q_pre, blocks, expand, scale=0.2, key_valid_BK=mask),
            latent_prefill_attention(q_pre, blocks, expand, scale=0.2, key_valid_BK=mask, key_block=16),
        )


def test_bad_blocks_are_named():
    q = torch.randn(1, 4, 2, 8)
    expand = expander(6, 2, 8, 4)
    with pytest.raises(ValueError, match="4 queries' rows"):
        latent_prefill_attention(q, [torch.randn(1, 3, 6)], expand, scale=1.0)
    with pytest.raises(ValueError, match="key_valid_BK"):
        latent_prefill_attention(
            q, [torch.randn(1, 5, 6)], expand, scale=1.0, key_valid_BK=torch.ones(1, 4, dtype=torch.bool)
        )
