"""``sample_next`` draws from the distribution its settings describe: token frequencies over many rows sampled at
once match probabilities worked out by hand (temperature first, then top-k keeping ties, then top-p)."""

import math

import pytest
import torch

from kimivl.inference.sampling import SamplingError, SamplingParams, sample_next

ROWS = 40_000  # a frequency's standard deviation is at most 0.0025: the tolerance below is four of them
LOGITS = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.5, -1.0])  # tokens 2 and 3 tie


def frequencies(logits_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    ids = sample_next(logits_V.expand(ROWS, -1), params, torch.Generator().manual_seed(0))
    return torch.bincount(ids, minlength=logits_V.shape[-1]).double() / ROWS


def softmax_over(logits_V: torch.Tensor, kept: list[int], temperature: float) -> torch.Tensor:
    """The tempered softmax over the ``kept`` tokens alone, 0 elsewhere."""
    weights = torch.zeros(logits_V.shape[-1], dtype=torch.float64)
    for i in kept:
        weights[i] = math.exp(float(logits_V[i]) / temperature)
    return weights / weights.sum()


@pytest.mark.parametrize(
    "settings,kept",
    [
        ({"temperature": 0.5}, [0, 1, 2, 3, 4, 5]),
        ({"temperature": 2.0}, [0, 1, 2, 3, 4, 5]),
        ({"temperature": 1.5, "top_k": 1}, [1]),
        ({"temperature": 1.5, "top_k": 2}, [1, 2, 3]),  # the token tied with the second stays
        ({"temperature": 1.5, "top_k": 4}, [0, 1, 2, 3]),
        ({"temperature": 1.5, "top_k": 10}, [0, 1, 2, 3, 4, 5]),  # more than the vocabulary: all
        # T=1: 0.535 on token 1, 0.197 on each of 2 and 3; the mass before token 3 (0.732) is under 0.8, before
        # token 0 (0.929) is not
        ({"temperature": 1.0, "top_p": 0.8}, [1, 2, 3]),
        ({"temperature": 1.0, "top_p": 0.5}, [1]),
        # T=3: token 1 holds 0.274, 2 and 3 0.197 each; of the tied pair the lower id comes first, so 3 is dropped
        ({"temperature": 3.0, "top_p": 0.45}, [1, 2]),
        ({"temperature": 1.0, "top_k": 4, "top_p": 0.95}, [0, 1, 2, 3]),  # top-k first: the nucleus of 4 is all 4
    ],
)
def test_frequencies_follow_the_filtered_tempered_softmax(settings, kept):
    want = softmax_over(LOGITS, kept, settings["temperature"])
    torch.testing.assert_close(frequencies(LOGITS, SamplingParams(**settings)), want, atol=0.01, rtol=0)


def test_a_top_p_just_under_one_still_drops_the_tail():
    """Token 0 holds 0.9983 of the mass: at top_p=0.995 it is the whole nucleus, and the tail (0.17%, some 67 of the
    draws) is never drawn."""
    logits = torch.tensor([8.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert frequencies(logits, SamplingParams(temperature=1.0, top_p=0.995)).tolist() == [1.0] + [0.0] * 5
    assert frequencies(logits, SamplingParams(temperature=1.0))[1:].sum() > 0.001  # without top_p it is drawn


def test_half_precision_logits_are_tempered_in_float32():
    """float16 logits of 100 divided by temperature 0.001 are 1e5, past float16's 65504: in float16 they would be
    +inf and no token could be chosen. Logits that are +inf already are an error, which blames the temperature only
    when it is under 1 (dividing by 1 or more cannot overflow)."""
    logits = torch.tensor([[100.0, 99.0, 0.0]], dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits.expand(100, -1), SamplingParams(temperature=1e-3), g).tolist() == [0] * 100
    infinite = torch.tensor([[float("inf"), 0.0]], dtype=torch.float16)
    with pytest.raises(SamplingError, match=r"\+inf \(row 0\) \(or logits beyond \+-1.7e\+38, which overflow"):
        sample_next(infinite, SamplingParams(temperature=0.5), g)
    with pytest.raises(SamplingError, match=r"\+inf \(row 0\): no token can be chosen") as error:
        sample_next(infinite, SamplingParams(temperature=1.0), g)
    assert "temperature" not in str(error.value)
