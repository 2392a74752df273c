"""How the server meets the OpenAI chat completions API at its edges: numbers too large to convert, fields it does not
implement, the streamed chunks' shape, error bodies, the ``developer`` role."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import urllib.error
import urllib.request

import openai
import pytest
from PIL import Image
from test_serve import _post

from kimivl.serve import app as app_module
from kimivl.serve.schema import Limits, RequestError, parse_chat_request

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


def test_a_bad_api_key_has_the_openai_code(tiny):
    url, _ = tiny
    code, reply = _post(url, GOOD, key="wrong-key")
    assert code == 401 and reply["error"]["code"] == "invalid_api_key"
