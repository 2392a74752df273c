"""Sampling settings and generation inputs that cannot work are the project's own clear errors."""

import math

import numpy as np
import pytest
import torch

from kimivl import generate
from kimivl.inference.chat import stream_generate
from kimivl.inference.generate import generate_ids
from kimivl.inference.sampling import SamplingError, SamplingParams, sample_next
from kimivl.processing.chat_template import MessageError


@pytest.mark.parametrize(
    "settings,message",
    [
        (
            {"temperature": float("nan")},
            "temperature must be >= 0: 0 .greedy. or a finite number of at least 0.0001, got nan",
        ),
        (
            {"temperature": 5e-324},
            "temperature must be >= 0: 0 .greedy. or a finite number of at least 0.0001, got 5e-324",
        ),
        ({"temperature": 1e-310}, "temperature must be >= 0"),
        ({"temperature": float("inf")}, "temperature must be >= 0"),
        ({"temperature": 10**400}, "temperature must be >= 0"),  # too large for a float: no OverflowError
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"temperature": "0.7"}, "temperature must be >= 0"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1, got 2.5"),
        ({"max_new_tokens": "16"}, "max_new_tokens must be an integer >= 1, got '16'"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 1, got True"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"seed": 2**64}, r"seed must be an integer in \[0, 2\*\*64\), got 18446744073709551616"),
        ({"seed": -1}, "seed must be an integer"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"top_k": 2.0}, "top_k must be an integer >= 0"),
        ({"top_p": float("nan")}, r"top_p must be in \(0, 1\] \(a number\)"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\] \(a number\)"),
        ({"top_p": 10**400}, r"top_p must be in \(0, 1\] \(a number\)"),
    ],
)
def test_bad_sampling_settings(settings, message):
    with pytest.raises(SamplingError, match=message):
        SamplingParams(**settings)
    assert issubclass(SamplingError, ValueError)


def test_edge_settings_that_work():
    assert SamplingParams(temperature=1e-4, seed=2**64 - 1, max_new_tokens=1).seed == 2**64 - 1
    assert SamplingParams(seed=0).seed == 0
    numpy_numbers = SamplingParams(max_new_tokens=np.int64(5), seed=np.uint64(3), temperature=np.float32(0.5))
    assert numpy_numbers == SamplingParams(max_new_tokens=5, seed=3, temperature=0.5)
    assert type(numpy_numbers.max_new_tokens) is int and type(numpy_numbers.temperature) is float
    # the smallest allowed temperature still gives finite probabilities on large logits
    logits = torch.tensor([[30.0, 29.0, -30.0]])
    g = torch.Generator().manual_seed(0)
    assert int(sample_next(logits, SamplingParams(temperature=1e-4), g)) == 0


def test_unknown_keyword_arguments_are_named(small_model, small_processor):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(
        SamplingError,
        match="unknown sampling settings max_tokens, temp; the settings are "
        "max_new_tokens, temperature, top_k, top_p, seed",
    ):
        generate(small_model, small_processor, messages, max_tokens=5, temp=0.3)
    with pytest.raises(SamplingError, match="unknown sampling setting max_length;"):
        next(stream_generate(small_model, small_processor, messages, max_length=5))


@pytest.mark.parametrize(
    "prompts,message",
    [
        ([[1, 2, 10**9]], r"prompt 0 holds 1 token ids that are not integers in \[0, 4096\).*\[1000000000\]"),
        ([[1, 2], [-1, 5]], r"prompt 1 holds 1 token ids .*\[-1\]"),
        ([[1, 4096]], r"\[4096\]"),
        ([[1.5, 2]], r"\[1\.5\]"),
        ([[True, 2]], r"\[True\]"),
        ([["a"]], r"\['a'\]"),
        (["hello"], "prompt 0 needs at least one token"),
        ([[]], "prompt 0 needs at least one token"),
        ([], "prompts must be a non-empty list"),
        ("abc", "prompts must be a non-empty list"),
    ],
)
def test_bad_token_ids_in_generate_ids(tiny_model, prompts, message):
    with pytest.raises(ValueError, match=message):
        generate_ids(tiny_model, prompts, params=SamplingParams(max_new_tokens=1))


def test_tensor_prompts_still_work(tiny_model):
    params = SamplingParams(max_new_tokens=3)
    assert generate_ids(tiny_model, [torch.tensor([5, 6, 7])], params=params) == generate_ids(
        tiny_model, [[5, 6, 7]], params=params
    )
    with pytest.raises(SamplingError, match="params must be a SamplingParams"):
        generate_ids(tiny_model, [[5]], params={"max_new_tokens": 3})


def test_non_finite_logits_are_an_error_not_garbage(tiny_model):
    with torch.no_grad():
        tiny_model.language_model.lm_head.weight[7, 0] = float("nan")
    for temperature in (0.0, 0.7):
        with pytest.raises(SamplingError, match="logits hold NaN"):
            generate_ids(tiny_model, [[5, 6]], params=SamplingParams(max_new_tokens=2, temperature=temperature))
    assert math.isnan(float(tiny_model.language_model.lm_head.weight[7, 0].detach()))


INF = float("inf")
SETTINGS = [
    SamplingParams(),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=2),
    SamplingParams(temperature=1.0, top_p=0.5),
]


@pytest.mark.parametrize("params", SETTINGS)
def test_infinite_logits_and_rows_with_nothing_to_choose_are_errors(params):
    g = torch.Generator().manual_seed(0)
    fine = [0.0, 1.0, -INF, 2.0]  # a masked token beside it: not an error
    with pytest.raises(SamplingError, match=r"the model's logits hold \+inf \(row 1\).*: no token can be chosen"):
        sample_next(torch.tensor([fine, [0.0, INF, 0.0, 0.0]]), params, g)
    with pytest.raises(SamplingError, match=r"row 1 of the logits holds no finite value \(all -inf\)"):
        sample_next(torch.tensor([fine, [-INF] * 4]), params, g)
    with pytest.raises(SamplingError, match="row 0, 1 of the logits holds no finite value"):
        sample_next(torch.full((2, 4), -INF, dtype=torch.bfloat16), params, g)


def test_finite_logits_that_overflow_at_a_low_temperature_are_named():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(SamplingError, match=r"\+inf .row 0. .or logits beyond \+-3.4e\+34, which overflow once"):
        sample_next(torch.tensor([[0.0, 3e35, 0.0]]), SamplingParams(temperature=1e-4), g)
    assert int(sample_next(torch.tensor([[0.0, 3e35, 0.0]]), SamplingParams(temperature=1e-3), g)) == 1


@pytest.mark.parametrize("params", [*SETTINGS, SamplingParams(temperature=1.0, top_k=4)])
def test_logits_masked_with_minus_inf_are_chosen_around_the_mask(params):
    logits = torch.tensor([[0.0, -INF, 0.5, -INF, 0.2], [-INF, -INF, -INF, 3.0, -INF]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, params, g) for _ in range(300)])
    assert set(draws[:, 1].tolist()) == {3}  # the one token left
    want = {2} if params.temperature == 0 else {2, 4} if params.top_k == 2 or params.top_p < 1 else {0, 2, 4}
    assert set(draws[:, 0].tolist()) == want


def test_stream_generate_given_a_batch_points_to_generate(small_model, small_processor):
    """A list of conversations was refused as "message 0: must be a dict with 'role' and 'content', got list"."""
    chats = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "hello"}]]
    with pytest.raises(MessageError, match="stream_generate takes one conversation .* got a list of 2 conversations"):
        next(stream_generate(small_model, small_processor, chats))
    assert len(generate(small_model, small_processor, chats, max_new_tokens=2)) == 2


@pytest.mark.parametrize("messages", [[], {"role": "user", "content": "hi"}])
def test_no_messages_or_one_message_not_in_a_list_is_named(small_model, small_processor, messages):
    """Neither is taken for a batch (an IndexError or a KeyError from looking into it)."""
    for answer in (generate, lambda *args: next(stream_generate(*args))):
        with pytest.raises(MessageError, match="messages must be a non-empty list of"):
            answer(small_model, small_processor, messages)
