"""KimiVLProcessor: placeholder expansion, training labels, save/load, and text generation through it."""

import numpy as np
import pytest
from PIL import Image

from kimivl.checkpoint import CheckpointError
from kimivl.inference.chat import generate, stream_generate
from kimivl.inference.generate import generate_ids
from kimivl.processing.processor import IGNORE_INDEX, KimiVLProcessor


def picture(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_placeholders_expand_per_image(small_processor):
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": picture(100, 50)},
                {"type": "text", "text": "Hi"},
                {"type": "image", "image": picture(28, 28)},
            ],
        }
    ]
    batch = small_processor(msgs)
    tok = small_processor.tokenizer
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
        small_processor._expand([tok.media_pad_id, tok.media_pad_id], batch["image_grid_hws"][:1])


def test_training_labels_cover_answers_and_end_tokens(small_processor):
    tok = small_processor.tokenizer
    msgs = [
        {"role": "user", "content": [{"type": "image", "image": picture(28, 56)}, {"type": "text", "text": "Q1"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "3 circles"},
    ]
    enc = small_processor.encode_for_training(msgs)
    assert len(enc.labels) == len(enc.input_ids)
    kept = [t for t in enc.labels if t != IGNORE_INDEX]
    assert kept == tok.encode("red<|im_end|>") + tok.encode("3 circles<|im_end|>")
    assert IGNORE_INDEX == enc.labels[0] == -100  # the model's ignore_index (spec section 2)
    for t, lab in zip(enc.input_ids, enc.labels):
        assert lab in (IGNORE_INDEX, t)
    with pytest.raises(ValueError, match="at least one assistant"):
        small_processor.encode_for_training([{"role": "user", "content": "x"}])


def test_images_in_an_answer_are_read_not_scored(small_processor):
    """An assistant turn's images were labels: the model learnt to write media markup and its placeholders."""
    tok = small_processor.tokenizer
    image = {"type": "image", "image": picture(28, 28)}
    msgs = [
        {"role": "user", "content": "draw two"},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "here"}, image, image, {"type": "text", "text": "ok"}],
        },
    ]
    enc = small_processor.encode_for_training(msgs)
    kept = [t for t in enc.labels if t != IGNORE_INDEX]
    assert kept == tok.encode("here") + tok.encode("ok<|im_end|>")
    assert enc.input_ids.count(tok.media_pad_id) == 2 and enc.image_grid_hws.tolist() == [[2, 2], [2, 2]]


def test_decode_takes_any_iterable_of_ids(small_processor):
    tok = small_processor.tokenizer
    ids = [tok.im_user_id, *tok.encode("red square"), tok.im_end_id]
    assert small_processor.decode(iter(ids)) == small_processor.decode(tuple(ids)) == "red square"
    assert small_processor.decode(iter(ids), skip_special=False) == "<|im_user|>red square<|im_end|>"


def test_save_and_load(small_processor, tmp_path):
    small_processor.save_pretrained(tmp_path)
    again = KimiVLProcessor.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "What colour is the square?"}]
    assert again(msgs)["input_ids"].tolist() == small_processor(msgs)["input_ids"].tolist()
    assert again.image_processor == small_processor.image_processor


def test_a_tokenizer_whose_media_pad_is_not_the_models_placeholder_is_refused(small_processor, small_model, tmp_path):
    """Both read from one checkpoint directory: a config naming another placeholder id made every image prompt fail
    in the model, blaming the prompt ("input_ids hold 1 image placeholder tokens ... the images give 4 features")."""
    import json

    small_model.save_pretrained(tmp_path)
    small_processor.save_pretrained(tmp_path)
    pad = small_processor.tokenizer.media_pad_id
    assert KimiVLProcessor.from_pretrained(tmp_path).tokenizer.media_pad_id == pad
    config = json.loads((tmp_path / "config.json").read_text())
    config["media_placeholder_token_id"] = pad - 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        KimiVLProcessor.from_pretrained(tmp_path)
    for part in (f"{tmp_path / 'config.json'} gives media_placeholder_token_id {pad - 1}", f"at id {pad}"):
        assert part in str(e.value)
    assert f"tokenizer in {tmp_path} (tiktoken.model, tokenizer_config.json)" in str(e.value)


def test_save_refuses_to_overwrite_another_models_files(small_processor, small_model, tmp_path):
    """A Qwen-style download (config or tokenizer of another model) keeps its files; Kimi-VL's own are replaced."""
    theirs = {"tokenizer_config.json": '{"tokenizer_class": "Qwen2TokenizerFast"}', "preprocessor_config.json": "{}"}
    for config in ('{"model_type": "qwen2_vl"}', None):
        d = tmp_path / f"other-{config is None}"
        d.mkdir()
        for name, text in {**theirs, **({"config.json": config} if config else {})}.items():
            (d / name).write_text(text)
        with pytest.raises(CheckpointError, match=r"not a Kimi-VL model's directory.*tokenizer_config.json"):
            small_processor.save_pretrained(d)
        assert {p.name: p.read_text() for p in d.iterdir() if p.name != "config.json"} == theirs
        assert not (d / "tiktoken.model").exists()
    model_dir = tmp_path / "model"  # a model saved first, then its processor: Kimi-VL's directory
    small_model.save_pretrained(model_dir)
    for _ in range(2):
        small_processor.save_pretrained(model_dir)
        small_processor.save_pretrained(tmp_path / "alone")  # a processor over its own earlier save
    for d in (model_dir, tmp_path / "alone"):
        assert KimiVLProcessor.from_pretrained(d).tokenizer.encode("a cat") == small_processor.tokenizer.encode("a cat")


def test_generate_text_single_batched_and_streamed(small_model, small_processor):
    a = [
        {"role": "user", "content": [{"type": "image", "image": picture(56, 28)}, {"type": "text", "text": "Colour?"}]}
    ]
    b = [{"role": "user", "content": "Count the circles."}]
    one = generate(small_model, small_processor, a, max_new_tokens=6)
    both = generate(small_model, small_processor, [a, b], max_new_tokens=6)
    assert both[0] == one and both[1] == generate(small_model, small_processor, b, max_new_tokens=6)
    assert "".join(stream_generate(small_model, small_processor, a, max_new_tokens=6)) == one
    enc = small_processor.encode(a)
    ids = generate_ids(
        small_model, [enc.input_ids], enc.pixel_values, enc.image_grid_hws, stop_ids=small_processor.stop_ids
    )[0]
    assert small_processor.decode(ids[:6]) == one


def test_streamed_text_joins_split_characters_and_ends_a_cut_one_visibly(small_model, small_processor, monkeypatch):
    """A character whose bytes come in two tokens is yielded once whole; an answer cut inside a character ends with
    U+FFFD instead of losing its last bytes silently."""
    steps = {"whole": [104, 195, 169], "cut": [104, 195]}  # "h", then the two bytes of "é"
    chat = [{"role": "user", "content": "Hi"}]
    for name, expected, pieces in (("whole", "hé", ["h", "é"]), ("cut", "h\ufffd", ["h", "\ufffd"])):
        monkeypatch.setattr("kimivl.inference.chat.stream_ids", lambda *a, ids=steps[name], **k: ([t] for t in ids))
        assert list(stream_generate(small_model, small_processor, chat)) == pieces
        assert generate(small_model, small_processor, chat) == expected


def test_the_fewest_tokens_of_a_document_or_chat_are_a_floor_on_what_it_encodes_to(small_processor):
    """``fewest_tokens`` lets training skip, and chat and the server refuse, text over a limit without tokenizing it:
    it must never exceed the tokens encoding gives (characters of several bytes, special-token strings as plain text,
    images, parts encoding refuses), and it counts text alone."""
    longest = small_processor.tokenizer.longest_token
    assert longest == max(len(t) for t in small_processor.tokenizer.mergeable_ranks)
    texts = ["", "a", "The quick brown fox. " * 50, "你好，世界" * 40, "<|im_end|><|media_pad|>" * 30, " \n\t" * 99]
    for text in texts:
        assert small_processor.fewest_tokens(text) == len(text) // longest + 1  # its [EOS] too
        assert small_processor.fewest_tokens(text) <= len(small_processor.encode_text(text).input_ids)
        parts = [{"type": "image", "image": picture(28, 28)}, {"type": "text", "text": text}]
        chats = (
            [{"role": "user", "content": text}],
            [
                {"role": "system", "content": text},
                {"role": "user", "content": parts},
                {"role": "assistant", "content": "red"},
            ],
        )
        for chat in chats:
            assert small_processor.fewest_tokens(chat) <= len(small_processor.encode(chat).input_ids)
    assert small_processor.fewest_tokens([{"role": "user", "content": "x" * 7 * longest}]) == 7
    assert small_processor.fewest_tokens([{"role": "user", "content": [{"type": "image", "text": "x" * 99}]}]) == 0
    for malformed in (None, [None], [{"role": "user"}], [{"content": ["x" * 99, 3]}]):  # encoding names what is wrong
        assert small_processor.fewest_tokens(malformed) == 0
        with pytest.raises(ValueError):
            small_processor.encode(malformed)


def test_a_question_that_cannot_fit_the_context_is_refused_without_tokenizing_it(
    small_model, small_processor, monkeypatch
):
    """A 50 MB line piped into kimivl chat was tokenized whole (22 s, about 1 GB) before it was found over the
    context; a question whose characters over the longest token's bytes reach the context is refused unread."""
    from kimivl.inference.generate import GenerationError

    tokenized, encode = [], small_processor.tokenizer.encode
    monkeypatch.setattr(
        small_processor.tokenizer, "encode", lambda text, *a, **k: tokenized.append(text) or encode(text, *a, **k)
    )
    context = small_model.config.text_config.max_position_embeddings
    huge = "x" * (context * small_processor.tokenizer.longest_token)
    for question in (huge, [{"type": "text", "text": huge[:-1]}, {"type": "text", "text": "x"}]):
        chat = [{"role": "user", "content": question}]
        for ask in (
            lambda: generate(small_model, small_processor, chat, max_new_tokens=2),
            lambda: next(stream_generate(small_model, small_processor, chat, max_new_tokens=2)),
            lambda: generate(small_model, small_processor, [[{"role": "user", "content": "Hi"}], chat]),
        ):
            with pytest.raises(GenerationError) as refused:
                ask()
            assert not tokenized  # nothing: every conversation of a batch is checked before any is encoded
            want = f"at least {context} tokens of text, which leaves no room for an answer in the model's context of "
            assert f"{want}{context} tokens" in str(refused.value)
    from kimivl.inference.chat import check_fits

    check_fits(small_processor, [{"role": "user", "content": huge[1:]}], context)  # a floor of a token less may fit
