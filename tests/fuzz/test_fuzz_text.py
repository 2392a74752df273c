"""Generated text, conversations, sampling settings and prompts: plain text never yields special ids, malformed
conversations are the project's errors, and sampling either refuses its settings or gives token ids in range."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kimivl import KimiVL, KimiVLConfig
from kimivl.inference.generate import GenerationError, generate_ids
from kimivl.inference.sampling import SamplingError, SamplingParams, sample_next
from kimivl.processing.chat_template import (
    THINK_CLOSE,
    THINK_OPEN,
    MessageError,
    chat_segments,
)
from kimivl.processing.image import ImageError
from kimivl.processing.tokenizer import DEFAULT_SPECIAL_NAMES
from kimivl.processing.video import VideoError
from tests.fuzz.common import case, expect, fuzz

SPECIALS = [*DEFAULT_SPECIAL_NAMES.values(), THINK_OPEN, THINK_CLOSE, "<|reserved_token_3850|>", "<|im_", "|>"]
TEXT = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(SPECIALS)), max_size=8).map("".join)


@fuzz(200)
@given(TEXT)
def test_plain_text_never_yields_special_ids(small_processor, text):
    tok = small_processor.tokenizer
    with case("tokenizer: plain text"):
        ids = tok.encode(text, allow_special=False)
        assert not any(tok.is_special(i) for i in ids)
        assert tok.decode(ids) == text
        doc = small_processor.encode_text(text)
        assert [i for i in doc.input_ids if tok.is_special(i)] == [tok.eos_id]


IMAGE = np.zeros((28, 28, 3), np.uint8)
PART = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, TEXT),
    st.just({"type": "image", "image": IMAGE}),
    st.builds(lambda v: {"type": "image", "image": v}, st.one_of(st.none(), st.integers(), st.text(max_size=5))),
    st.builds(
        lambda times: {"type": "video", "frames": [IMAGE] * len(times), "timestamps": times},
        st.lists(st.one_of(st.floats(allow_nan=True), st.integers(-3, 3)), max_size=2),
    ),
    st.dictionaries(
        st.sampled_from(["type", "text", "image", "video", "frames"]),
        st.one_of(st.none(), st.integers(), st.text(max_size=6), st.sampled_from(["text", "image"])),
        max_size=3,
    ),
    st.integers(),
    st.none(),
)
CONTENT = st.one_of(TEXT, st.lists(PART, max_size=3), st.none(), st.integers())
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", ""]), "content": CONTENT}),
    st.dictionaries(st.sampled_from(["role", "content"]), st.text(max_size=5), max_size=2),
    st.text(max_size=4),
)


def _specials(tok, ids):
    out = []
    for i in ids:
        if tok.is_special(i) and not (i == tok.media_pad_id and out and out[-1] == i):
            out.append(i)
    return out


@fuzz(200)
@given(st.one_of(st.lists(MESSAGE, max_size=4), TEXT, st.none()), st.booleans())
def test_conversations(small_processor, messages, training):
    tok = small_processor.tokenizer
    encode = small_processor.encode_for_training if training else small_processor.encode
    with case("template: conversations"):
        enc = expect(lambda: encode(messages), MessageError, ImageError, VideoError)
    if enc is None:
        return
    # only the template's markup gives special ids, in the order of its structure segments
    segments, _ = chat_segments(messages, add_generation_prompt=not training)
    markup = [i for text, structure in segments if structure for i in tok.encode(text)]
    assert _specials(tok, enc.input_ids) == _specials(tok, markup)
    assert torch.isfinite(enc.pixel_values).all()
    if training:
        assert len(enc.labels) == len(enc.input_ids)


SETTING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.integers(2**63, 2**65),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
    st.text(max_size=3),
)


@fuzz(200)
@given(
    st.dictionaries(
        st.sampled_from(["max_new_tokens", "temperature", "top_k", "top_p", "seed", "max_tokens"]), SETTING, max_size=5
    ),
    st.lists(st.floats(-50, 50), min_size=7, max_size=7),
)
def test_sampling_settings(settings, logits):
    with case("sampler: settings"):
        params = expect(lambda: SamplingParams.from_kwargs(**settings), SamplingError)
        if params is None:
            return
        logits_BV = torch.tensor([logits, logits[::-1]])
        g = torch.Generator().manual_seed(params.seed or 0)
        ids = sample_next(logits_BV, params, g)
        assert ids.shape == (2,) and bool(((ids >= 0) & (ids < 7)).all())
        if params.temperature == 0:
            assert ids.tolist() == logits_BV.argmax(-1).tolist()


@pytest.fixture(scope="module")
def micro_model():
    cfg = KimiVLConfig.from_preset("tiny")
    torch.manual_seed(0)
    return KimiVL(cfg).eval()


TOKEN = st.one_of(st.integers(-5, 5000), st.floats(0, 10), st.booleans(), st.text(max_size=2), st.none())


@fuzz(60)
@given(st.one_of(st.lists(st.lists(TOKEN, max_size=4), max_size=3), st.text(max_size=3), st.none()))
def test_prompts(micro_model, prompts):
    with case("generate: prompts"):
        out = expect(
            lambda: generate_ids(micro_model, prompts, params=SamplingParams(max_new_tokens=1)), GenerationError
        )
    if out is not None:
        assert all(len(row) <= 1 and all(0 <= t < 4096 for t in row) for row in out)
