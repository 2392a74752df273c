"""The assembled model: image features in placeholder slots, loss, packed samples."""

import pytest
import torch
import torch.nn.functional as F

from kimivl.model.moe import to_dtype


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
    ids = prompt(tiny_config, 6 + 1 + 1)
    ids[0, 9] = 7  # each image's placeholders are a run of their own
    feats = tiny_model.get_image_features(pv, hws)
    assert feats.shape == (7, tiny_config.text_config.hidden_size)
    embeds = tiny_model.embed(ids, pv, hws)
    assert torch.equal(embeds[0, 3:9], feats[:6].to(embeds.dtype))
    assert torch.equal(embeds[0, 10], feats[6].to(embeds.dtype))
    assert torch.equal(embeds[0, :3], tiny_model.language_model.model.embed_tokens(ids[0, :3]))
    with torch.no_grad():
        base = tiny_model(ids, pv, hws).logits
        other = tiny_model(ids, pv + 1, hws).logits
    assert (base[0, :3] - other[0, :3]).abs().max() < 1e-6  # causal: text before the image is unaffected
    assert not torch.allclose(base[0, 3:], other[0, 3:])


def test_each_image_lies_in_one_placeholder_run(tiny_model, tiny_config):
    """Only the total count was checked: images needing 2 and 4 tokens ran in two runs of 3 (the second image's first
    feature in the first's slots), and a batch's images in swapped order ran too."""
    p = tiny_config.media_placeholder_token_id
    pv, hws = image_batch([(2, 4), (4, 4)])  # 2 and 4 tokens
    with pytest.raises(
        ValueError, match=r"run 0 \(row 0, from position 2, 3 tokens\) ends inside image 1, which needs 4"
    ):
        tiny_model(torch.tensor([[1, 5, p, p, p, 6, 5, p, p, p, 6, 9]]), pv, hws)
    rows = torch.tensor([[1, 2, p, p, 3, 4, 5, 6], [7, p, p, p, p, 8, 9, 10]])
    swapped = torch.cat([pv[8:], pv[:8]]), hws.flip(0)
    with pytest.raises(
        ValueError, match=r"run 0 \(row 0, from position 2, 2 tokens\) ends inside image 0, which needs 4"
    ):
        tiny_model(rows, *swapped)
    with pytest.raises(ValueError, match=r"run 1 \(row 0, from position 6, 2 tokens\) ends inside image 1"):
        tiny_model(torch.tensor([[1, p, p, 3, 4, 5, p, p], [p, p, 7, 8, 9, 10, 11, 12]]), pv, hws)  # no run across rows
    with torch.no_grad():  # the right order runs, and so do two images back to back in one run
        assert tiny_model(rows, pv, hws).logits.shape[:2] == rows.shape
        assert tiny_model(torch.tensor([[1, p, p, p, p, p, p, 2]]), pv, hws).logits.shape[:2] == (1, 8)


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
    with pytest.raises(ValueError, match="labels must hold token ids .integers., got dtype torch.float32"):
        tiny_model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1.0, 2, 3, 4]]))
    with pytest.raises(ValueError, match="no pixel_values for the 1 images"):  # was accepted without placeholders
        tiny_model(torch.tensor([[1, 2, 3, 4]]), None, hws)
    for empty in (torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 5, dtype=torch.long)):
        with pytest.raises(ValueError, match="no tokens to run"):
            tiny_model(empty)


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


def test_masked_rows_count_positions_from_their_first_real_token(tiny_model):
    """Rotary attention sees only position differences, so positions one too high in every row give the same logits:
    the positions themselves are checked (one too high, a row filling the context would run past it)."""
    seen = []
    record = tiny_model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True
    )
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    try:
        with torch.no_grad():
            tiny_model(torch.ones(3, 5, dtype=torch.long), attention_mask=mask)
    finally:
        record.remove()
    assert seen[0][mask.bool()].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2]


def test_context_limit_is_checked(tiny_model, tiny_config):
    n = tiny_config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match="past the context"):
        tiny_model(torch.zeros(1, 2, dtype=torch.long), position_ids=torch.tensor([[0, n]]))


def test_a_cached_forward_that_would_need_gradients_is_refused(tiny_model, tiny_config):
    """Backward through a forward given a cache failed deep in autograd (latents written in place into views already
    handed out); such a forward is refused up front, the cache untouched, and runs where no gradient is asked for."""
    from kimivl.inference.cache import MLACache

    lm = tiny_model.language_model
    ids = torch.randint(0, 3000, (1, 5), generator=torch.Generator().manual_seed(0))
    cache = MLACache(tiny_config.text_config, batch=1, max_len=8)
    with pytest.raises(ValueError, match=r"the cache is for inference, run it under torch.no_grad\(\)"):
        lm(tiny_model.embed(ids), cache=cache)  # trainable weights
    tiny_model.requires_grad_(False)
    with pytest.raises(ValueError, match="the cache is for inference"):
        lm(tiny_model.embed(ids).requires_grad_(), cache=cache)  # frozen weights, but inputs that want a gradient
    assert cache.length == 0 and cache.nbytes() == 0
    with torch.no_grad():
        plain = lm(tiny_model.embed(ids))
    frozen = lm(tiny_model.embed(ids), cache=cache)  # gradients on, but nothing to differentiate
    tiny_model.requires_grad_(True)
    with torch.no_grad():
        step = lm(tiny_model.embed(ids[:, :1]), position_ids=torch.tensor([[5]]), cache=cache)
    assert cache.length == 6 and not frozen.requires_grad and step.shape == (1, 1, tiny_config.text_config.hidden_size)
    torch.testing.assert_close(frozen, plain, rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_with_its_mask_equals_each_row_alone(tiny_model, tiny_config, side):
    """``forward`` took no ``attention_mask``: a left-padded row was 0.96 off the row alone, with no way to mask it."""
    model = to_dtype(tiny_model, torch.float64)
    p = tiny_config.media_placeholder_token_id
    g = torch.Generator().manual_seed(3)
    rows = [[5, 6, p, p, 7, 8, 9], [11, 12, 13], [p, p, p, p, 14, 15, 16, 17, 18]]
    pv, hws = image_batch([(2, 4), (4, 4)])
    pv = pv.double()
    images = [(pv[:8], hws[:1]), (None, None), (pv[8:], hws[1:])]
    labels = [torch.tensor(r).masked_fill(torch.tensor(r) == p, -100) for r in rows]
    length = max(map(len, rows))
    ids = torch.randint(0, 3000, (3, length), generator=g)  # padding of any id: the mask leaves it out
    mask = torch.zeros(3, length, dtype=torch.long)
    padded_labels = torch.randint(0, 3000, (3, length), generator=g)  # labels on padding are not scored either
    for i, r in enumerate(rows):
        span = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span], padded_labels[i, span] = torch.tensor(r), 1, labels[i]
    with torch.no_grad():
        out = model(ids, pv, hws, labels=padded_labels, return_logits=True, attention_mask=mask)
        alone = [
            model(torch.tensor([r]), *im, labels=lab[None], return_logits=True)
            for r, im, lab in zip(rows, images, labels)
        ]
    for i, r in enumerate(rows):
        span = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        assert (out.logits[i, span] - alone[i].logits[0]).abs().max() < 1e-9
    scored = [int((lab[1:] != -100).sum()) for lab in labels]
    want = sum(a.loss * n for a, n in zip(alone, scored)) / sum(scored)
    assert abs(out.loss - want) < 1e-9
    loss_alone = model(ids, pv, hws, labels=padded_labels, attention_mask=mask).loss  # through next_token_loss
    assert abs(loss_alone - want) < 1e-9
    with pytest.raises(ValueError, match="attention_mask and cu_seqlens do not go together"):
        model(ids[:1], pv[:8], hws[:1], attention_mask=mask[:1], cu_seqlens=torch.tensor([0, length]))
    additive = torch.zeros(mask.shape).masked_fill(mask == 0, float("-inf"))  # a transformers-style additive mask
    with pytest.raises(ValueError, match="1 for real tokens and 0 for padding; got other values"):
        model(ids, pv, hws, attention_mask=additive)
    assert torch.equal(model(ids, pv, hws, attention_mask=mask.double()).logits, out.logits)


def test_position_ids_and_cu_seqlens_are_checked(tiny_model):
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    bad_positions = [
        ("must be >= 0, got -5", ids, torch.tensor([[-5, 0, 1, 2, 3]])),
        ("must hold integers, got dtype torch.float32", ids, torch.tensor([[0.0, 1, 2, 3, 4]])),
        (r"must be \(batch, seq\) = \(1, 5\), got shape \(5,\)", ids, torch.arange(5)),
        (r"must be \(batch, seq\) = \(2, 5\), got shape \(1, 5\)", ids.repeat(2, 1), torch.arange(5)[None]),
    ]
    for message, batch, positions in bad_positions:
        with pytest.raises(ValueError, match=message):
            tiny_model(batch, position_ids=positions)
    bad_bounds = {
        r"must start at 0 and never decrease, got \[2, 5\]": torch.tensor([2, 5]),
        r"must start at 0 and never decrease, got \[0, 4, 2, 5\]": torch.tensor([0, 4, 2, 5]),
        r"1-D integer tensor .* got shape \(1, 2\)": torch.tensor([[0, 5]]),
        "ends at 3 but the packed row has 5 tokens": torch.tensor([0, 3]),
    }
    for message, bounds in bad_bounds.items():
        with pytest.raises(ValueError, match=message):
            tiny_model(ids, cu_seqlens=bounds.int())


def test_int32_labels_and_an_empty_loss_keep_the_model_dtypes(tiny_model):
    """int32 labels failed with ``return_logits=True`` ("expected target dtype to be Long"), and a loss with nothing
    scored was float32 in a float64 model."""
    model = to_dtype(tiny_model, torch.float64)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        plain = model(ids, labels=ids).loss
        for return_logits in (False, True):
            assert model(ids, labels=ids.int(), return_logits=return_logits).loss == plain
            empty = model(ids, labels=torch.full_like(ids, -100), return_logits=return_logits).loss
            assert empty.dtype == torch.float64 and empty.item() == 0.0


def test_a_mask_must_hold_0_and_1_and_mark_some_token_real(tiny_model):
    """Integer masks of other values (segment ids) were read as all real, and an all-0 float mask (an additive mask
    with no padding) gave a loss of 0.0; one row of padding alone in a batch is still run."""
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    with torch.no_grad():
        for segments in (torch.tensor([[1, 1, 2, 2], [1, 1, 1, 1]]), torch.tensor([[0.0, 1, 1, 0.5], [1, 1, 1, 1]])):
            with pytest.raises(ValueError, match="1 for real tokens and 0 for padding; got other values"):
                tiny_model(ids, attention_mask=segments)
        for dtype in (torch.float32, torch.long, torch.bool):
            with pytest.raises(ValueError, match="attention_mask marks no token as real"):
                tiny_model(ids, labels=ids, attention_mask=torch.zeros(2, 4, dtype=dtype))
        mask = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1]])
        out = tiny_model(ids, labels=ids, attention_mask=mask, return_logits=True)
        alone = tiny_model(ids[1:, 1:], labels=ids[1:, 1:], return_logits=True)
    assert (out.logits[1, 1:] - alone.logits[0]).abs().max() < 1e-5
    assert abs(out.loss - alone.loss) < 1e-5


def test_ids_labels_and_pixels_of_the_wrong_kind_are_refused(tiny_model, tiny_config):
    """Integer pixels were cast silently, float ids met the embedding's dtype error, ids past the vocabulary an
    IndexError (a device-side assert on CUDA), and labels such as -1 failed late inside the loss."""
    vocab = tiny_config.text_config.vocab_size
    ids = torch.tensor([[1, 2, 3, 4]])
    bad_ids = {
        "must hold token ids \\(integers\\), got dtype torch.float32": ids.float(),
        f"must be token ids in \\[0, {vocab}\\), got {vocab}": torch.tensor([[1, vocab, 3, 4]]),
        f"must be token ids in \\[0, {vocab}\\), got -1": torch.tensor([[1, 2, -1, 4]]),
    }
    for message, batch in bad_ids.items():
        with pytest.raises(ValueError, match="input_ids " + message):
            tiny_model(batch)
    for label in (-1, vocab):
        with pytest.raises(ValueError, match=f"labels must be token ids in \\[0, {vocab}\\) or -100 .*got {label}"):
            tiny_model(ids, labels=torch.tensor([[1, 2, label, -100]]))
    pv, hws = image_batch([(2, 2)])
    image_ids = prompt(tiny_config, 1)
    message = "pixel_values must be the processor's normalised floats, got dtype torch.uint8"
    with pytest.raises(ValueError, match=message):
        tiny_model(image_ids, (pv * 50).clamp(0, 255).to(torch.uint8), hws)
    with torch.no_grad():
        assert tiny_model(image_ids, pv, hws, labels=image_ids.masked_fill(image_ids > 3000, -100)).loss > 0
        # narrow integer dtypes are ids too: compared in uint8, a vocabulary of 4096 wrapped and refused every id
        small = torch.tensor([[1, 2, 3, 4, 5]])
        loss = tiny_model(small, labels=small).loss
        for dtype in (torch.uint8, torch.int16, torch.int32):
            assert torch.equal(tiny_model(small.to(dtype), labels=small.to(dtype)).loss, loss), dtype


@pytest.mark.parametrize("part", ["vision_tower", "multi_modal_projector"])
def test_a_tower_or_projector_cast_to_bf16_alone_runs_with_images(tiny_model, tiny_config, part):
    """Casting the vision tower (or the projector) alone to bf16, to save memory, met the next module's float32
    weights with bf16 features (a dtype error): each computes in its own dtype, the logits those of the float32 model
    to bf16 rounding."""
    import copy

    pv, hws = image_batch([(4, 6), (2, 2)])
    ids = prompt(tiny_config, 6 + 1, after=6)
    with torch.no_grad():
        full = tiny_model(ids, pv, hws).logits
        mixed = copy.deepcopy(tiny_model)
        getattr(mixed, part).to(torch.bfloat16)
        logits = mixed(ids, pv, hws).logits
    assert logits.dtype == torch.float32 and full.abs().max() > 0.1
    torch.testing.assert_close(logits, full, atol=2e-2, rtol=0)
    assert not torch.equal(logits, full)  # the bf16 part really ran in bf16


def test_packed_labels_score_no_token_from_the_sample_before(tiny_model):
    """forward(labels=, cu_seqlens=) scored each sample's first token from the previous sample's last position,
    which it never attends to: the loss of a pack is that of its samples run alone (an empty sample among them)."""
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(0, 3000, (n,), generator=g) for n in (9, 6, 5))
    cu = torch.tensor([0, 9, 9, 15, 20], dtype=torch.int32)
    ids = torch.cat([a, b, c])[None]
    as_packed = ids.clone()
    as_packed[0, [0, 9, 15]] = -100  # the labels kimivl.data.packing gives
    with torch.no_grad():
        packed = tiny_model(ids, labels=ids, cu_seqlens=cu).loss
        assert torch.equal(tiny_model(ids, labels=as_packed, cu_seqlens=cu).loss, packed)
        sums = [F.cross_entropy(tiny_model(s[None]).logits[0, :-1], s[1:], reduction="sum") for s in (a, b, c)]
    alone = sum(sums) / (8 + 5 + 4)
    assert alone > 1
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_arguments_that_are_not_tensors_are_named(tiny_model, tiny_config):
    """A list or a NumPy array as input_ids (or pixel_values, labels ...) met an AttributeError ('list' object has no
    attribute 'dim') naming no argument."""
    import numpy as np

    ids = torch.tensor([[1, 2, 3, 4]])
    pv, hws = image_batch([(2, 2)])
    image_ids = prompt(tiny_config, 1)
    for name, call in [
        ("input_ids", lambda: tiny_model([[1, 2, 3, 4]])),
        ("input_ids", lambda: tiny_model(ids.numpy())),
        ("labels", lambda: tiny_model(ids, labels=[[1, 2, 3, 4]])),
        ("pixel_values", lambda: tiny_model(image_ids, pv.numpy(), hws)),
        ("image_grid_hws", lambda: tiny_model(image_ids, pv, hws.tolist())),
        ("attention_mask", lambda: tiny_model(ids, attention_mask=np.ones((1, 4)))),
    ]:
        with pytest.raises(TypeError, match=f"^{name} must be .*[Tt]ensor .*, got (list|ndarray): convert it with"):
            call()
    with pytest.raises(TypeError, match=r"input_ids must be a LongTensor \(batch, seq\) of token ids, got list"):
        tiny_model([1, 2, 3])
