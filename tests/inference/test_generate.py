"""Cached generation against full recomputation, batching, stopping, sampling and the cache's size."""

import dataclasses

import pytest
import torch

from kimivl.inference.cache import MLACache
from kimivl.inference.generate import generate_ids, stream_ids
from kimivl.inference.sampling import SamplingParams, sample_next, seeded_generator


def greedy_by_recompute(model, prompt, pixel_values, grid_hws, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids]), pixel_values, grid_hws).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def image_prompt(cfg, grid, before, after, seed):
    g = torch.Generator().manual_seed(seed)
    n_tokens = grid[0] * grid[1] // 4
    prompt = torch.randint(0, 3000, (before,), generator=g).tolist() + [cfg.media_placeholder_token_id] * n_tokens
    prompt += torch.randint(0, 3000, (after,), generator=g).tolist()
    return prompt, torch.randn(grid[0] * grid[1], 3, 14, 14, generator=g)


@torch.no_grad()
def test_cached_greedy_equals_recompute_single_and_batched(tiny_model, tiny_config):
    p1, pv1 = image_prompt(tiny_config, (4, 6), 3, 5, seed=1)
    p2, pv2 = image_prompt(tiny_config, (2, 2), 1, 2, seed=2)
    g1, g2 = torch.tensor([[4, 6]]), torch.tensor([[2, 2]])
    params = SamplingParams(max_new_tokens=12)
    ref1 = greedy_by_recompute(tiny_model, p1, pv1, g1, 12)
    ref2 = greedy_by_recompute(tiny_model, p2, pv2, g2, 12)
    assert generate_ids(tiny_model, [p1], pv1, g1, params) == [ref1]
    batched = generate_ids(tiny_model, [p1, p2], torch.cat([pv1, pv2]), torch.cat([g1, g2]), params)
    assert batched == [ref1, ref2]
    assert len(p1) != len(p2)  # the batch really was padded


@torch.no_grad()
def test_each_steps_logits_equal_full_recomputation(tiny_model, tiny_config, monkeypatch):
    """Every step's float32 logits, in a left-padded batch with images prefilled in chunks, equal the uncached forward
    over the prompt and the tokens generated before it: greedy tokens alone let a decode position off by one pass."""
    p1, pv1 = image_prompt(tiny_config, (4, 6), 3, 5, seed=1)
    p2, pv2 = image_prompt(tiny_config, (2, 2), 1, 2, seed=2)
    seen = []
    logits = tiny_model.language_model.logits
    monkeypatch.setattr(tiny_model.language_model, "logits", lambda h: seen.append(logits(h)) or seen[-1])
    params = SamplingParams(max_new_tokens=6)
    out = generate_ids(tiny_model, [p1, p2], torch.cat([pv1, pv2]), torch.tensor([[4, 6], [2, 2]]), params, (), 5)
    monkeypatch.undo()
    for row, (p, new, pv, grid) in enumerate(zip((p1, p2), out, (pv1, pv2), ([[4, 6]], [[2, 2]]))):
        full = tiny_model(torch.tensor([p + new]), pv, torch.tensor(grid)).logits[0, len(p) - 1 : -1]
        torch.testing.assert_close(torch.stack([s[row] for s in seen]), full, atol=2e-5, rtol=2e-5)


def test_text_only_batches_and_stop_ids(tiny_model):
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    params = SamplingParams(max_new_tokens=8)
    full = generate_ids(tiny_model, prompts, params=params)
    stop = full[0][3]
    cut = generate_ids(tiny_model, prompts, params=params, stop_ids=[stop])
    assert cut[0] == full[0][: full[0].index(stop)]
    assert cut[1] == (full[1][: full[1].index(stop)] if stop in full[1] else full[1])
    steps = list(stream_ids(tiny_model, prompts, params=params, stop_ids=[stop]))
    assert [s[0] for s in steps if s[0] is not None] == cut[0]


def test_sampling_is_seeded_and_respects_top_k(tiny_model):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=3, seed=7)
    a = generate_ids(tiny_model, [[1, 2, 3]], params=params)
    assert a == generate_ids(tiny_model, [[1, 2, 3]], params=params)
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, SamplingParams(temperature=1.0, top_k=2), g)) for _ in range(200)}
    assert draws == {1, 2}
    draws = {int(sample_next(logits, SamplingParams(temperature=1.0, top_p=0.5), g)) for _ in range(200)}
    assert draws == {1}  # the top token alone holds more than half the mass
    tied = torch.zeros(1, 4096).index_fill_(1, torch.tensor([300, 2000, 3100]), 9.5625)
    for seed in range(20):  # a tiny top_p keeps one of tied tops: the one greedy takes, the lowest id
        g = torch.Generator().manual_seed(seed)
        assert int(sample_next(tied, SamplingParams(temperature=0.7, top_p=1e-9), g)) == int(tied.argmax()) == 300


def test_top_p_keeps_the_nucleus_of_the_tempered_distribution():
    """Temperature comes first: at T=2 the top token holds 47.5% of the mass, so top_p=0.5 keeps two tokens; at T=1
    it holds 66%, alone enough."""
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, -1.0]])
    for temperature, nucleus in ((2.0, {1, 2}), (1.0, {1})):
        g = torch.Generator().manual_seed(0)
        params = SamplingParams(temperature=temperature, top_p=0.5)
        assert {int(sample_next(logits, params, g)) for _ in range(300)} == nucleus, temperature


def test_top_p_drops_a_token_once_the_mass_before_it_reaches_top_p():
    """Two tied tokens at top_p=0.5: the first already holds half the mass, so the second is dropped; one token
    stays, as with transformers' TopPLogitsWarper (which keeps the higher id; here the lower, the one greedy takes)."""
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(torch.zeros(1, 2), SamplingParams(temperature=1.0, top_p=0.5), g)) for _ in range(200)}
    assert draws == {0}


def test_seeds_that_differ_above_32_bits_draw_differently(tiny_model):
    """A CPU generator keeps 32 bits of its seed: 5 and 5 + 2**32 (or 0 and 2**63) drew the same samples."""
    flat = torch.zeros(64, 4096)
    for a, b in ((5, 5 + 2**32), (0, 2**63), (2**64 - 1, 2**32 - 1), (2**32 + 1, 2**33 + 1), (0, 2**32)):
        draws = [sample_next(flat, SamplingParams(temperature=1.0), seeded_generator(s)) for s in (a, b)]
        assert not torch.equal(*draws), (a, b)
    for seed in (7, 2**31, 2**32 - 1):  # seeds below 2**32 are used as they are: earlier seeded runs draw as before
        torch.manual_seed(seed)
        assert torch.equal(torch.rand(8, generator=seeded_generator(seed)), torch.rand(8)), seed
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=5 + 2**32)
    assert generate_ids(tiny_model, [[1, 2, 3]], params=params) != generate_ids(
        tiny_model, [[1, 2, 3]], params=dataclasses.replace(params, seed=5)
    )


def test_context_overflow_is_an_error(tiny_model, tiny_config):
    n = tiny_config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match="does not fit the model's context"):
        generate_ids(tiny_model, [[1] * n])
    with pytest.raises(ValueError, match="at least one token"):
        generate_ids(tiny_model, [[]])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


@torch.no_grad()
def test_each_row_of_a_batch_gets_the_tokens_the_context_leaves_it_alone(tiny_model, tiny_config, monkeypatch):
    """The longest prompt's budget cut every row: a short prompt beside one near the context got a token or two."""
    context = tiny_config.text_config.max_position_embeddings
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 3000, (n,), generator=g).tolist() for n in (7, context - 3, context - 9)]
    params = SamplingParams(max_new_tokens=12)
    seen = []
    logits = tiny_model.language_model.logits
    monkeypatch.setattr(tiny_model.language_model, "logits", lambda h: seen.append(logits(h)) or seen[-1])
    alone = []
    for p in prompts:
        seen.clear()
        alone.append((generate_ids(tiny_model, [p], params=params)[0], torch.cat(seen)))
    seen.clear()
    batched = generate_ids(tiny_model, prompts, params=params)
    assert [len(row) for row in batched] == [len(a) for a, _ in alone] == [12, 3, 9]
    for i, (_, steps_VV) in enumerate(alone):  # float32 logits of each step, each row against itself alone
        torch.testing.assert_close(torch.stack([s[i] for s in seen[: len(steps_VV)]]), steps_VV, atol=2e-5, rtol=0)


def test_cache_bytes_per_token(tiny_config):
    from kimivl import KimiVLConfig

    t = tiny_config.text_config
    cache = MLACache(t, batch=3, max_len=10, dtype=torch.bfloat16)
    assert cache.nbytes() == 0  # nothing until tokens arrive
    cache.reserve(10)
    assert cache.nbytes() == 3 * 10 * MLACache.bytes_per_token(t, torch.bfloat16)  # one block, cut at max_len
    assert MLACache.bytes_per_token(t, torch.bfloat16) == t.num_hidden_layers * (32 + 8) * 2
    a3b = KimiVLConfig.from_preset("kimi-vl-a3b").text_config
    assert MLACache.bytes_per_token(a3b) == 27 * 576 * 2  # about 30 KiB
    assert round(MLACache.uncompressed_bytes_per_token(a3b) / MLACache.bytes_per_token(a3b), 1) == 8.9


def test_cache_grows_in_blocks_and_keeps_values(tiny_config):
    t = tiny_config.text_config
    cache = MLACache(t, batch=2, max_len=30, block=4)
    g = torch.Generator().manual_seed(0)
    written = [[] for _ in range(t.num_hidden_layers)]
    for n in (3, 1, 5, 1, 1, 8, 11):  # steps that fill a block exactly, straddle one, and span several
        for i in range(t.num_hidden_layers):
            c, kr = torch.randn(2, n, 32, generator=g), torch.randn(2, n, 8, generator=g)
            layer = cache.layer(i)
            layer.update(c, kr)
            written[i].append(torch.cat([c, kr], -1))
            assert torch.equal(layer.latents(), torch.cat(written[i], 1))
            assert torch.equal(torch.cat(layer.blocks(), 1), layer.latents())
            assert all(b.shape[1] <= 4 for b in layer.blocks())
        cache.advance(n)
        blocks = -(-cache.length // 4)
        assert cache.nbytes() == min(blocks * 4, 30) * 2 * MLACache.bytes_per_token(t, torch.float32)
    assert cache.length == 30
    with pytest.raises(ValueError, match="cache full: 31 tokens exceed its 30"):
        cache.layer(0).update(torch.zeros(2, 1, 32), torch.zeros(2, 1, 8))
    with pytest.raises(ValueError, match="cache blocks need at least one token, got block=0"):
        MLACache(t, batch=1, max_len=8, block=0)  # a block of 0 tokens would never make room


def test_cache_blocks_grow_to_a_quarter_of_what_is_held(tiny_config):
    """Past 8 blocks, each new block is the largest power-of-two multiple of the first size (up to 16x) that is at
    most a quarter of the capacity: few pieces for a long context, at most 25% allocated beyond what is filled."""
    t = tiny_config.text_config
    cache = MLACache(t, batch=1, max_len=600, block=4)
    g = torch.Generator().manual_seed(1)
    written = []
    while cache.length < 600:
        n = min(int(torch.randint(1, 40, (1,), generator=g)), 600 - cache.length)
        c, kr = torch.randn(1, n, 32, generator=g), torch.randn(1, n, 8, generator=g)
        cache.layer(0).update(c, kr)
        written.append(torch.cat([c, kr], -1))
        cache.advance(n)
        assert cache.capacity <= max(32, 1.25 * cache.length)
    assert torch.equal(cache.layer(0).latents()[:, :600], torch.cat(written, 1))
    sizes = [b.shape[2] for b in cache.joint]
    assert sizes == [4] * 8 + [8] * 4 + [16] * 4 + [32] * 4 + [64] * 5 + [24]  # 576 + 24: cut at max_len
    assert all(start % size == 0 for start, size in zip(cache.starts, sizes))


def test_early_stop_allocates_only_what_was_filled(tiny_model, monkeypatch):
    import kimivl.inference.generate as gen

    made = []

    class Recorded(MLACache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(gen, "MLACache", Recorded)
    monkeypatch.setattr("kimivl.inference.cache.BLOCK_TOKENS", 16)
    prompt = [5, 6, 7, 8, 9]
    first = generate_ids(tiny_model, [prompt], params=SamplingParams(max_new_tokens=1))[0][0]
    out = generate_ids(tiny_model, [prompt], params=SamplingParams(max_new_tokens=4000), stop_ids=[first])
    assert out == [[]] and made[-1].max_len == 4005
    t = tiny_model.config.text_config
    assert made[-1].nbytes() == 16 * MLACache.bytes_per_token(t, torch.float32)  # one block, not 4005 tokens


@torch.no_grad()
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_prefill_equals_one_pass(tiny_model, tiny_config, monkeypatch, chunk):
    """A padded batch with images (whose tokens straddle chunk bounds): the last prompt token's logits, every cached
    latent and the decoding steps after it equal a prefill in one pass."""
    from kimivl.inference.generate import _left_pad, prefill

    monkeypatch.setattr("kimivl.inference.cache.BLOCK_TOKENS", 4)
    p1, pv1 = image_prompt(tiny_config, (4, 6), 3, 5, seed=1)
    p2, pv2 = image_prompt(tiny_config, (2, 2), 1, 2, seed=2)
    ids, mask = _left_pad([p1, p2], 0, "cpu")
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    embeds = tiny_model.embed(ids, torch.cat([pv1, pv2]), torch.tensor([[4, 6], [2, 2]]))
    lm, t = tiny_model.language_model, tiny_config.text_config
    runs = []
    for size in (ids.shape[1], chunk):
        cache = MLACache(t, 2, ids.shape[1] + 3)
        hidden = prefill(lm, embeds, positions, cache, mask, size)
        logits = [lm.logits(hidden[:, -1])]
        step_mask, step_pos = mask, positions[:, -1:]
        for token in (7, 8, 9):
            step_mask, step_pos = torch.cat([step_mask, torch.ones_like(mask[:, :1])], 1), step_pos + 1
            embed = lm.model.embed_tokens(torch.full((2, 1), token))
            logits.append(lm.logits(lm(embed, position_ids=step_pos, cache=cache, attention_mask=step_mask)[:, -1]))
        latents = torch.stack([cache.layer(i).latents() for i in range(t.num_hidden_layers)])
        runs.append((torch.stack(logits), latents))
    (one_logits, one_latents), (chunked_logits, chunked_latents) = runs
    assert one_logits.abs().max() > 0.1
    torch.testing.assert_close(chunked_logits, one_logits, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(chunked_latents, one_latents, atol=2e-5, rtol=2e-5)


def test_prefill_chunk_must_be_positive(tiny_model):
    with pytest.raises(ValueError, match="prefill_chunk must be a positive number of tokens, got 0"):
        generate_ids(tiny_model, [[1, 2, 3]], params=SamplingParams(max_new_tokens=2), prefill_chunk=0)


def test_prefill_of_an_empty_prompt_is_refused(tiny_model):
    """An empty prompt met an UnboundLocalError at the return (benchmarks/long_context.py --lengths 0)."""
    from kimivl.inference.generate import prefill

    lm = tiny_model.language_model
    cache = MLACache(tiny_model.config.text_config, 1, 8)
    embeds = lm.model.embed_tokens(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="prefill needs a prompt of at least one token, got an empty one"):
        prefill(lm, embeds, torch.zeros(1, 0, dtype=torch.long), cache, None, 4)


def test_cache_load_lays_tokens_out_again_for_other_rows(tiny_config):
    cfg = tiny_config.text_config
    cache = MLACache(cfg, 2, 20, block=3)
    layers, _, width = cache.shape
    assert cache.tokens().shape == (layers, 2, 0, width)  # nothing cached yet: no blocks to join
    values = torch.randn(layers, 2, 7, width)
    cache.load(values)
    assert cache.length == 7 and [b.shape[2] for b in cache.joint] == [3, 3, 3]
    assert torch.equal(cache.tokens(), values)
    cache.load(values[:, [1, 1, 0], 2:])  # rows repeated and reordered, leading tokens dropped
    assert cache.shape[1] == 3 and torch.equal(cache.tokens(), values[:, [1, 1, 0], 2:])
    assert torch.equal(cache.layer(1).latents(), values[1][[1, 1, 0], 2:])
    with pytest.raises(ValueError, match="cache values must be"):
        cache.load(values[0])


def test_cache_write_replaces_one_row_in_place_across_blocks(tiny_config):
    cfg = tiny_config.text_config
    cache = MLACache(cfg, 3, 20, block=3)
    layers, _, width = cache.shape
    values = torch.randn(layers, 3, 7, width)
    cache.load(values)
    blocks = list(cache.joint)
    row = torch.randn(layers, 7, width)
    cache.write(1, row)
    assert all(a is b for a, b in zip(cache.joint, blocks))  # the same blocks: nothing re-laid
    expected = values.clone()
    expected[:, 1] = row
    assert torch.equal(cache.tokens(), expected)
    for bad_row, bad in [(3, row), (-1, row), (0, row[:, :6])]:
        with pytest.raises(ValueError, match=r"row -?\d+ of 3 takes"):
            cache.write(bad_row, bad)


@torch.no_grad()
def test_a_float64_model_decodes_in_float64(tiny_model, tiny_config, monkeypatch):
    """A float64 model's cached steps (chunked prefill in key blocks, then split-K decode) equal its full forward to
    float64 rounding: the attention kernels widened to float32 only, which left errors of about 1e-7."""
    import copy

    from kimivl.inference.generate import prefill
    from kimivl.model.moe import to_dtype

    monkeypatch.setattr("kimivl.inference.cache.BLOCK_TOKENS", 4)
    monkeypatch.setattr("kimivl.kernels.prefill.PREFILL_KEY_BLOCK", 5)
    model = to_dtype(copy.deepcopy(tiny_model), torch.float64)
    prompt, pixels = image_prompt(tiny_config, (4, 6), 3, 5, seed=1)
    pixels, grid = pixels.double(), torch.tensor([[4, 6]])
    lm = model.language_model
    cache = MLACache(tiny_config.text_config, 1, len(prompt) + 3, dtype=torch.float64)
    embeds = model.embed(torch.tensor([prompt]), pixels, grid)
    hidden = prefill(lm, embeds, torch.arange(len(prompt))[None], cache, torch.ones(1, len(prompt)), 4)
    cached = [lm.logits(hidden[:, -1])]
    for i, token in enumerate((7, 8)):
        step = lm(
            lm.model.embed_tokens(torch.tensor([[token]])), position_ids=torch.tensor([[len(prompt) + i]]), cache=cache
        )
        cached.append(lm.logits(step[:, -1]))
    full = model(torch.tensor([prompt + [7, 8]]), pixels, grid).logits[0, len(prompt) - 1 :]
    assert full.dtype == torch.float64 and full.abs().max() > 0.1
    torch.testing.assert_close(torch.cat(cached), full, atol=1e-11, rtol=1e-11)


def test_generation_under_autocast_computes_in_the_models_dtype(tiny_model, tiny_config, monkeypatch):
    """A training loop's evaluation generates inside bf16 autocast: the float32 cache then met bf16 queries in the
    prefill kernel (a dtype error). Generation switches autocast off while it computes, so every step's logits are
    those it gives outside, and the caller's code between steps still runs under its autocast."""
    import kimivl.inference.generate as gen

    p1, pv1 = image_prompt(tiny_config, (4, 6), 3, 5, seed=1)
    p2, pv2 = image_prompt(tiny_config, (2, 2), 1, 2, seed=2)
    args = ([p1, p2], torch.cat([pv1, pv2]), torch.tensor([[4, 6], [2, 2]]), SamplingParams(max_new_tokens=5))
    seen = []
    monkeypatch.setattr(gen, "sample_next", lambda logits, *a: seen.append(logits) or sample_next(logits, *a))
    outside = list(stream_ids(tiny_model, *args))
    logits_outside, seen[:] = seen[:], []
    inside = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for step in stream_ids(tiny_model, *args):
            inside.append(step)
            assert torch.is_autocast_enabled("cpu")  # the caller's setting, between steps
    assert inside == outside and len(seen) == len(logits_outside) == 5
    for a, b in zip(seen, logits_outside):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0, rtol=0)
