"""How the server meets the OpenAI chat completions API at its edges: numbers too large to convert, fields it does not
implement, the streamed chunks' shape, error bodies, the ``developer`` role."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import re
import threading
import urllib.error
import urllib.request

import openai
import pytest
from PIL import Image
from test_serve import _post

from kimivl.serve import app as app_module
from kimivl.serve import engine as engine_module
from kimivl.serve.schema import MAX_STOP_CHARS, Limits, RequestError, parse_chat_request

GOOD = {"model": "kimivl-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
LIMITS = Limits(context=4096, max_batch=2)


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), "red").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _with(field: str, number: str, part: dict | None = None) -> bytes:
    """GOOD as JSON with ``field`` set to the literal ``number`` (in a video part when ``part`` is given)."""
    body = dict(GOOD)
    if part is not None:
        body["messages"] = [{"role": "user", "content": [{**part, field: "@"}]}]
    else:
        body[field] = "@"
    return json.dumps(body).replace('"@"', number).encode()


def test_numbers_too_large_to_convert_get_a_400_naming_the_field(tiny):
    url, _ = tiny
    video = {"type": "video", "video": [_png()]}
    huge, longer = "1" + "0" * 400, "1" + "0" * 5000  # the second is over Python's 4300 digits for int()
    for body, field in [
        (_with("temperature", huge), "temperature"),
        (_with("top_p", huge), "top_p"),
        (_with("temperature", "-" + huge), "temperature"),
        (_with("temperature", longer), "temperature"),
        (_with("max_tokens", longer), "max_tokens"),
        (_with("seed", "-" + longer), "seed"),
        (_with("fps", huge, video), "fps"),
        (_with("timestamps", f"[{huge}]", video), "timestamp"),
        (_with("timestamps", f"[{longer}]", video), "timestamp"),
    ]:
        code, reply = _post(url, body)
        assert code == 400 and field in reply["error"]["message"], (field, code, reply)
        assert reply["error"]["type"] == "invalid_request_error"
    assert _post(url, _with("temperature", "0"))[0] == 200


def test_an_unexpected_error_is_an_openai_shaped_500_and_its_traceback_is_logged(tiny, monkeypatch, caplog):
    url, _ = tiny

    def broken(body, limits):
        raise RuntimeError("a bug in the parser")

    monkeypatch.setattr(app_module, "parse_chat_request", broken)
    with caplog.at_level(logging.ERROR, logger="kimivl.serve.app"):
        code, reply = _post(url, GOOD)
    assert code == 500 and reply["error"]["type"] == "server_error" and "RuntimeError" in reply["error"]["message"]
    assert "a bug in the parser" not in reply["error"]["message"]  # the details stay in the log
    (record,) = [r for r in caplog.records if r.name == "kimivl.serve.app"]
    assert record.exc_info and str(record.exc_info[1]) == "a bug in the parser"
    monkeypatch.undo()
    assert _post(url, GOOD)[0] == 200


def test_requests_are_checked_off_the_event_loop(tiny, monkeypatch):
    url, _ = tiny
    threads = []

    def parse(body, limits):
        threads.append(threading.current_thread().name)
        return parse_chat_request(body, limits)

    monkeypatch.setattr(app_module, "parse_chat_request", parse)
    assert _post(url, GOOD)[0] == 200
    bad = {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    code, reply = _post(url, bad)
    assert code == 400 and "no remote URLs" in reply["error"]["message"]  # the same answer from the other thread
    assert len(threads) == 2 and all(name.startswith("kimivl-encode") for name in threads), threads


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_k", 5),
        ("ignore_eos", True),
        ("min_tokens", 5),
        ("guided_json", {"type": "object"}),
        ("repetition_penalty", 1.2),
        ("reasoning_effort", "low"),
        ("continue_final_message", True),
        ("add_generation_prompt", False),
        ("verbosity", "low"),
        ("prediction", {"type": "content", "content": "x"}),
    ],
)
def test_unknown_request_fields_are_refused_by_name(field, value):
    with pytest.raises(RequestError, match=f"the request has the field '{field}', which this server does not") as e:
        parse_chat_request({**GOOD, field: value}, LIMITS)
    assert e.value.param == field and e.value.status == 400


def test_fields_that_change_nothing_are_accepted_and_unsupported_ones_refused():
    harmless = {
        "user": "u1",
        "metadata": {"a": "b"},
        "store": False,
        "service_tier": "auto",
        "parallel_tool_calls": False,
        "modalities": ["text"],
        "stream_options": None,
        "top_k": None,  # null asks for nothing
    }
    assert parse_chat_request({**GOOD, **harmless}, LIMITS) == parse_chat_request(GOOD, LIMITS)
    for field, value, words in [
        ("modalities", ["text", "audio"], r"modalities=\['text', 'audio'\] is not supported"),
        ("audio", {"voice": "alloy", "format": "wav"}, "audio="),
        ("user", 5, "user must be a str"),
        ("store", "yes", "store must be a bool"),
    ]:
        with pytest.raises(RequestError, match=words) as e:
            parse_chat_request({**GOOD, field: value}, LIMITS)
        assert e.value.param == field
    with pytest.raises(RequestError, match="stream_options has the field 'foo'") as e:
        parse_chat_request({**GOOD, "stream": True, "stream_options": {"include_usage": True, "foo": 1}}, LIMITS)
    assert e.value.param == "stream_options.foo"
    streamed = {**GOOD, "stream": True}
    assert parse_chat_request({**streamed, "stream_options": {"include_obfuscation": True}}, LIMITS) == (
        parse_chat_request(streamed, LIMITS)
    )
    with pytest.raises(RequestError, match="stream_options must be") as e:  # was accepted, whatever its value
        parse_chat_request({**streamed, "stream_options": {"include_obfuscation": "weird"}}, LIMITS)


def test_unknown_keys_in_messages_and_parts_are_refused_by_name():
    image = {"type": "image_url", "image_url": {"url": _png()}}

    def user(part: dict) -> dict:
        return {"role": "user", "content": [part]}

    part = "messages[0].content[0]"
    for message, param in [
        ({"role": "user", "content": "Hi", "tool_call_id": "a"}, "messages[0].tool_call_id"),
        ({"role": "assistant", "content": "Hi", "tool_calls": [{"id": "a"}]}, "messages[0].tool_calls"),
        (user({"type": "text", "text": "Hi", "cache_control": {}}), f"{part}.cache_control"),
        (user({**image, "image_url": {"url": _png(), "x": 1}}), f"{part}.image_url.x"),
        (user({**image, "image_url": {"url": _png(), "detail": "low"}}), f"{part}.image_url.detail"),
        (user({"type": "video", "video": [_png()], "max_frames": 1}), f"{part}.max_frames"),
        (user({"type": "video_url", "video_url": {"url": [_png()], "fps": 2}}), f"{part}.video_url.fps"),
        ({"role": "tool", "content": "x", "tool_call_id": "a"}, "messages[0]"),
        (user({"type": "refusal", "refusal": "no"}), part),
        ({"role": "user", "content": "Hi", "name": 5}, "messages[0].name"),
    ]:
        with pytest.raises(RequestError) as e:
            parse_chat_request({**GOOD, "messages": [message]}, LIMITS)
        assert e.value.status == 400 and e.value.param == param, (message, e.value.param)
        assert e.value.param.split(".")[-1].split("[")[0] in e.value.message, e.value.message
    plain = parse_chat_request({**GOOD, "messages": [{"role": "user", "content": [image]}]}, LIMITS)
    for detail in ("auto", "high", None):
        part = {**image, "image_url": {"url": _png(), "detail": detail}}
        assert parse_chat_request({**GOOD, "messages": [{"role": "user", "content": [part]}]}, LIMITS) == plain


def test_an_answer_sent_back_with_its_reasoning_and_a_name_is_read_without_them():
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    echoed = [{**history[0], "name": "ann"}, {**history[1], "reasoning_content": "They greet me."}]
    assert parse_chat_request({**GOOD, "messages": echoed}, LIMITS) == parse_chat_request(
        {**GOOD, "messages": history}, LIMITS
    )


def test_a_name_or_reasoning_content_of_the_wrong_type_is_refused_by_name():
    for key in ("name", "reasoning_content"):
        for value in (5, {}, ["x"], True):
            _refused(
                {**GOOD, "messages": [{"role": "assistant", "content": "Hi", key: value}]},
                f"messages[0].{key}",
                f"messages\\[0\\]: {key} must be a string",
            )
        for value in ("x", None):
            parse_chat_request({**GOOD, "messages": [{"role": "assistant", "content": "Hi", key: value}]}, LIMITS)


def test_a_role_or_part_type_that_is_a_list_or_object_is_refused_by_name():
    """Such a value cannot be looked up among the known roles and part types: it was a TypeError, a 500."""
    for value, kind in ((["user"], "list"), ({}, "dict")):
        _refused(
            {**GOOD, "messages": [{"role": value, "content": "Hi"}]},
            "messages[0].role",
            f"messages\\[0\\]: role must be a string, got {kind}",
        )
        _refused(
            {**GOOD, "messages": [{"role": "user", "content": [{"type": value, "text": "Hi"}]}]},
            "messages[0].content[0].type",
            f"messages\\[0\\].content\\[0\\]: type must be a string, got {kind}",
        )


def test_the_developer_role_is_the_system_role(tiny):
    url, engine = tiny
    system = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."}]
    developer = [{**system[0], "role": "developer"}, system[1]]
    assert parse_chat_request({**GOOD, "messages": developer}, LIMITS).messages[0]["role"] == "system"
    client = openai.OpenAI(base_url=url + "/v1", api_key="secret-key", timeout=30, max_retries=0)
    answers = [
        client.chat.completions.create(model="kimivl-tiny", messages=m, temperature=0, max_tokens=8)
        for m in (system, developer)
    ]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert answers[0].usage.prompt_tokens == answers[1].usage.prompt_tokens


def test_streamed_chunks_carry_one_choice_each_with_finish_reason_and_logprobs(tiny):
    url, _ = tiny
    body = json.dumps({**GOOD, "n": 2, "stream": True, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer secret-key"}
    req = urllib.request.Request(url + "/v1/chat/completions", body, headers, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(len(c["choices"]) == 1 for c in chunks)  # as OpenAI streams several choices
    for choice in (c["choices"][0] for c in chunks):
        assert "finish_reason" in choice and "logprobs" in choice, choice
    first = [c["choices"][0] for c in chunks[:2]]
    assert [c["index"] for c in first] == [0, 1]
    assert all(c["delta"] == {"role": "assistant", "content": ""} and c["finish_reason"] is None for c in first)
    assert sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]) == [0, 1]


def test_a_failed_generation_is_an_openai_shaped_500_or_the_last_event_of_its_stream(tiny, monkeypatch):
    """An engine error (here: sampling the first token) answers a plain request with a 500 whose code is
    generation_failed, and ends a stream with that error object, after the role chunk and without [DONE]."""
    url, _ = tiny

    def sample_next(logits, params, generator, real=engine_module.sample_next):
        if params.seed == 77:
            raise RuntimeError("injected fault")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample_next", sample_next)
    error = {
        "message": "prefill failed: injected fault",
        "type": "server_error",
        "param": None,
        "code": "generation_failed",
    }
    assert _post(url, {**GOOD, "seed": 77}) == (500, {"error": error})
    body = json.dumps({**GOOD, "seed": 77, "stream": True}).encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer secret-key"}
    req = urllib.request.Request(url + "/v1/chat/completions", body, headers, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert len(events) == 2 and json.loads(events[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert json.loads(events[1]) == {"error": error}
    monkeypatch.undo()
    assert _post(url, {**GOOD, "seed": 77})[0] == 200


def test_a_bad_api_key_has_the_openai_code(tiny):
    url, _ = tiny
    code, reply = _post(url, GOOD, key="wrong-key")
    assert code == 401 and reply["error"]["code"] == "invalid_api_key"


def _refused(body: dict, param: str, words: str, limits: Limits = LIMITS) -> None:
    with pytest.raises(RequestError, match=words) as e:
        parse_chat_request(body, limits)
    assert e.value.status == 400 and e.value.param == param, (body, e.value.param)


def test_sampling_fields_take_the_openai_ranges_and_defaults():
    """temperature in [0, 2] (default 1), top_p in (0, 1] (default 1), max_tokens >= 1, seed >= 0, n >= 1, as the
    OpenAI API takes them; a bool is no number."""
    plain = parse_chat_request(GOOD, LIMITS)
    assert (plain.temperature, plain.top_p, plain.seed, plain.n, plain.stop) == (1.0, 1.0, None, 1, [])
    edges = parse_chat_request({**GOOD, "temperature": 2, "top_p": 1, "seed": 0, "n": 2}, LIMITS)
    assert (edges.temperature, edges.top_p, edges.seed, edges.n) == (2.0, 1.0, 0, 2)
    assert parse_chat_request({**GOOD, "top_p": 1e-9, "max_tokens": 1}, LIMITS).max_tokens == 1
    for field, value, words in [
        ("temperature", 2.01, r"temperature must be a number in \[0.0, 2.0\], got 2.01"),
        ("temperature", -0.1, r"temperature must be a number in \[0.0, 2.0\]"),
        ("temperature", True, "temperature must be a number"),
        ("top_p", 0, r"top_p must be a number in \(0.0, 1.0\], got 0"),
        ("top_p", 1.5, "top_p must be a number"),
        ("max_tokens", 0, r"max_tokens must be an integer in \[1, 4096\], got 0"),
        ("max_completion_tokens", 0, r"max_completion_tokens must be an integer in \[1, 4096\]"),
        ("max_tokens", True, "max_tokens must be an integer"),
        ("seed", -1, "seed must be an integer in \\[0, "),
        ("n", 0, r"n must be an integer in \[1, 2\], got 0"),
        ("n", 3, r"n must be an integer in \[1, 2\], got 3"),
        ("n", True, "n must be an integer"),
    ]:
        _refused({**GOOD, field: value}, field, words)


def test_max_completion_tokens_wins_over_the_legacy_max_tokens():
    assert parse_chat_request({**GOOD, "max_completion_tokens": 7, "max_tokens": 3}, LIMITS).max_tokens == 7
    assert parse_chat_request({**GOOD, "max_tokens": 3}, LIMITS).max_tokens == 3


def test_stop_is_at_most_four_non_empty_strings_and_stream_options_needs_stream():
    assert parse_chat_request({**GOOD, "stop": "x"}, LIMITS).stop == ["x"]
    assert parse_chat_request({**GOOD, "stop": list("abcd")}, LIMITS).stop == list("abcd")
    for stop in (list("abcde"), [""], "", ["a", 1]):
        _refused({**GOOD, "stop": stop}, "stop", "stop must be a non-empty string or a list of at most 4")
    _refused({**GOOD, "stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream: true")
    assert parse_chat_request({**GOOD, "stream": True, "stream_options": {"include_usage": True}}, LIMITS).include_usage


def test_a_stop_string_is_at_most_max_stop_chars_long():
    """A stop string of any length was taken: a choice holds back as much streamed text as the longest, and each token
    searched twice that (milliseconds of the decode thread a token with four of 128k characters). Now one over 4,096
    characters is a 400 that names the bound."""
    assert MAX_STOP_CHARS == 4096
    assert parse_chat_request({**GOOD, "stop": ["x" * MAX_STOP_CHARS] * 4}, LIMITS).stop == ["x" * MAX_STOP_CHARS] * 4
    for stop in ("x" * (MAX_STOP_CHARS + 1), ["a", "é" * (MAX_STOP_CHARS + 1)]):
        _refused({**GOOD, "stop": stop}, "stop", "a stop string must be at most 4096 characters, got one of 4097")


def test_inert_values_of_unsupported_fields_must_have_the_inert_type():
    """presence_penalty: 0 asks for nothing; presence_penalty: false is not the OpenAI number 0."""
    assert parse_chat_request({**GOOD, "presence_penalty": 0, "logit_bias": {}}, LIMITS) == parse_chat_request(
        GOOD, LIMITS
    )
    _refused({**GOOD, "presence_penalty": False}, "presence_penalty", "presence_penalty=False is not supported")
    _refused({**GOOD, "tool_choice": 0}, "tool_choice", "tool_choice=0 is not supported")


def test_image_limits_are_inclusive():
    """A request may hold exactly max_images images of exactly max_image_pixels pixels and max_image_bytes bytes;
    one more of any is refused. Images whose tokens fill the whole context leave no room and are refused."""
    url = _png()  # 28 x 28
    size = len(base64.b64decode(url.split(",", 1)[1]))
    image = {"type": "image_url", "image_url": {"url": url}}
    body = {**GOOD, "messages": [{"role": "user", "content": [image, image]}]}
    exact = Limits(context=4096, max_batch=1, max_images=2, max_image_pixels=28 * 28, max_image_bytes=size)
    assert len(parse_chat_request(body, exact).messages[0]["content"]) == 2
    limits = Limits(context=4096, max_batch=1, max_images=1)
    _refused(body, "messages", "more than 1 images in one request", limits)
    part = "messages[0].content[0]"
    limits = Limits(context=4096, max_batch=1, max_image_pixels=28 * 28 - 1)
    _refused(body, part, "28x28 = 784 pixels, over the limit of 783", limits)
    _refused(
        body, part, f"over the limit of {size - 1} bytes", Limits(context=4096, max_batch=1, max_image_bytes=size - 1)
    )
    tokens = lambda w, h: 50  # noqa: E731
    assert parse_chat_request(body, Limits(context=101, max_batch=1, image_tokens=tokens))
    _refused(
        body, "messages", "take 100 tokens, which leaves no room", Limits(context=100, max_batch=1, image_tokens=tokens)
    )


def test_a_malformed_part_is_refused_naming_the_part_and_what_is_wrong(tmp_path):
    """A text part without text, an image_url without a URL, a data:video URL that is not base64 and a local image
    over the byte limit are 400s whose param is the part and whose message says what is wrong with it."""
    part = "messages[0].content[0]"
    for content, words in [
        ({"type": "text", "text": 5}, "a text part needs 'text'"),
        ({"type": "image_url", "image_url": {"url": ""}}, "image_url must be {'url': 'data:image/"),
        ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,!!"}}, "not valid base64"),
    ]:
        _refused(
            {**GOOD, "messages": [{"role": "user", "content": [content]}]},
            part,
            f"^{re.escape(part)}: .*{re.escape(words)}",
        )
    png = base64.b64decode(_png().split(",", 1)[1])
    (tmp_path / "red.png").write_bytes(png)
    image = {"type": "image_url", "image_url": {"url": str(tmp_path / "red.png")}}
    body = {**GOOD, "messages": [{"role": "user", "content": [image]}]}
    limits = Limits(context=4096, max_batch=1, max_image_bytes=len(png), allowed_local_media_path=str(tmp_path))
    assert parse_chat_request(body, limits).messages[0]["content"][0]["image"] == png
    limits = dataclasses.replace(limits, max_image_bytes=len(png) - 1)
    _refused(body, part, f"^{re.escape(part)}: the image is over the limit of {len(png) - 1} bytes$", limits)


def test_video_frame_lists_get_timestamps_from_fps_and_fps_must_be_positive():
    frames = [_png()] * 3
    part = {"type": "video", "video": frames, "fps": 2}
    chat = parse_chat_request({**GOOD, "messages": [{"role": "user", "content": [part]}]}, LIMITS)
    assert chat.messages[0]["content"][0]["timestamps"] == [0.0, 0.5, 1.0]
    for fps in (0, -1, 121):
        body = {**GOOD, "messages": [{"role": "user", "content": [{**part, "fps": fps}]}]}
        _refused(body, "fps", r"fps must be a number in \(0.0, 120.0\]")


def test_data_videos_share_the_spare_frames_with_the_remainder_to_the_first():
    clip = "data:video/mp4;base64," + base64.b64encode(b"not decoded here").decode()
    video = {"type": "video_url", "video_url": {"url": clip}}
    body = {**GOOD, "messages": [{"role": "user", "content": [video, video, video]}]}
    parts = parse_chat_request(body, Limits(context=4096, max_batch=1, max_frames=10)).messages[0]["content"]
    assert [p["max_frames"] for p in parts] == [4, 3, 3]  # one each, then the 7 spare: 3, 2 and 2 more
    assert sum(p["max_frames"] for p in parts) == 10


def test_video_frame_limits_are_inclusive():
    """A request may hold exactly max_frames video frames, as frame lists or data:video URLs (one frame each at the
    least, the budget then shared out); one more is refused."""
    clip = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(b"x").decode()}}
    frames = {"type": "video", "video": [_png()] * 2}
    limits = Limits(context=4096, max_batch=1, max_frames=4)
    for content in ([clip] * 4, [frames, frames], [frames, clip, clip]):
        parts = parse_chat_request({**GOOD, "messages": [{"role": "user", "content": content}]}, limits)
        assert len(parts.messages[0]["content"]) == len(content)
        assert [p["max_frames"] for p in parts.messages[0]["content"] if "max_frames" in p] == [1] * content.count(clip)
    for content in ([clip] * 5, [frames, frames, clip], [clip, frames, frames]):
        body = {**GOOD, "messages": [{"role": "user", "content": content}]}
        _refused(body, "messages", "more than 4 video frames in one request", limits)


def test_a_null_unknown_field_asks_for_nothing():
    assert parse_chat_request({**GOOD, "frobnicate": None}, LIMITS) == parse_chat_request(GOOD, LIMITS)
    message = {"role": "user", "content": "Hi", "tool_call_id": None}
    assert parse_chat_request({**GOOD, "messages": [message]}, LIMITS) == parse_chat_request(GOOD, LIMITS)


def test_a_prompt_of_exactly_the_context_is_refused_as_too_long_and_one_token_less_fits():
    """A prompt that fills the context leaves no room for an answer: a 400 naming it (not the engine's ValueError
    later, a 500); one token less is encoded, and its max_tokens may take the rest of the context exactly."""

    class Processor:  # encodes any messages to ``length`` ids
        length = 0

        def fewest_tokens(self, messages):
            return 0

        def encode(self, messages):
            return type("Encoded", (), {"input_ids": [1] * self.length})()

    engine = type("Engine", (), {"processor": Processor()})()
    chat = parse_chat_request(GOOD, LIMITS)
    engine.processor.length = 64
    with pytest.raises(RequestError, match="the prompt is 64 tokens, which leaves no room") as e:
        app_module._encode(engine, dataclasses.replace(chat, max_tokens=None), 64)
    assert e.value.code == "context_length_exceeded"
    engine.processor.length = 63
    assert len(app_module._encode(engine, dataclasses.replace(chat, max_tokens=None), 64).input_ids) == 63
    assert len(app_module._encode(engine, dataclasses.replace(chat, max_tokens=1), 64).input_ids) == 63
    with pytest.raises(RequestError, match="ask for at most 1 tokens"):
        app_module._encode(engine, dataclasses.replace(chat, max_tokens=2), 64)


def test_a_temperature_under_the_sampler_floor_is_greedy_and_max_tokens_defaults_to_the_room_left():
    """The sampler takes 0 (greedy) or at least MIN_TEMPERATURE: a request's temperature under the floor is greedy, one
    at the floor samples at it; without max_tokens a choice may take the whole room the prompt leaves."""
    from kimivl.inference.sampling import MIN_TEMPERATURE

    def params(**fields):
        return app_module._params(parse_chat_request({**GOOD, **fields}, LIMITS), 100)

    assert params(temperature=MIN_TEMPERATURE / 2).temperature == 0.0
    assert params(temperature=MIN_TEMPERATURE).temperature == MIN_TEMPERATURE
    assert params(temperature=0.7, top_p=0.5, seed=3).temperature == 0.7
    assert (params(top_p=0.5).top_p, params(seed=3).seed, params(max_tokens=7).max_new_tokens) == (0.5, 3, 7)
    assert app_module._params(parse_chat_request({**GOOD, "max_tokens": None}, LIMITS), 100).max_new_tokens == 100
