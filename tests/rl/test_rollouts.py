import numpy as np
import pytest
import torch
from PIL import Image

from kimivl.inference.generate import generate_ids
from kimivl.inference.sampling import SamplingParams
from kimivl.rl.rollouts import pack_rows, rollout, sequence_logprobs, split_images, token_logprobs


@pytest.fixture(scope="module")
def prompts(small_processor):
    """Three prompts: with a 56x28 image, text only, with a 28x56 image."""
    img_a = Image.fromarray(np.full((28, 56, 3), (200, 30, 30), dtype=np.uint8))
    img_b = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 28, 3), dtype=np.uint8))
    encoded = [
        small_processor.encode([{"role": "user", "content": parts}])
        for parts in (
            [{"type": "image", "image": img_a}, {"type": "text", "text": "What colour is the square?"}],
            "Count the circles.",
            [{"type": "text", "text": "the fox"}, {"type": "image", "image": img_b}],
        )
    ]
    ids = [e.input_ids for e in encoded]
    have = [e for e in encoded if len(e.image_grid_hws)]
    return ids, torch.cat([e.pixel_values for e in have]), torch.cat([e.image_grid_hws for e in have])


def test_split_images(small_model, prompts):
    ids, pv, grids = prompts
    parts = split_images(ids, pv, grids, small_model.config.media_placeholder_token_id)
    assert parts[1] == (None, None)
    assert parts[0][1].tolist() == [grids[0].tolist()] and parts[2][1].tolist() == [grids[1].tolist()]
    assert len(parts[0][0]) + len(parts[2][0]) == len(pv)
    with pytest.raises(ValueError, match="left over"):
        split_images(ids[:2], pv, grids, small_model.config.media_placeholder_token_id)
    pad = small_model.config.media_placeholder_token_id
    short = list(ids[0])
    short.remove(pad)  # one slot fewer than its image fills
    with pytest.raises(ValueError, match="prompt 0's image placeholders do not match the packed images' grids"):
        split_images([short, *ids[1:]], pv, grids, pad)


def test_pack_rows():
    assert pack_rows([3, 4, 2, 9, 1], budget=8) == [[0, 1], [2], [3], [4]]
    assert pack_rows([], budget=8) == []
    assert pack_rows([3, 5, 8, 1], budget=8) == [[0, 1], [2], [3]]  # a row filled exactly to the budget
    assert pack_rows([5, 4, 2, 2], budget=8) == [[0], [1, 2, 3]]  # a new row starts empty


def test_logprobs_cover_response_tokens_only_and_match_a_plain_forward(small_model, prompts):
    ids, pv, grids = prompts
    responses = [[5, 17, 40], [9], [33, 2, 2, 100]]
    packed = token_logprobs(small_model, ids, responses, pv, grids, budget=4096)
    alone = token_logprobs(small_model, ids, responses, pv, grids, budget=1)  # one row per sample
    assert [len(t) for t in packed] == [3, 1, 4]
    parts = split_images(ids, pv, grids, small_model.config.media_placeholder_token_id)
    for i, (p, r) in enumerate(zip(ids, responses)):
        full = torch.tensor([p + r])
        with torch.no_grad():
            logits = small_model(full, *parts[i]).logits[0].float()
        expected = torch.log_softmax(logits, -1)[torch.arange(len(p) - 1, len(p) + len(r) - 1), torch.tensor(r)]
        torch.testing.assert_close(packed[i].detach(), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(alone[i].detach(), expected, rtol=1e-4, atol=1e-4)
    seq = sequence_logprobs(small_model, ids, responses, pv, grids)
    torch.testing.assert_close(seq.detach(), torch.stack([t.sum() for t in packed]).detach())
    assert packed[0].requires_grad
    assert sequence_logprobs(small_model, [], []).shape == (0,)


def test_rollout_k_samples_per_prompt_with_the_stop_token(small_model, small_processor, prompts):
    ids, pv, grids = prompts
    # stop on any byte-level token so that rows stop at different steps
    stop = list(range(200))
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    rolls = rollout(small_model, small_processor, ids, pv, grids, k=4, params=params, stop_ids=stop, batch_size=5)
    assert [r.prompt for r in rolls] == [0] * 4 + [1] * 4 + [2] * 4
    assert any(r.stopped for r in rolls) and all(len(r.ids) <= 6 for r in rolls)
    for r in rolls:
        assert r.stopped == (r.ids[-1] in stop)
        assert r.text == small_processor.decode(r.ids) and r.length == len(r.ids)
    again = rollout(small_model, small_processor, ids, pv, grids, k=4, params=params, stop_ids=stop, batch_size=5)
    assert [r.ids for r in again] == [r.ids for r in rolls]  # seeded: repeatable
    # the engine with stop ids gives the same tokens, without the stop token (batch 0: rows 0-4, seed 3)
    pv0, grid0 = split_images(ids, pv, grids, small_model.config.media_placeholder_token_id)[0]
    engine = generate_ids(
        small_model, [ids[0]] * 4 + [ids[1]], pv0.repeat(4, 1, 1, 1), grid0.repeat(4, 1), params, stop_ids=stop
    )
    assert engine == [r.ids[:-1] if r.stopped else r.ids for r in rolls[:5]]


def test_greedy_rollouts_are_the_argmax_of_the_teacher_forced_log_probs(small_model, small_processor, prompts):
    ids, pv, grids = prompts
    rolls = rollout(
        small_model,
        small_processor,
        ids,
        pv,
        grids,
        k=2,
        params=SamplingParams(max_new_tokens=5),
        stop_ids=small_processor.stop_ids,
    )
    assert rolls[0].ids == rolls[1].ids
    parts = split_images(ids, pv, grids, small_model.config.media_placeholder_token_id)
    for r in rolls[::2]:
        p = ids[r.prompt]
        with torch.no_grad():
            logits = small_model(torch.tensor([p + r.ids]), *parts[r.prompt]).logits[0]
        assert logits[len(p) - 1 : len(p) + len(r.ids) - 1].argmax(-1).tolist() == r.ids


def test_a_sampled_placeholder_token_is_a_plain_token(small_model, prompts):
    """The policy may sample <|media_pad|>; it takes no image feature (as in generation) and breaks nothing."""
    ids, pv, grids = prompts
    pad = small_model.config.media_placeholder_token_id
    with torch.no_grad():
        out = token_logprobs(small_model, ids, [[pad, 5], [pad], [7, pad, pad]], pv, grids)
        plain = token_logprobs(small_model, ids, [[pad], [pad], [7]], pv, grids)
        embeds = small_model.embed(torch.tensor([ids[1]]))
        lm = small_model.language_model
        both = torch.cat([embeds, lm.model.embed_tokens(torch.tensor([[pad]]))], 1)
        logits = lm.logits(lm(both))[0, -1]
    assert [len(t) for t in out] == [2, 1, 3]
    torch.testing.assert_close(out[0][:1], plain[0])
    torch.testing.assert_close(out[2][:1], plain[2])
    torch.testing.assert_close(out[1], plain[1])
    # the token after a sampled placeholder, for the text-only prompt: compare a hand-built forward
    after = token_logprobs(small_model, ids[1:2], [[pad, 5]])[0][1]
    torch.testing.assert_close(after, torch.log_softmax(logits, -1)[5], rtol=1e-4, atol=1e-4)


def test_each_batch_of_rollouts_samples_with_its_own_seed(small_model, small_processor, prompts):
    """Batch b samples with seed + b: batch 1 gives what the engine gives with seed 4, not batch 0's tokens again;
    rows cut at max_new_tokens are not ``stopped``."""
    ids = [prompts[0][1]]
    params = SamplingParams(max_new_tokens=5, temperature=1.0, seed=3)
    rolls = rollout(small_model, small_processor, ids, None, None, k=4, params=params, stop_ids=[], batch_size=2)
    for b, seed in enumerate((3, 4)):
        own = SamplingParams(max_new_tokens=5, temperature=1.0, seed=seed)
        assert [r.ids for r in rolls[2 * b : 2 * b + 2]] == generate_ids(small_model, ids * 2, params=own)
    assert [r.ids for r in rolls[:2]] != [r.ids for r in rolls[2:]]
    assert all(r.length == 5 and not r.stopped for r in rolls)  # cut at max_new_tokens: not stopped


def test_rollouts_and_log_probs_tell_of_their_progress(small_model, small_processor, prompts):
    """``advance`` hears after each generated token how many answers it finished (0 too, so that a bar's clock goes
    on while none has), at a batch's end how many were cut at max_new_tokens, and after each packed log-prob row how
    many samples it held."""
    ids, pv, grids = prompts
    told = []
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    rolls = rollout(small_model, small_processor, ids, pv, grids, 4, params, list(range(200)), 5, told.append)
    want = []
    for b in range(0, len(rolls), 5):
        batch = rolls[b : b + 5]
        want += [sum(r.stopped and r.length == t for r in batch) for t in range(1, max(r.length for r in batch) + 1)]
        want += [sum(not r.stopped for r in batch)] if not all(r.stopped for r in batch) else []
    assert told == want and sum(told) == 12 and 0 in told, told
    told.clear()
    token_logprobs(small_model, ids, [[5, 17], [9], [33, 2]], pv, grids, 1, told.append)  # a row per sample
    assert told == [1, 1, 1]
    told.clear()
    responses = [[5] * 40, [9] * 40, [33] * 40]
    budget = len(ids[0]) + len(ids[1]) + 80  # the first two samples, prompt and response tokens, fill a row
    token_logprobs(small_model, ids, responses, pv, grids, budget, told.append)
    assert told == [2, 1]
    told.clear()
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=3)
    rollout(small_model, small_processor, ids[1:2], None, None, 3, params, [], 5, told.append)
    assert told == [0, 0, 0, 0, 3]  # no stop ids: all three cut at max_new_tokens, told at the batch's end


def test_log_probs_need_one_response_per_prompt_and_no_empty_prompt(small_model, prompts):
    """Fewer responses than prompts would be zipped away; an empty prompt would score its first token on the
    previous sample's last hidden state."""
    ids = prompts[0][1:2]
    with pytest.raises(ValueError, match="1 prompts but 2 responses"):
        token_logprobs(small_model, ids, [[5], [6]])
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        token_logprobs(small_model, [ids[0], []], [[5], [6]])
