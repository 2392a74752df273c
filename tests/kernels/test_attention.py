"""kimivl.kernels.attention: every path equals plain per-segment SDPA, outputs and gradients; the CPU path of
batched rows follows the training_attention setting, whatever the grad mode."""

import types

import pytest
import torch
import torch.nn.functional as F

from kimivl import kernels
from kimivl.kernels import dispatch as attn
from kimivl.kernels import fused, matmul, segments


def run(fn, inputs, upstream="cos"):
    """``fn`` on leaf copies of ``inputs``, back-propagated from a fixed upstream gradient: [out, *input grads]."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(getattr(torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape), upstream)())
    return [out] + [t.grad for t in leaves]


def packed(q, k, v, cu, **kwargs):
    return kernels.attention(q[None], k[None], v[None], cu_seqlens=cu, **kwargs)[0]


def test_segments_share_a_call_where_their_padding_is_cheap():
    """Short segments share one padded batch whatever their lengths; long ones only with lengths close to their own
    (padding adds at most PAD_SCORES score elements), and no batch's scores pass the limit."""
    short = [(i * 40, n) for i, n in enumerate([3, 40, 17, 9])]
    assert segments.similar_lengths(short, 4, 1 << 24) == [[(40, 40), (80, 17), (120, 9), (0, 3)]]
    long = [(0, 300), (300, 280), (580, 250), (830, 150)]  # 4 heads: 300 -> 280 adds 46,400, 300 -> 250 110,000
    assert segments.similar_lengths(long, 4, 1 << 24) == [[(0, 300), (300, 280)], [(580, 250)], [(830, 150)]]
    assert segments.similar_lengths(long[:2], 4, 4 * 300 * 300) == [[(0, 300)], [(300, 280)]]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("path", ["matmul", "fused", "padded_batch", "flash"])
def test_packed_paths_equal_per_segment_sdpa(monkeypatch, causal, path):
    """CPU: similar-length segments in padded batches of plain matmuls (here, with PAD_SCORES lowered, lengths 12 and 6
    together, 5 alone, so outputs are reordered), or one by one through the fused kernel past SCORES_LIMIT; CUDA: one
    fused padded batch, or flash-attn's varlen kernel (here a stand-in that checks its input contract: equal head
    dims, so the narrower values are padded and the output cut back, int32 bounds, the longest segment's length)."""

    def flash_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, *, softmax_scale, causal):
        assert q.shape == k.shape == v.shape and cu_q.dtype == cu_k.dtype == torch.int32
        starts = cu_q.tolist()
        assert max_q == max_k == max(b - a for a, b in zip(starts[:-1], starts[1:]))
        outs = []
        for a, b in zip(starts[:-1], starts[1:]):
            scores = torch.einsum("shd,khd->hsk", q[a:b], k[a:b]) * (softmax_scale or q.shape[-1] ** -0.5)
            if causal:
                scores = scores.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
            outs.append(torch.einsum("hsk,khd->shd", scores.softmax(-1), v[a:b]))
        return torch.cat(outs)

    if path == "flash":
        monkeypatch.setattr(fused, "use_flash", lambda x: True)
        monkeypatch.setattr(fused, "flash_attn_varlen_func", flash_stand_in)

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 23, 4, 16, generator=g)
    v = torch.randn(23, 4, 8, generator=g)
    bounds = [0, 5, 5, 17, 23]
    cu = torch.tensor(bounds, dtype=torch.int32)

    if path == "padded_batch":
        got = run(
            lambda q, k, v: segments.padded_batch(
                q, k, v, [(0, 5), (5, 12), (17, 6)], causal=causal, scale=None, fused_kernel=True
            ),
            (q, k, v),
        )
    else:
        if path != "flash":
            monkeypatch.setattr(attn, "SCORES_LIMIT", 1 << 24 if path == "matmul" else 0)
            monkeypatch.setattr(segments, "PAD_SCORES", 4 * (12 * 12 - 6 * 6))
            assert segments.similar_lengths([(0, 5), (5, 12), (17, 6)], 4, 1 << 24) == [[(5, 12), (17, 6)], [(0, 5)]]
        got = run(lambda q, k, v: packed(q, k, v, cu, causal=causal), (q, k, v))
    want = run(
        lambda q, k, v: torch.cat(
            [
                F.scaled_dot_product_attention(
                    *(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=causal
                ).transpose(0, 1)
                for a, b in zip(bounds[:-1], bounds[1:])
                if b > a
            ]
        ),
        (q, k, v),
    )
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-5


def batched_inputs(masked, past):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 4, 16, generator=g)
    k = torch.randn(3, 6 + past, 4, 16, generator=g)
    v = torch.randn(3, 6 + past, 4, 8, generator=g)
    valid = torch.ones(3, 6 + past, dtype=torch.bool)
    if masked:
        valid[0, :4] = False
        valid[2, :1] = False
    return (q, k, v), valid if masked else None


def failing(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"the {name} ran")

    return fail


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("past", [0, 3])
def test_batched_rows_equal_through_either_path(monkeypatch, masked, past):
    """Batched causal rows, with and without padding keys and with queries that are the last S of the keys: inside
    training_attention only plain matmuls run, outside it only the fused kernel, and both give the same outputs and
    gradients."""
    inputs, valid = batched_inputs(masked, past)

    def fn(q, k, v):
        return kernels.attention(q, k, v, key_valid_BK=valid)

    with monkeypatch.context() as m, kernels.training_attention():
        m.setattr(fused, "sdpa", failing("fused kernel"))
        by_matmuls = run(fn, inputs)
    with monkeypatch.context() as m:
        m.setattr(attn, "matmul_attention", failing("matmul path"))
        by_fused = run(fn, inputs)
    for a, b in zip(by_matmuls, by_fused):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("queries,key_heads", [(1, 4), (1, 1), (3, 4), (3, 1)])
def test_the_last_queries_attend_to_every_key_up_to_their_own(queries, key_heads):
    """S queries that are the last S of K keys, against softmax(q k^T / sqrt(D)) v written out: query i sees keys
    0..K-S+i (one query sees them all), with as many key heads as query heads or one shared by all."""
    g = torch.Generator().manual_seed(0)
    b, h, keys = 2, 4, 9
    q = torch.randn(b, queries, h, 8, generator=g)
    k, v = torch.randn(b, keys, key_heads, 8, generator=g), torch.randn(b, keys, key_heads, 6, generator=g)
    k_all, v_all = k.repeat_interleave(h // key_heads, 2), v.repeat_interleave(h // key_heads, 2)
    scores = torch.einsum("bshd,bkhd->bhsk", q, k_all) / 8**0.5
    seen = torch.arange(keys)[None] <= torch.arange(keys - queries, keys)[:, None]
    want = torch.einsum("bhsk,bkhe->bshe", scores.masked_fill(~seen, float("-inf")).softmax(-1), v_all)
    torch.testing.assert_close(kernels.attention(q, k, v), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("setting", [True, False])
def test_batched_path_follows_the_setting_whatever_the_grad_mode(monkeypatch, grad, setting):
    (q, k, v), _ = batched_inputs(masked=False, past=0)
    calls = []
    for module, name in ((fused, "sdpa"), (attn, "matmul_attention")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw))
    q = q.requires_grad_(grad)
    with torch.set_grad_enabled(grad), kernels.training_attention(setting):
        kernels.attention(q, k, v)
    assert calls == (["matmul_attention"] if setting else ["sdpa"])


def test_training_attention_nests_and_restores():
    assert not attn._matmul_rows
    with kernels.training_attention():
        assert attn._matmul_rows
        with kernels.training_attention(False):
            assert not attn._matmul_rows
        assert attn._matmul_rows
        with pytest.raises(RuntimeError), kernels.training_attention(False):
            raise RuntimeError
        assert attn._matmul_rows
    assert not attn._matmul_rows


def test_model_gives_the_same_loss_and_gradients_through_either_path(tiny_model):
    """The tiny model on padded rows: the training path and the default (inference) path agree."""
    tiny_model.train()
    ids = torch.randint(0, 3000, (2, 12), generator=torch.Generator().manual_seed(0))

    def step():
        tiny_model.zero_grad()
        loss = tiny_model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}

    with kernels.training_attention():
        loss_m, grads_m = step()
    loss_f, grads_f = step()
    torch.testing.assert_close(loss_m, loss_f, rtol=1e-5, atol=1e-6)
    assert grads_m.keys() == grads_f.keys() and len(grads_f) > 20
    for name in grads_f:
        torch.testing.assert_close(grads_m[name], grads_f[name], rtol=1e-4, atol=1e-6, msg=name)


def test_shared_keys_run_in_float32_on_cpu(monkeypatch):
    """Keys shared by every head (MLA's absorbed decoding) reach the fused CPU kernel in float32; the output comes
    back in the query's dtype and equals the float32 result."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 4, 24, generator=g).bfloat16()
    k = torch.randn(2, 9, 1, 24, generator=g).bfloat16()
    seen = []
    real = fused.sdpa
    monkeypatch.setattr(fused, "sdpa", lambda *a, **kw: seen.append({t.dtype for t in a}) or real(*a, **kw))
    out = kernels.attention(q, k, k[..., :16])
    assert seen == [{torch.float32}] and out.dtype == torch.bfloat16
    want = kernels.attention(q.float(), k.float(), k[..., :16].float())
    torch.testing.assert_close(out, want.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("bias", ["none", "square", "per_key", "per_batch"])
def test_matmul_attention_in_chunks_equals_one_call(monkeypatch, bias):
    """Chunks of a few score matrices give the one-call result, outputs and gradients, for every bias shape."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 3, 7, 16, generator=g)
    v = torch.randn(5, 3, 7, 8, generator=g)
    mask = torch.rand(5, 3, 7, 7, generator=g) < 0.3
    mask[..., 0] = False
    biases = {
        "none": None,
        "square": matmul.causal_bias(7, q),
        "per_key": torch.zeros(5, 1, 1, 7).masked_fill(mask[:, :1, :1], float("-inf")),
        "per_batch": torch.zeros(5, 3, 7, 7).masked_fill(mask, float("-inf")),
    }

    def fn(q, k, v):
        return matmul.matmul_attention(q, k, v, biases[bias], 0.3)

    whole = run(fn, (q, k, v), "sin")
    monkeypatch.setattr(matmul, "CHUNK_SCORES", 2 * 7 * 7)  # 8 chunks of 2 matrices (the last one of 1)
    for a, b in zip(run(fn, (q, k, v), "sin"), whole):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_attention_in_bfloat16_stays_close_to_float32(causal):
    """The CPU matmul path keeps bf16 scores (its softmax accumulates in float32): outputs and gradients within 3%
    (relative norm) of the float32 result, as bf16 inputs allow."""
    g = torch.Generator().manual_seed(0)
    bounds = [0, 5, 17, 23, 63, 96, 97]
    q, k, v, grad = (2 * torch.randn(97, 4, 16, generator=g) for _ in range(4))

    def result(dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = packed(*inputs, torch.tensor(bounds, dtype=torch.int32), causal=causal, scale=0.3)
        out.backward(grad.to(dtype))
        return [out.float()] + [t.grad.float() for t in inputs]

    for got, want in zip(result(torch.bfloat16), result(torch.float32)):
        assert (got - want).norm() / want.norm() < 0.03


def test_bad_calls_are_rejected():
    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens covers 7 tokens but the inputs hold 10"):
        packed(q, q, q, torch.tensor([0, 3, 7], dtype=torch.int32), causal=True)
    with pytest.raises(ValueError, match="non-decreasing"):
        packed(q, q, q, torch.tensor([0, 6, 4, 10], dtype=torch.int32), causal=True)
    rows = torch.randn(2, 5, 2, 8)
    with pytest.raises(ValueError, match="takes one row and no key mask, got a batch of 2"):
        kernels.attention(rows, rows, rows, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-causal attention takes packed segments"):
        kernels.attention(rows, rows, rows, causal=False)


def test_flash_attn_is_used_only_on_ampere_or_newer_gpus(monkeypatch):
    """flash-attn 2 refuses GPUs before Ampere (a T4 or V100): there the fused SDPA path runs instead."""
    monkeypatch.setattr(fused, "flash_attn_varlen_func", object())
    gpu = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda", 0))
    for capability, usable in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert fused.use_flash(gpu) is usable
    assert not fused.use_flash(types.SimpleNamespace(is_cuda=True, dtype=torch.float32, device=gpu.device))
