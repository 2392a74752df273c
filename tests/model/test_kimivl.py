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
    ids[0, before : before + n_image_tokens] = cfg.media_placeholder_token_id
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


def test_a_processors_inputs_for_a_text_only_chat_run_the_model(small_model, small_processor):
    """``model(**processor(messages))`` failed without images: the processor's empty pixel tensors went to the tower."""
    inputs = small_processor([{"role": "user", "content": "hi"}])
    assert inputs["pixel_values"].shape[0] == 0 and inputs["image_grid_hws"].shape[0] == 0
    with torch.no_grad():
        got = small_model(**inputs).logits
        torch.testing.assert_close(got, small_model(inputs["input_ids"]).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no pixel_values for the 1 images"):
        small_model.embed(inputs["input_ids"], inputs["pixel_values"], torch.tensor([[2, 2]]))


def test_loss_is_mean_next_token_cross_entropy(tiny_model, tiny_config):
    ids = torch.randint(0, 3000, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    assert tiny_model(ids, labels=labels).logits is None  # the loss alone: no (B, S, V) logits
    out = tiny_model(ids, labels=labels, return_logits=True)
    assert out.logits.dtype == torch.float32 and out.logits.shape == (2, 12, tiny_config.text_config.vocab_size)
    manual = F.cross_entropy(out.logits[:, 5 - 1 : -1].reshape(-1, out.logits.shape[-1]), ids[:, 5:].reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-6)
    out.loss.backward()
    experts = tiny_model.language_model.model.layers[1].mlp.experts
    assert experts.gate_up_proj.grad is not None and experts.gate_up_proj.grad.abs().sum() > 0


def test_nothing_to_score_is_a_zero_loss_with_or_without_logits(tiny_model):
    ids = torch.randint(0, 3000, (2, 6))
    labels = torch.full_like(ids, -100)
    for return_logits in (False, True):
        loss = tiny_model(ids, labels=labels, return_logits=return_logits).loss
        assert loss.item() == 0.0 and loss.requires_grad, return_logits


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
        return loss.detach(), [
            p.grad.clone()
            for p in (tiny_model.language_model.lm_head.weight, tiny_model.language_model.model.norm.weight)
        ]

    plain, plain_grads = loss_and_grads()
    monkeypatch.setattr(head_loss, "LOGITS_LIMIT", 5 * tiny_model.config.text_config.vocab_size)  # 5 rows a chunk
    chunked, chunked_grads = loss_and_grads()
    torch.testing.assert_close(chunked, plain)
    for a, b in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02 * b.abs().max().item())
