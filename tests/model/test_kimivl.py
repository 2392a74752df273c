"""The assembled model: image features in placeholder slots, loss, packed samples."""

import pytest
import torch
import torch.nn.functional as F


def image_batch(grids, seed=0):
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(sum(h * w for h, w in grids), 3, 14, 14, generator=g)
    return pv, torch.tensor(grids)


def prompt(cfg, n_image_tokens, before=3, after=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 3000, (1, before + n_image_tokens + after), generator=g)
    ids[0, before:before + n_image_tokens] = cfg.media_placeholder_token_id
    return ids


def test_image_features_fill_placeholders(tiny_model, tiny_config):
    pv, hws = image_batch([(4, 6), (2, 2)])
    ids = prompt(tiny_config, 6 + 1)
    feats = tiny_model.get_image_features(pv, hws)
    assert feats.shape == (7, tiny_config.text_config.hidden_size)
    embeds = tiny_model.embed(ids, pv, hws)
    assert torch.equal(embeds[0, 3:10], feats.to(embeds.dtype))
    assert torch.equal(embeds[0, :3], tiny_model.language_model.model.embed_tokens(ids[0, :3]))
    with torch.no_grad():
        base = tiny_model(ids, pv, hws).logits
        other = tiny_model(ids, pv + 1, hws).logits
    assert (base[0, :3] - other[0, :3]).abs().max() < 1e-6  # causal: text before the image is unaffected
    assert not torch.allclose(base[0, 3:], other[0, 3:])


def test_placeholder_count_mismatch_is_an_error(tiny_model, tiny_config):
    pv, hws = image_batch([(4, 6)])
    with pytest.raises(ValueError, match="5 image placeholder tokens .* give 6 features"):
        tiny_model(prompt(tiny_config, 5), pv, hws)
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny_model(prompt(tiny_config, 6))
    with pytest.raises(ValueError, match="pixel_values given without image_grid_hws"):
        tiny_model(prompt(tiny_config, 6), pv)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\), got shape \(4,\)"):
        tiny_model(torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"labels shape \(1, 3\) differs from input_ids \(1, 4\)"):
        tiny_model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3]]))


def test_loss_is_mean_next_token_cross_entropy(tiny_model, tiny_config):
    ids = torch.randint(0, 3000, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    assert tiny_model(ids, labels=labels).logits is None  # the loss alone: no (B, S, V) logits
    out = tiny_model(ids, labels=labels, return_logits=True)
    assert out.logits.dtype == torch.float32 and out.logits.shape == (2, 12, tiny_config.text_config.vocab_size)
    manual = F.cross_entropy(out.logits[:, 5 - 1:-1].reshape(-1, out.logits.shape[-1]), ids[:, 5:].reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-6)
    out.loss.backward()
    experts = tiny_model.language_model.model.layers[1].mlp.experts
    assert experts.gate_up_proj.grad is not None and experts.gate_up_proj.grad.abs().sum() > 0


def test_packed_samples_equal_separate_runs(tiny_model):
    a, b = torch.randint(0, 3000, (1, 7)), torch.randint(0, 3000, (1, 5))
    packed = torch.cat([a, b], 1)
    cu = torch.tensor([0, 7, 12], dtype=torch.int32)
    with torch.no_grad():
        together = tiny_model(packed, cu_seqlens=cu).logits
        alone = torch.cat([tiny_model(a).logits, tiny_model(b).logits], 1)
    assert (together - alone).abs().max() < 1e-5


def test_context_limit_is_checked(tiny_model, tiny_config):
    n = tiny_config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match="past the context"):
        tiny_model(torch.zeros(1, 2, dtype=torch.long), position_ids=torch.tensor([[0, n]]))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("path", ["matmul", "fused", "padded_batch", "flash"])
def test_varlen_attention_paths_equal_per_segment_sdpa(monkeypatch, causal, path):
    """CPU: similar-length segments in padded batches of plain matmuls (here lengths 12 and 6 together, 5 alone, so
    outputs are reordered), or one by one through the fused kernel past SCORES_LIMIT; CUDA: one fused padded batch,
    or flash-attn's varlen kernel (here a stand-in that checks its input contract: equal head dims, so the narrower
    values are padded and the output cut back, int32 bounds, the longest segment's length)."""
    from kimivl.model import attention

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
        monkeypatch.setattr(attention, "use_flash", lambda x: True)
        monkeypatch.setattr(attention, "flash_attn_varlen_func", flash_stand_in)

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 23, 4, 16, generator=g)
    v = torch.randn(23, 4, 8, generator=g)
    bounds = [0, 5, 5, 17, 23]
    cu = torch.tensor(bounds, dtype=torch.int32)

    def run(fn):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*inputs)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).cos())
        return out, [t.grad for t in inputs]

    if path == "padded_batch":
        got, got_grads = run(lambda q, k, v: attention._padded_batch(q, k, v, [(0, 5), (5, 12), (17, 6)], causal=causal, scale=None,
                                                              fused=True))
    else:
        if path != "flash":
            monkeypatch.setattr(attention, "SCORES_LIMIT", 1 << 24 if path == "matmul" else 0)
        got, got_grads = run(lambda q, k, v: attention.varlen_attention(q, k, v, cu, causal=causal))
    want, want_grads = run(lambda q, k, v: torch.cat([torch.nn.functional.scaled_dot_product_attention(
        *(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=causal).transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:]) if b > a]))
    assert (got - want).abs().max() < 1e-5
    for a, b in zip(got_grads, want_grads):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("past", [0, 3])
def test_causal_attention_matmul_path_equals_fused_kernel(monkeypatch, masked, past):
    """CPU padded training batches run as plain matmuls (the fused kernel is not called); outputs and gradients
    equal the fused kernel's, with and without padding keys and with queries that are the last S of the keys.
    Without gradients (inference) the fused kernel runs."""
    from kimivl.model import attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 6, 16, generator=g)
    k = torch.randn(3, 4, 6 + past, 16, generator=g)
    v = torch.randn(3, 4, 6 + past, 8, generator=g)
    valid = torch.ones(3, 6 + past, dtype=torch.bool)
    if masked:
        valid[0, :4] = False
        valid[2, :1] = False

    def run():
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention.causal_attention(*inputs, key_valid_BK=valid if masked else None)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).cos())
        return [out] + [t.grad for t in inputs]

    def no_fused(*args, **kwargs):
        raise AssertionError("the fused kernel ran")

    with monkeypatch.context() as m:
        m.setattr(attention, "_sdpa", no_fused)
        got = run()
        with torch.no_grad(), pytest.raises(AssertionError, match="fused kernel ran"):
            attention.causal_attention(q, k, v)
    monkeypatch.setattr(attention, "SCORES_LIMIT", 0)
    for a, b in zip(got, run()):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("bias", ["none", "square", "per_key", "per_batch"])
def test_matmul_attention_in_chunks_equals_one_call(monkeypatch, bias):
    """Chunks of a few score matrices give the one-call result, outputs and gradients, for every bias shape."""
    from kimivl.model import attention

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 3, 7, 16, generator=g)
    v = torch.randn(5, 3, 7, 8, generator=g)
    mask = torch.rand(5, 3, 7, 7, generator=g) < 0.3
    mask[..., 0] = False
    biases = {"none": None, "square": attention._causal_bias(7, q),
              "per_key": torch.zeros(5, 1, 1, 7).masked_fill(mask[:, :1, :1], float("-inf")),
              "per_batch": torch.zeros(5, 3, 7, 7).masked_fill(mask, float("-inf"))}

    def run():
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention._matmul_attention(*inputs, biases[bias], 0.3)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin())
        return [out] + [t.grad for t in inputs]

    whole = run()
    monkeypatch.setattr(attention, "CHUNK_SCORES", 2 * 7 * 7)  # 8 chunks of 2 matrices (the last one of 1)
    for a, b in zip(run(), whole):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention_in_bfloat16_stays_close_to_float32(causal):
    """The CPU matmul path keeps bf16 scores (its softmax accumulates in float32): outputs and gradients within 3%
    (relative norm) of the float32 result, as bf16 inputs allow."""
    from kimivl.model.attention import varlen_attention

    g = torch.Generator().manual_seed(0)
    bounds = [0, 5, 17, 23, 63, 96, 97]
    q, k, v, grad = (2 * torch.randn(97, 4, 16, generator=g) for _ in range(4))

    def run(dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = varlen_attention(*inputs, torch.tensor(bounds, dtype=torch.int32), causal=causal, scale=0.3)
        out.backward(grad.to(dtype))
        return [out.float()] + [t.grad.float() for t in inputs]

    for got, want in zip(run(torch.bfloat16), run(torch.float32)):
        assert (got - want).norm() / want.norm() < 0.03


def test_varlen_attention_rejects_cu_seqlens_that_miss_tokens():
    from kimivl.model.attention import varlen_attention

    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens covers 7 tokens but the inputs hold 10"):
        varlen_attention(q, q, q, torch.tensor([0, 3, 7], dtype=torch.int32), causal=True)
    with pytest.raises(ValueError, match="non-decreasing"):
        varlen_attention(q, q, q, torch.tensor([0, 6, 4, 10], dtype=torch.int32), causal=True)


def test_loss_in_chunks_equals_the_plain_loss_under_autocast(tiny_model, monkeypatch):
    import kimivl.model.target_logprobs as head_loss

    ids = torch.randint(0, 3000, (2, 16))
    labels = ids.clone()
    labels[0, :6] = -100

    def loss_and_grads():
        tiny_model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = tiny_model(ids, labels=labels).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in (tiny_model.language_model.lm_head.weight,
                                                         tiny_model.language_model.model.norm.weight)]

    plain, plain_grads = loss_and_grads()
    monkeypatch.setattr(head_loss, "LOGITS_LIMIT", 5 * tiny_model.config.text_config.vocab_size)  # 5 rows a chunk
    chunked, chunked_grads = loss_and_grads()
    torch.testing.assert_close(chunked, plain)
    for a, b in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02 * b.abs().max().item())
