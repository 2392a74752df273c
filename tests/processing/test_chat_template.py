import pytest

from kimivl.processing.chat_template import apply_chat_template, parse_thinking

SYS = "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
IMG = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
GEN = "<|im_assistant|>assistant<|im_middle|>"


def test_single_turn_default_system():
    text, media = apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert text == SYS + "<|im_user|>user<|im_middle|>Hi there<|im_end|>" + GEN
    assert media == []


def test_no_generation_prompt():
    text, _ = apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert text == SYS + "<|im_user|>user<|im_middle|>Hi<|im_end|>"


def test_own_system_and_multi_turn():
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": [{"type": "text", "text": "And 3+3?"}]},
    ]
    text, _ = apply_chat_template(msgs)
    assert text == (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
        "<|im_user|>user<|im_middle|>2+2?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>4<|im_end|>"
        "<|im_user|>user<|im_middle|>And 3+3?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )
    assert "\n" not in text


def test_images_in_order():
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "a.png"},
                {"type": "text", "text": "vs"},
                {"type": "image", "image_url": {"url": "b.jpg"}},
                {"type": "text", "text": "Which is brighter?"},
            ],
        },
        {"role": "assistant", "content": "The first."},
        {"role": "user", "content": [{"type": "image", "url": "c.webp"}]},
    ]
    text, media = apply_chat_template(msgs)
    assert text == (
        SYS + "<|im_user|>user<|im_middle|>" + IMG + "vs" + IMG + "Which is brighter?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>The first.<|im_end|>"
        "<|im_user|>user<|im_middle|>" + IMG + "<|im_end|>" + GEN
    )
    assert media == ["a.png", "b.jpg", "c.webp"]


def test_empty_content_is_allowed():
    text, _ = apply_chat_template(
        [{"role": "user", "content": ""}, {"role": "assistant", "content": []}], add_generation_prompt=False
    )
    assert text == SYS + "<|im_user|>user<|im_middle|><|im_end|><|im_assistant|>assistant<|im_middle|><|im_end|>"


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        (["hi"], "message 0: must be a dict"),
        ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "message 1: unknown role 'bot'"),
        (
            [{"role": "tool", "content": "42"}],
            "message 0: unknown role 'tool' \\(expected one of system, user, assistant\\)",
        ),
        ([{"role": "user"}], "message 0: missing 'content'"),
        ([{"role": "user", "content": None}], "message 0: missing 'content'"),
        ([{"role": "user", "content": 3}], "message 0: content must be a string or a list"),
        ([{"role": "user", "content": ["x"]}], "message 0, part 0: a content part must be an object"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "message 0, part 0: unknown part type 'audio'"),
        ([{"role": "user", "content": [{"text": "no type"}]}], "unknown part type None"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "a text part needs a string"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image"}]},
            ],
            "message 1, part 1: image part has no 'image'",
        ),
        ([{"role": "user", "content": [{"type": "video"}]}], "video part has no 'video'"),
    ],
)
def test_malformed(messages, match):
    with pytest.raises(ValueError, match=match):
        apply_chat_template(messages)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("◁think▷ step 1, step 2 ◁/think▷ The answer is 4.", ("step 1, step 2", "The answer is 4.")),
        ("◁think▷reasoning that never ends", ("reasoning that never ends", "")),
        ("plain answer ", (None, "plain answer")),
        ("only the close ◁/think▷ answer", ("only the close", "answer")),
        ("◁think▷◁/think▷", ("", "")),
        # as the model card's parser: the first close ends the reasoning, text before an opening marker is dropped
        ("◁think▷a◁/think▷b◁/think▷c", ("a", "b◁/think▷c")),
        ("x ◁think▷ a ◁/think▷ b", ("a", "b")),
        ("ans ◁think▷ tail", ("tail", "")),
    ],
)
def test_parse_thinking(text, expected):
    assert parse_thinking(text) == expected
