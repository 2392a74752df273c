"""KimiVLProcessor: placeholder expansion, training labels, save/load, and text generation through it."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from kimivl import KimiVL, KimiVLConfig
from kimivl.inference.chat import generate, stream_generate
from kimivl.processing.processor import IGNORE_INDEX, KimiVLProcessor
from kimivl.processing.tokenizer import train_bpe

CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "What colour is the square? It is red.",
          "Count the circles: there are 3 circles and 2 squares.", "你好，世界"] * 5


@pytest.fixture(scope="module")
def processor():
    return KimiVLProcessor(train_bpe(CORPUS, vocab_size=300))


@pytest.fixture(scope="module")
def model(processor):
    base = KimiVLConfig.from_preset("tiny")
    n = processor.tokenizer.n_ranks
    text = dataclasses.replace(base.text_config, vocab_size=n + 256, bos_token_id=n, eos_token_id=[n + 1, n + 2])
    torch.manual_seed(0)
    return KimiVL(dataclasses.replace(base, text_config=text, media_placeholder_token_id=n + 21)).eval()


def picture(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_placeholders_expand_per_image(processor):
    msgs = [{"role": "user", "content": [{"type": "image", "image": picture(100, 50)}, {"type": "text", "text": "Hi"},
                                         {"type": "image", "image": picture(28, 28)}]}]
    batch = processor(msgs)
    tok = processor.tokenizer
    # 100x50 pads to 112x56: grid (4, 8) -> 2*4 = 8 tokens; 28x28: grid (2, 2) -> 1 token
    assert batch["image_grid_hws"].tolist() == [[4, 8], [2, 2]]
    assert batch["pixel_values"].shape == (32 + 4, 3, 14, 14)
    ids = batch["input_ids"][0].tolist()
    assert ids.count(tok.media_pad_id) == 9
    text = tok.decode(ids)
    assert text.startswith("<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|><|im_user|>user")
    assert "<|media_start|>image<|media_content|>" + "<|media_pad|>" * 8 + "<|media_end|>Hi" in text
    assert text.endswith("<|im_end|><|im_assistant|>assistant<|im_middle|>")
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        processor._expand([tok.media_pad_id, tok.media_pad_id], batch["image_grid_hws"][:1])


def test_training_labels_cover_answers_and_end_tokens(processor):
    tok = processor.tokenizer
    msgs = [{"role": "user", "content": [{"type": "image", "image": picture(28, 56)}, {"type": "text", "text": "Q1"}]},
            {"role": "assistant", "content": "red"}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "3 circles"}]
    enc = processor.encode_for_training(msgs)
    assert len(enc.labels) == len(enc.input_ids)
    kept = [t for t in enc.labels if t != IGNORE_INDEX]
    assert kept == tok.encode("red<|im_end|>") + tok.encode("3 circles<|im_end|>")
    for t, lab in zip(enc.input_ids, enc.labels):
        assert lab in (IGNORE_INDEX, t)
    with pytest.raises(ValueError, match="at least one assistant"):
        processor.encode_for_training([{"role": "user", "content": "x"}])


def test_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    again = KimiVLProcessor.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "What colour is the square?"}]
    assert again(msgs)["input_ids"].tolist() == processor(msgs)["input_ids"].tolist()
    assert again.image_processor == processor.image_processor


def test_generate_text_single_batched_and_streamed(model, processor):
    a = [{"role": "user", "content": [{"type": "image", "image": picture(56, 28)}, {"type": "text", "text": "Colour?"}]}]
    b = [{"role": "user", "content": "Count the circles."}]
    one = generate(model, processor, a, max_new_tokens=6)
    both = generate(model, processor, [a, b], max_new_tokens=6)
    assert both[0] == one and both[1] == generate(model, processor, b, max_new_tokens=6)
    assert "".join(stream_generate(model, processor, a, max_new_tokens=6)) == one
    prompt = processor.encode(a).input_ids
    from kimivl.inference.generate import generate_ids

    enc = processor.encode(a)
    ids = generate_ids(model, [prompt], enc.pixel_values, enc.image_grid_hws, stop_ids=processor.stop_ids)[0]
    assert processor.decode(ids[:6]) == one
