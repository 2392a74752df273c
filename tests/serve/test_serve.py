"""``kimivl serve`` end to end: the official openai client against a live server on the shipped trained models."""

from __future__ import annotations

import base64
import encodings
import io
import json
import os
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from conftest import MODELS, live_server
from PIL import Image

from kimivl.inference.chat import generate
from kimivl.inference.sampling import SamplingParams
from kimivl.serve.app import HeaderDeadlineProtocol
from kimivl.serve.engine import Request as EngineRequest
from kimivl.serve.reasoning import split_reasoning
from kimivl.serve.schema import Limits, RequestError, parse_chat_request

HELDOUT = Path(__file__).resolve().parents[2] / "examples" / "heldout"


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _questions(task: str, count: int) -> list[tuple[list[dict], list[dict]]]:
    """(OpenAI messages, kimivl messages) of the first ``count`` held-out questions of ``task``."""
    out = []
    for line in (HELDOUT / f"{task}.jsonl").read_text().splitlines()[:count]:
        parts = json.loads(line)["messages"][0]["content"]
        api, local = [], []
        for p in parts:
            if p["type"] == "image":
                api.append({"type": "image_url", "image_url": {"url": _data_url(HELDOUT / p["image"])}})
                local.append({"type": "image", "image": str(HELDOUT / p["image"])})
            else:
                api.append(p)
                local.append(p)
        out.append(([{"role": "user", "content": api}], [{"role": "user", "content": local}]))
    return out


def _client(url: str, key: str = "secret-key") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=30, max_retries=0)


def test_answers_with_images_streamed_and_usage_match_generate(tiny):
    url, engine = tiny
    client = _client(url)
    for api, local in _questions("caption", 2) + _questions("ocr", 1):
        expected = generate(engine.model, engine.processor, local, max_new_tokens=24, temperature=0.0)
        r = client.chat.completions.create(model="kimivl-tiny", messages=api, temperature=0, max_tokens=24)
        assert r.choices[0].message.content == expected and expected.strip()
        assert r.usage.prompt_tokens == len(engine.processor.encode(local).input_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > r.usage.prompt_tokens
        stream = client.chat.completions.create(
            model="kimivl-tiny",
            messages=api,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == r.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_several_choices_stop_strings_and_length(tiny):
    url, _ = tiny
    client = _client(url)
    api, _ = _questions("gui", 1)[0]
    full = client.chat.completions.create(model="kimivl-tiny", messages=api, temperature=0, max_tokens=40)
    answer = full.choices[0].message.content
    assert len(answer) >= 4
    cut = client.chat.completions.create(
        model="kimivl-tiny", messages=api, temperature=0, max_tokens=40, stop=answer[2:4]
    )
    assert cut.choices[0].message.content == answer[:2] and cut.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model="kimivl-tiny", messages=api, temperature=0, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    two = client.chat.completions.create(model="kimivl-tiny", messages=api, temperature=0, max_tokens=40, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.message.content for c in two.choices] == [answer, answer]  # greedy: both choices are the answer
    assert two.usage.completion_tokens == 2 * full.usage.completion_tokens
    sampled = [
        client.chat.completions.create(
            model="kimivl-tiny", messages=api, temperature=1.0, max_tokens=12, n=2, seed=5
        ).choices
        for _ in range(2)
    ]
    assert [c.message.content for c in sampled[0]] == [c.message.content for c in sampled[1]]  # seeded


def test_a_temperature_under_1_samples_as_generate_does(tiny):
    """A temperature between the least one (below it is greedy) and 1 samples: the answer equals generate's with that
    temperature and seed, and differs from the greedy one for some seed."""
    url, engine = tiny
    client = _client(url)
    api, local = _questions("gui", 1)[0]

    def served(seed: int) -> str:
        r = client.chat.completions.create(model="kimivl-tiny", messages=api, temperature=0.7, max_tokens=12, seed=seed)
        return r.choices[0].message.content

    sampled = generate(engine.model, engine.processor, local, max_new_tokens=12, temperature=0.7, seed=5)
    assert served(5) == sampled
    greedy = generate(engine.model, engine.processor, local, max_new_tokens=12, temperature=0.0)
    assert any(served(seed) != greedy for seed in range(5, 9))


def test_choice_i_samples_with_seed_plus_i(tiny):
    url, _ = tiny
    client = _client(url)
    api, _ = _questions("gui", 1)[0]

    def served(seed: int, n: int = 1) -> list[str]:
        r = client.chat.completions.create(
            model="kimivl-tiny", messages=api, temperature=1.0, max_tokens=12, seed=seed, n=n
        )
        return [c.message.content for c in r.choices]

    two = served(5, n=2)
    assert two == served(5) + served(6) and two[0] != two[1]


def _post(url: str, body, key: str | None = "secret-key") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url + "/v1/chat/completions", data, headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _png(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), "red").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _png_header(w: int, h: int) -> str:
    """A PNG that declares w x h pixels and holds none (what a decompression bomb's header says)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _image_msg(*urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": "What is this?"}]}]


def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(tiny, tmp_path):
    url, _ = tiny
    good = {"model": "kimivl-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    (tmp_path / "x.png").write_bytes(base64.b64decode(_png(8, 8).split(",")[1]))
    cases = [
        (b"{not json", 400, "not valid JSON", "secret-key"),
        ({**good, "messages": "hello"}, 400, "messages", "secret-key"),
        ({**good, "temperature": "hot"}, 400, "temperature", "secret-key"),
        ({**good, "max_tokens": -1}, 400, "max_tokens", "secret-key"),
        ({**good, "n": "2"}, 400, "n must be", "secret-key"),
        ({**good, "model": "gpt-4"}, 404, "not served here", "secret-key"),
        ({k: v for k, v in good.items() if k != "model"}, 400, "model is required", "secret-key"),
        ([good], 400, "must be a JSON object", "secret-key"),
        ({**good, "stop": ["a", 3]}, 400, "stop must be", "secret-key"),
        ({**good, "stream": "yes"}, 400, "stream must be", "secret-key"),
        ({**good, "n": 9}, 400, "n must be an integer in [1, 8]", "secret-key"),
        ({**good, "messages": [{"role": "robot", "content": "hi"}]}, 400, "role", "secret-key"),
        (
            {**good, "messages": [{"role": "user", "content": "caf\ud800"}]},
            400,
            "cannot be encoded: the text holds a lone surrogate",
            "secret-key",
        ),
        ({**good, "messages": _image_msg(*[_png(28, 28)] * 9)}, 400, "more than 8 images", "secret-key"),
        ({**good, "messages": _image_msg("data:image/png;base64,aGVsbG8=")}, 400, "accepted format", "secret-key"),
        ({**good, "messages": _image_msg("data:image/png;base64,@@@")}, 400, "not valid base64", "secret-key"),
        ({**good, "messages": _image_msg(_png(5000, 4000))}, 400, "pixels, over the limit", "secret-key"),
        ({**good, "messages": _image_msg("https://example.com/a.png")}, 400, "no remote URLs", "secret-key"),
        ({**good, "messages": _image_msg(str(tmp_path / "x.png"))}, 400, "no remote URLs or local paths", "secret-key"),
        ({**good, "max_tokens": 4090}, 400, "4090 new tokens were asked for: together over the model's", "secret-key"),
        ({**good, "max_completion_tokens": 4090}, 400, "ask for at most", "secret-key"),
        ({**good, "messages": [{"role": "user", "content": "word " * 5000}]}, 400, "leaves no room", "secret-key"),
        ({**good, "messages": _image_msg(_png_header(20000, 20000))}, 400, "over the limit of 16777216", "secret-key"),
        (b"[" * 100_000, 400, "nested too deeply", "secret-key"),
        ({**good, "top_logprobs": 5}, 400, "top_logprobs=5 needs logprobs: true", "secret-key"),
        ({**good, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools=", "secret-key"),
        ({**good, "response_format": {"type": "json_object"}}, 400, "response_format=", "secret-key"),
        ({**good, "frequency_penalty": 0.5}, 400, "frequency_penalty=0.5 is not", "secret-key"),
        ({**good, "max_completion_tokens": 3, "max_tokens": "bad"}, 400, "max_tokens must be", "secret-key"),
        ({**good, "stream_options": {"include_usage": True}}, 400, "only allowed with stream", "secret-key"),
        (good, 401, "API key", "wrong-key"),
        (good, 401, "API key", None),
    ]
    for body, status, words, key in cases:
        code, reply = _post(url, body, key)
        assert code == status and words in reply["error"]["message"], body if isinstance(body, bytes) else words
        if "context" in reply["error"]["message"]:  # the OpenAI code for it
            assert reply["error"]["code"] == "context_length_exceeded"
        code, reply = _post(url, good)
        assert code == 200 and reply["choices"][0]["message"]["content"] is not None
    inert = {"logprobs": False, "tools": [], "tool_choice": "none", "presence_penalty": 0, "logit_bias": {}}
    assert _post(url, {**good, **inert})[0] == 200  # the values that ask for nothing are accepted
    for method, path, status in (
        ("POST", "/v1/completions", 404),
        ("GET", "/v1/chat/completions", 405),
        ("POST", "/v1/chat/completions/", 404),  # a trailing slash: no empty 307 to a URL built from the Host header
        ("GET", "/v1/models/", 404),
    ):
        req = urllib.request.Request(url + path, b"{}" if method == "POST" else None, method=method)
        req.add_header("Authorization", "Bearer secret-key")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        error = json.loads(e.value.read())["error"]
        assert e.value.code == status and path in error["message"] and error["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        _client(url, "wrong").chat.completions.create(**good)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        _client(url).chat.completions.create(**{**good, "max_tokens": -5})


def test_request_bodies_are_parsed_off_the_event_loop(tiny, monkeypatch):
    """The JSON of a request (up to 64 MB) was parsed on the event loop, stalling every stream while it ran; it is
    read on the encoding thread now, with the media it holds."""
    import kimivl.serve.app as served

    threads, loads = [], json.loads

    def recorded(raw, **kwargs):
        if "parse_int" in kwargs:  # the server's parse, not a test client's
            threads.append(threading.current_thread().name)
        return loads(raw, **kwargs)

    monkeypatch.setattr(served.json, "loads", recorded)
    url, _ = tiny
    good = {"model": "kimivl-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert _post(url, good)[0] == 200 and _post(url, b"{not json")[0] == 400
    assert len(threads) == 2 and all(name.startswith("kimivl-encode") for name in threads), threads


def test_time_to_first_token_and_queue_length_count_the_wait_to_be_encoded(tiny, monkeypatch):
    """The time to first token counted from when the engine got the request, after its body was parsed and its media
    decoded on the one encode thread, and the queue gauge counted the engine's queue only: requests held up there (by
    a large video, or behind another request) showed a fast first token and nobody waiting."""
    import kimivl.serve.app as served

    url, _ = tiny
    entered, release, encode = threading.Event(), threading.Event(), served._encode

    def held(*args):
        entered.set()
        assert release.wait(30)
        return encode(*args)

    def metrics() -> dict[str, str]:
        return dict(line.rsplit(" ", 1) for line in _get(url + "/metrics").splitlines() if not line.startswith("#"))

    monkeypatch.setattr(served, "_encode", held)
    before = metrics()
    body = {"model": "kimivl-tiny", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 1}
    with ThreadPoolExecutor(2) as pool:
        try:
            answers = [pool.submit(_post, url, body)]
            assert entered.wait(30)
            answers.append(pool.submit(_post, url, body))  # waits for the encode thread, which the first holds
            deadline = time.monotonic() + 10
            while metrics()["kimivl_queue_length"] != "2":
                assert time.monotonic() < deadline, "the requests waiting to be encoded are not in the queue gauge"
                time.sleep(0.02)
            time.sleep(0.6)
        finally:
            release.set()
        assert [a.result()[0] for a in answers] == [200, 200]
    after = metrics()
    ttft = "kimivl_time_to_first_token_seconds"
    assert int(after[f"{ttft}_count"]) - int(before[f"{ttft}_count"]) == 2
    assert float(after[f"{ttft}_sum"]) - float(before[f"{ttft}_sum"]) >= 1.2  # each waited 0.6 s at least
    assert after[f'{ttft}_bucket{{le="0.5"}}'] == before[f'{ttft}_bucket{{le="0.5"}}']
    assert after["kimivl_queue_length"] == "0"


def test_models_health_and_metrics(tiny):
    url, _ = tiny
    assert [m.id for m in _client(url).models.list()] == ["kimivl-tiny"]
    assert json.loads(_get(url + "/health")) == {"status": "ok"}
    _client(url).chat.completions.create(  # a question the model answers (to "Hi" it ends at once)
        model="kimivl-tiny", messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=3, temperature=0
    )
    text = _get(url + "/metrics")
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert int(values['kimivl_requests_total{outcome="ok"}']) >= 1
    assert int(values["kimivl_completion_tokens_total"]) >= 1 and int(values["kimivl_prompt_tokens_total"]) > 10
    assert int(values["kimivl_time_to_first_token_seconds_count"]) >= 1
    assert values["kimivl_queue_length"] == "0" and "kimivl_batch_size" in values
    deadline = time.monotonic() + 10  # the engine lets the finished rows' cache go after its last step
    while "kimivl_cache_bytes 0\n" not in _get(url + "/metrics"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert int(values['kimivl_requests_total{outcome="rejected"}']) == 0
    # refusals before anything runs are counted too (an alert on failures would see none of them otherwise)
    invalid = int(values['kimivl_requests_total{outcome="invalid"}'])
    for bad in ({"max_tokens": -5}, {"model": "other"}, {"messages": []}):
        with pytest.raises(openai.APIStatusError):
            _client(url).chat.completions.create(
                **{"model": "kimivl-tiny", "messages": [{"role": "user", "content": "Hi"}], **bad}
            )
    text = _get(url + "/metrics")
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert int(values['kimivl_requests_total{outcome="invalid"}']) == invalid + 3


def test_head_answers_every_get_route_with_its_headers_and_no_body(tiny):
    """HEAD (uptime monitors, HAProxy's ``option httpchk HEAD /health``) was a 405 on every route. It answers as GET
    does, without the body (the next answer on the connection reads cleanly), behind the same API key."""
    import http.client

    url, _ = tiny
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    key = {"Authorization": "Bearer secret-key"}
    for path in ("/", "/chat.js", "/health", "/metrics", "/v1/models"):
        conn.request("GET", path, headers=key)
        got = conn.getresponse()
        body = got.read()
        conn.request("HEAD", path, headers=key)  # on the same keep-alive connection, as the GET after it
        head = conn.getresponse()
        assert head.status == got.status == 200 and head.read() == b"", path
        assert head.getheader("Content-Type") == got.getheader("Content-Type"), path
        assert head.getheader("Content-Security-Policy") == got.getheader("Content-Security-Policy"), path
        if path != "/metrics":  # its numbers may change between the two
            assert int(head.getheader("Content-Length")) == len(body) > 0, path
    conn.request("HEAD", "/v1/models")  # no key
    refused = conn.getresponse()
    assert refused.status == 401 and refused.read() == b""
    conn.request("HEAD", "/v1/chat/completions", headers=key)
    refused = conn.getresponse()
    assert refused.status == 405 and refused.getheader("Allow") == "POST" and refused.read() == b""
    conn.request("POST", "/health", headers=key)
    refused = conn.getresponse()
    assert refused.status == 405 and sorted(refused.getheader("Allow").split(", ")) == ["GET", "HEAD"]  # in any order
    assert json.loads(refused.read())["error"]["code"] == "method_not_allowed"
    conn.close()


def test_greedy_answers_under_8_concurrent_clients_equal_the_answers_alone(tiny):
    url, engine = tiny
    client = _client(url)
    questions = [q for task in ("caption", "ocr", "gui", "reasoning") for q, _ in _questions(task, 2)]

    def ask(api):
        r = client.chat.completions.create(model="kimivl-tiny", messages=api, temperature=0, max_tokens=32)
        message = r.choices[0].message
        return getattr(message, "reasoning_content", None), message.content, r.usage.completion_tokens

    alone = [ask(q) for q in questions]
    sizes, step = [], engine._step
    engine._step = lambda batch: (sizes.append(len(batch.rows)), step(batch))
    try:
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, questions))
    finally:
        del engine._step
    assert together == alone
    assert max(sizes) >= 4  # the requests were decoded together
    assert len({a for _, a, _ in alone}) > 4  # different questions, different answers: the rows did not mix


def test_32_concurrent_clients_get_the_answers_alone_with_rows_reusing_free_slots(monkeypatch):
    """32 clients at once on 16 rows: every greedy answer equals the request alone, none fails; waiting prompts are
    prefilled together, and rows of finished requests are taken over by new ones in place (no re-lay of the batch)."""
    from kimivl.serve import engine as engine_module

    placed, place = [], engine_module._Batch._place
    monkeypatch.setattr(engine_module._Batch, "_place", lambda self, *a: (placed.append(a[0]), place(self, *a))[1])
    groups, whole = [], engine_module.Engine._prefill_whole
    monkeypatch.setattr(
        engine_module.Engine, "_prefill_whole", lambda self, g: (groups.append(len(g)), whole(self, g))[1]
    )
    questions = [q for task in ("caption", "ocr", "gui", "chart", "reasoning") for q, _ in _questions(task, 8)][:32]
    with live_server("kimivl-tiny", max_batch=16) as (url, engine):
        client = _client(url, "unused")

        def ask(api):
            r = client.chat.completions.create(model="kimivl-tiny", messages=api, temperature=0, max_tokens=12)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

        alone = [ask(q) for q in questions]
        placed.clear()
        groups.clear()
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(ask, questions))
        assert together == alone
        deadline = time.monotonic() + 10  # the worker counts a request just after its last event
        while engine.metrics.requests["ok"] < 64 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.metrics.requests["error"] == 0 and engine.metrics.requests["ok"] == 64
        assert len(placed) >= 8  # finished rows were reused while the queue still held requests
        assert sum(groups) == 32 and max(groups) >= 4  # waiting prompts were prefilled together
        assert len({a for a, _, _ in alone}) > 8


def test_queue_full_gives_429_then_the_queued_requests_are_served():
    with live_server("kimivl-tiny", max_batch=1, max_queue=2, start=False) as (url, engine):
        body = {"model": "kimivl-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        results = []
        threads = [threading.Thread(target=lambda: results.append(_post(url, body, None))) for _ in range(2)]
        for t in threads:
            t.start()
        for _ in range(3000):
            if engine.metrics.queue_length == 2:
                break
            threading.Event().wait(0.01)
        with pytest.raises(urllib.error.HTTPError, match="503"):
            _get(url + "/health")  # the worker is not running yet
        code, reply = _post(url, body, None)
        assert code == 429 and "queue is full" in reply["error"]["message"]
        with pytest.raises(openai.RateLimitError):
            _client(url).chat.completions.create(**body)
        engine.start()
        for t in threads:
            t.join(timeout=30)
        assert [code for code, _ in results] == [200, 200]
        assert engine.metrics.requests["rejected"] == 2 and engine.metrics.queue_length == 0
        assert _post(url, body, None)[0] == 200


def test_a_disconnected_stream_frees_its_slot():
    """The greedy answer to this question loops without end; a client that leaves after the first event frees the
    only slot (max_batch=1), so the next request is answered at once instead of after 3000 tokens."""
    with live_server("kimivl-tiny", max_batch=1) as (url, engine):
        api, _ = _questions("reasoning", 1)[0]
        body = {"model": "kimivl-tiny", "messages": api, "temperature": 0, "max_tokens": 3000, "stream": True}
        req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(), method="POST")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as r:
            r.readline()  # the first event: the request is running
        _check_cancelled_and_slot_free(url, engine)


def test_a_client_that_hangs_up_on_a_plain_request_frees_its_slot():
    """As above, without streaming: the server notices the closed connection while the answer is being generated."""
    import socket

    with live_server("kimivl-tiny", max_batch=1) as (url, engine):
        api, _ = _questions("reasoning", 1)[0]
        body = json.dumps({"model": "kimivl-tiny", "messages": api, "temperature": 0, "max_tokens": 3000}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            _wait_for(lambda: engine.metrics.completion_tokens == 0 and engine.metrics.batch_size == 1)
            assert engine.metrics.batch_size == 1  # it is decoding
        _check_cancelled_and_slot_free(url, engine)


def _wait_for(condition, seconds: float = 10.0) -> None:
    """Poll ``condition`` every 10 ms until it holds or ``seconds`` pass (the caller asserts what it needs)."""
    wait = threading.Event()
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        wait.wait(0.01)


def _check_cancelled_and_slot_free(url: str, engine) -> None:
    """The long request was cancelled, not completed, and its slot (the only one) answers the next request at once."""
    _wait_for(lambda: engine.metrics.requests["cancelled"])
    assert engine.metrics.requests["cancelled"] == 1 and engine.metrics.requests["ok"] == 0
    r = _client(url).chat.completions.create(
        model="kimivl-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, timeout=10
    )
    assert r.choices[0].message.content is not None and engine.metrics.completion_tokens < 3000


def _mp4(colours: list[tuple[int, int, int]], rate: int = 10) -> bytes:
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        stream = c.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for colour in colours:
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), colour, np.uint8), format="rgb24")
            c.mux(stream.encode(frame))
        c.mux(stream.encode())
    return buf.getvalue()


def test_video_as_a_list_of_frames_equals_generate_on_the_frames(tiny):
    url, engine = tiny
    client = _client(url)
    for line in (HELDOUT / "video.jsonl").read_text().splitlines()[:2]:
        video, question = json.loads(line)["messages"][0]["content"]
        frames = [HELDOUT / f for f in video["frames"]]
        local = [{"role": "user", "content": [{**video, "frames": [str(f) for f in frames]}, question]}]
        expected = generate(engine.model, engine.processor, local, max_new_tokens=16, temperature=0.0)
        urls = [_data_url(f) for f in frames]
        for part in (
            {"type": "video", "video": urls, "timestamps": video["timestamps"]},
            {"type": "video_url", "video_url": {"url": urls}},  # default 1 frame per second: the same timestamps
        ):
            r = client.chat.completions.create(
                model="kimivl-tiny",
                messages=[{"role": "user", "content": [part, question]}],
                temperature=0,
                max_tokens=16,
            )
            assert r.choices[0].message.content == expected and expected.strip()
            assert r.usage.prompt_tokens == len(engine.processor.encode(local).input_ids)
    clip = _mp4([(200, 40, 40)] * 10 + [(40, 40, 200)] * 10)  # 2 s at 10 fps: red, then blue
    local = [{"role": "user", "content": [{"type": "video", "video": clip}, {"type": "text", "text": "What colour?"}]}]
    expected = generate(engine.model, engine.processor, local, max_new_tokens=16, temperature=0.0)
    part = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(clip).decode()}}
    r = client.chat.completions.create(
        model="kimivl-tiny",
        messages=[{"role": "user", "content": [part, {"type": "text", "text": "What colour?"}]}],
        temperature=0,
        max_tokens=16,
    )
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(engine.processor.encode(local).input_ids)  # sampled as generate does
    good = {"model": "kimivl-tiny", "max_tokens": 3}
    for part, words in [
        ({"type": "video", "video": [_png(28, 28)], "timestamps": [1e308]}, "under 360000"),
        ({"type": "video", "video": [_png(28, 28)] * 2, "fps": 1e-308}, "under 360000"),
        ({"type": "video", "video": []}, "non-empty list of frame URLs"),
        ({"type": "video", "video": [_png(28, 28)] * 65}, "more than 64 video frames"),
        ({"type": "video", "video": ["https://example.com/a.png"]}, "no remote URLs"),
        ({"type": "video", "video": [_png(28, 28)], "timestamps": [0, 1]}, "one per frame"),
        ({"type": "video", "video": [_png(28, 28)], "timestamps": [-1]}, "timestamps must be finite"),
        ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,aGVsbG8="}}, "cannot open video"),
    ]:
        code, reply = _post(url, {**good, "messages": [{"role": "user", "content": [part]}]})
        assert code == 400 and words in reply["error"]["message"], (words, reply)
    assert _post(url, {**good, "messages": [{"role": "user", "content": "Hi"}]})[0] == 200


def test_a_thinking_model_splits_reasoning_from_the_answer():
    with live_server("kimivl-tiny-thinking") as (url, engine):
        client = _client(url)
        api, local = _questions("reasoning", 1)[0]
        expected = generate(engine.model, engine.processor, local, max_new_tokens=160, temperature=0.0)
        reasoning, answer = split_reasoning(expected)
        assert reasoning, "the thinking model is expected to think on a reasoning question"
        r = client.chat.completions.create(model="kimivl-tiny-thinking", messages=api, temperature=0, max_tokens=160)
        message = r.choices[0].message
        assert message.reasoning_content == reasoning and message.content == answer
        chunks = list(
            client.chat.completions.create(
                model="kimivl-tiny-thinking", messages=api, temperature=0, max_tokens=160, stream=True
            )
        )
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning
        assert "".join(d.content or "" for d in deltas) == answer
        assert (MODELS / "kimivl-tiny-thinking").is_dir()


def test_a_failing_request_fails_alone_and_the_server_keeps_serving(tiny):
    """A prompt the model cannot embed (a token id past the vocabulary) fails in prefill: its client gets the error,
    while requests around it are answered."""
    url, engine = tiny
    events, done = [], threading.Event()

    def emit(event):
        events.append(event)
        done.set()

    vocab = engine.model.config.text_config.vocab_size
    params = SamplingParams(max_new_tokens=4)
    errors_before = engine.metrics.requests["error"]
    with ThreadPoolExecutor(2) as pool:
        answer = pool.submit(_post, url, {"model": "kimivl-tiny", "messages": [{"role": "user", "content": "Hi"}]})
        engine.submit(EngineRequest([1, 2, vocab + 5], None, None, params, emit))
        assert done.wait(30) and events[0][0] == "error" and "prefill failed" in events[0][1]
        assert answer.result(timeout=30)[0] == 200
    assert engine.metrics.requests["error"] == errors_before + 1
    assert (
        _post(url, {"model": "kimivl-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})[0] == 200
    )


def test_serve_binds_to_loopback_by_default_and_checks_its_numbers(capsys):
    from kimivl.cli import build_parser, main

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.api_key, args.max_batch) == ("127.0.0.1", 8000, None, 8)
    assert main(["serve", "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--port", "70000"]) == 2  # was a 72-line OverflowError, after loading the model
    assert "--port must be at most 65535, got 70000" in capsys.readouterr().err
    assert main(["serve", "--allowed-local-media-path", "/no/such/dir"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["serve", "--shutdown-timeout", "nan"]) == 2
    assert "--shutdown-timeout must be a number of seconds >= 0, got nan" in capsys.readouterr().err
    assert main(["serve", "--max-queue", "60", "--limit-concurrency", "68"]) == 2  # 8 running + 60 waiting
    assert "--limit-concurrency must be over --max-batch + --max-queue (68)" in capsys.readouterr().err


def test_every_spelling_of_a_loopback_host_is_loopback():
    """``--host 127.1``, ``LOCALHOST`` or ``::ffff:127.0.0.1`` bind loopback but turned the Host guard off."""
    from kimivl.cli import _loopback

    for host in ("127.0.0.1", "127.1", "127.0.0.2", "2130706433", "localhost", "LOCALHOST", "::1", "[::1]"):
        assert _loopback(host), host
    for host in ("::ffff:127.0.0.1", "[::FFFF:127.0.0.1]", "::ffff:7f00:1"):
        assert _loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "::ffff:10.0.0.1", "", "0"):
        assert not _loopback(host), host


def test_a_host_that_also_resolves_to_a_public_address_is_not_loopback(monkeypatch):
    """The bind listens on every address the host resolves to: one public address among loopback ones makes the
    server public, and its Host guard (loopback names only) must be off, as for ``0.0.0.0``."""
    import socket

    from kimivl.cli import _loopback

    found = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 0)) for address in ("127.0.1.1", "192.0.2.7")]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: found)
    assert not _loopback("myhost")
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: found[:1])
    assert _loopback("myhost")


def test_local_media_only_under_the_allowed_directory_and_byte_limits(tmp_path):
    media, outside = tmp_path / "media", tmp_path / "secret.png"
    media.mkdir()
    png = base64.b64decode(_png(28, 28).split(",")[1])
    (media / "ok.png").write_bytes(png)
    outside.write_bytes(png)
    (media / "link.png").symlink_to(outside)
    big = Image.effect_noise((64, 64), 80).convert("RGB")
    buf = io.BytesIO()
    big.save(buf, "PNG")
    assert len(buf.getvalue()) > 2000
    limits = Limits(context=4096, max_batch=8, max_image_bytes=2000, allowed_local_media_path=str(media))
    with live_server("kimivl-tiny", limits=limits, max_body_bytes=20000) as (url, _):
        good = {"model": "kimivl-tiny", "max_tokens": 3}
        for image in (str(media / "ok.png"), "file://" + str(media / "ok.png"), _png(28, 28)):
            assert _post(url, {**good, "messages": _image_msg(image)}, None)[0] == 200
        for image, words in [
            (str(outside), "not a file under the allowed local media path"),
            (str(media / "link.png"), "not a file under the allowed local media path"),
            (str(media / "../secret.png"), "not a file under the allowed local media path"),
            ("http://127.0.0.1:1/x.png", "no remote URLs"),
            ("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), "over the limit of 2000 bytes"),
        ]:
            code, reply = _post(url, {**good, "messages": _image_msg(image)}, None)
            assert code == 400 and words in reply["error"]["message"], words
        code, reply = _post(url, {**good, "messages": [{"role": "user", "content": "x" * 30000}]}, None)
        assert code == 413 and "over the limit of 20000 bytes" in reply["error"]["message"]
        assert _post(url, {**good, "messages": [{"role": "user", "content": "Hi"}]}, None)[0] == 200


def test_kimivl_serve_runs_uvicorn_on_loopback_with_the_app(monkeypatch):
    import uvicorn

    from kimivl import cli
    from kimivl.cli import main

    calls, listened = [], []

    def run(server, sockets):
        kw = {k: getattr(server.config, k) for k in ("host", "port", "timeout_graceful_shutdown", "limit_concurrency")}
        calls.append((server.config.app, {**kw, "http": server.config.http}))
        listened.append(sockets)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setattr(cli, "_listen", lambda host, port: [])  # port 8000 may be in use here
    model = str(MODELS / "kimivl-tiny")
    assert main(["serve", "--model", model, "--device", "cpu", "--max-batch", "2", "--port", "8123"]) == 0
    ((app, kw),) = calls
    assert kw["host"] == "127.0.0.1" and kw["port"] == 8123 and kw["timeout_graceful_shutdown"] == 25
    # 2 running + 64 waiting (the default --max-queue) + 1024 idle; stalled headers are closed
    assert kw["limit_concurrency"] == 2 + 64 + 1024 and kw["http"] is HeaderDeadlineProtocol
    calls.clear()  # a long queue raises the default with it (a fixed 1024 refused --max-queue 1024 at start)
    assert main(["serve", "--model", model, "--device", "cpu", "--max-batch", "32", "--max-queue", "1024"]) == 0
    assert calls[0][1]["limit_concurrency"] == 32 + 1024 + 1024
    assert main(["serve", "--model", model, "--device", "cpu", "--allowed-host", "chat.example.org"]) == 0
    from fastapi.testclient import TestClient

    client = TestClient(calls[-1][0])  # on loopback: the loopback names and the reverse proxy's, no other
    for host, status in (("Chat.Example.org", 200), ("LOCALHOST:8000", 200), ("rebind.example", 421)):
        assert client.get("/v1/models", headers={"host": host}).status_code == status, host
    for bind in ("127.0.0.2", "::1", "127.1", "0.0.0.0"):  # any loopback address is guarded, its own name let in
        assert main(["serve", "--model", model, "--device", "cpu", "--host", bind]) == 0
        client = TestClient(calls[-1][0])
        assert client.get("/v1/models", headers={"host": "rebind.example"}).status_code == (
            200 if bind == "0.0.0.0" else 421
        ), bind
        assert client.get("/v1/models", headers={"host": f"[{bind}]:80" if ":" in bind else bind}).status_code == 200
    assert {r.path for r in app.routes} >= {"/v1/chat/completions", "/v1/models", "/health", "/metrics"}
    from kimivl.serve.engine import Engine

    stopped = []  # a forced quit (a second Ctrl-C) skipped the app's shutdown: the process aborted in torch
    monkeypatch.setattr(Engine, "shutdown", lambda self: stopped.append(self))
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: (_ for _ in ()).throw(SystemExit(1)))
    with pytest.raises(SystemExit):
        main(["serve", "--model", model, "--device", "cpu"])
    assert len(stopped) == 1


def test_the_chat_page_starts_from_the_models_recommended_sampling(monkeypatch, tmp_path):
    """The page's temperature and max tokens were 0.7 and 512 for every model, while ``kimivl chat`` starts from the
    model's generation_config.json (a thinking model's 1024 tokens of reasoning were cut at 512 on the page). ``kimivl
    serve`` fills them (and the top-p the page sends) from the file, else with chat's own 0.2, 512 and 1."""
    import re

    import uvicorn
    from fastapi.testclient import TestClient

    from kimivl import cli
    from kimivl.cli import main

    apps = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: apps.append(server.config.app))
    monkeypatch.setattr(cli, "_listen", lambda host, port: [])
    bare, nucleus, hot = tmp_path / "bare", tmp_path / "nucleus", tmp_path / "hot"  # the thinking model, other files
    for folder in (bare, nucleus, hot):
        folder.mkdir()
        for file in (MODELS / "kimivl-tiny-thinking").iterdir():
            if file.name != "generation_config.json":
                (folder / file.name).symlink_to(file)
    (nucleus / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.5, "top_p": 0.9}')
    (hot / "generation_config.json").write_text('{"do_sample": true, "temperature": 2.5}')  # chat's; the API's max 2
    for model, expected in (
        (MODELS / "kimivl-tiny-thinking", [0.8, 1024, 1.0]),
        (MODELS / "kimivl-tiny", [0.2, 512, 1.0]),
        (bare, [0.2, 512, 1.0]),
        (nucleus, [0.5, 512, 0.9]),
        (hot, [2.0, 512, 1.0]),  # 2.5 made the page's every request a 400
    ):
        assert main(["serve", "--model", str(model), "--device", "cpu"]) == 0
        page = TestClient(apps[-1]).get("/", headers={"host": "127.0.0.1"})
        assert page.status_code == 200
        inputs = dict(re.findall(r'<input id="([\w-]+)"[^>]*value="([^"]*)"', page.text))
        found = {i: float(inputs[i]) for i in ("temperature", "max-tokens", "top-p") if i in inputs}
        assert found == dict(zip(("temperature", "max-tokens", "top-p"), expected)), model


def test_allowed_hosts_are_read_as_the_host_guard_reads_a_host(monkeypatch, capsys):
    """``--allowed-host kimi.example.com:8443`` or ``[fd00::1]`` was accepted and never matched (421 for all): the
    guard compares a request's Host without its port and brackets. Brackets and case are dropped now; a port is
    refused before the model loads."""
    import uvicorn

    from kimivl import cli
    from kimivl.cli import main

    apps = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: apps.append(server.config.app))
    monkeypatch.setattr(cli, "_listen", lambda host, port: [])
    model = str(MODELS / "kimivl-tiny")
    for given in ("kimi.example.com:8443", "[fd00::1]:8443", "[fd00::1", ""):
        assert main(["serve", "--model", model, "--allowed-host", given]) == 2
        assert (
            f"--allowed-host takes a host name or address without a port (requests to it are let in on any "
            f"port), e.g. kimi.example.com or [fd00::1], got {given!r}" in capsys.readouterr().err
        )
    assert apps == []  # refused before loading
    flags = ["--allowed-host", "Kimi.Example.com", "--allowed-host", "[FD00::1]", "--allowed-host", "fd00::2"]
    assert main(["serve", "--model", model, "--device", "cpu", *flags]) == 0
    from fastapi.testclient import TestClient

    client = TestClient(apps[0])
    for host in ("kimi.example.com:8443", "KIMI.example.com", "[fd00::1]", "[fd00::1]:8443", "[fd00::2]:80"):
        assert client.get("/v1/models", headers={"host": host}).status_code == 200, host
    for host in ("example.com", "[fd00::3]", "kimi.example.com.evil"):
        assert client.get("/v1/models", headers={"host": host}).status_code == 421, host


def test_kimivl_serve_takes_an_ipv6_host_in_brackets(monkeypatch):
    """``--host [::1]`` (as a URL writes it, and as the Host guard lists it) was "Name or service not known"."""
    import socket

    import uvicorn

    from kimivl.cli import main

    bound, guarded = [], []

    def run(server, sockets):
        bound.extend(sock.getsockname()[0] for sock in sockets)
        guarded.append(server.config.app)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    assert main(["serve", "--model", str(MODELS / "kimivl-tiny"), "--device", "cpu", "--host", "[::1]"]) == 0
    assert bound == ["::1"]
    from fastapi.testclient import TestClient

    assert TestClient(guarded[0]).get("/v1/models", headers={"host": "[::1]:8000"}).status_code == 200


def test_kimivl_serve_holds_its_port_while_the_model_loads(monkeypatch):
    """The port was checked free, then let go for the load (minutes for the A3B): a server started meanwhile took it,
    and uvicorn failed with its own error after the load. The port is held from the check to the end; a connection
    made during the load is answered once the server runs, on the sockets opened before."""
    import socket

    import uvicorn

    from kimivl import cli
    from kimivl.cli import main

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    load, taken, served = cli._load, [], []

    def loading(*args):
        with socket.socket() as other:  # another server starting on the port while the model loads
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            taken.append(other.connect_ex(("127.0.0.1", port)) == 0)
            with pytest.raises(OSError):
                other.bind(("127.0.0.1", port))
        return load(*args)

    def run(server, sockets):
        served.extend((s.getsockname()[1], s.fileno() != -1) for s in sockets)

    monkeypatch.setattr(cli, "_load", loading)
    monkeypatch.setattr(uvicorn.Server, "run", run)
    model = str(MODELS / "kimivl-tiny")
    assert main(["serve", "--model", model, "--device", "cpu", "--port", str(port)]) == 0
    assert taken == [True] and served == [(port, True)]
    with socket.socket() as after:  # let go when the server ends
        after.bind(("127.0.0.1", port))


def test_a_port_just_served_on_can_be_listened_on_again():
    """A server stopped after answering a connection leaves that connection in TIME_WAIT on its port for 60 s: a
    restart meanwhile was refused ('another server listens there') without SO_REUSEADDR, which uvicorn sets too."""
    import socket

    from kimivl.serve.listen import open_sockets

    (server,) = open_sockets("127.0.0.1", 0)
    port = server.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        answered, _ = server.accept()
        answered.close()  # the server closes first: its side waits in TIME_WAIT once the client closes
        assert client.recv(1) == b""
    server.close()
    with socket.socket() as plain, pytest.raises(OSError):  # the port is still taken for a bind without the option
        plain.bind(("127.0.0.1", port))
    for sock in open_sockets("127.0.0.1", port):
        assert sock.getsockname()[1] == port
        sock.close()


def test_a_data_video_carries_the_servers_bound_on_decoded_frames():
    clip = "data:video/mp4;base64," + base64.b64encode(_mp4([(200, 40, 40)] * 10)).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": clip}}]}]}
    chat = parse_chat_request(body, Limits(context=4096, max_batch=2, max_decoded_frames=5))
    assert chat.messages[0]["content"][0]["max_decoded"] == 5
    assert Limits(context=4096, max_batch=2).max_decoded_frames == 9000


def test_data_videos_share_one_frame_and_decode_budget_per_request():
    from kimivl.processing.chat_template import apply_chat_template
    from kimivl.processing.video import VideoError

    clip = "data:video/mp4;base64," + base64.b64encode(_mp4([(200, 40, 40)] * 80, rate=1)).decode()  # 80 s
    video = {"type": "video_url", "video_url": {"url": clip}}
    listed = {"type": "video", "video": [_png(28, 28)] * 4}  # 4 frames sent as images
    body = {"messages": [{"role": "user", "content": [video, listed, video, video]}]}
    limits = Limits(context=100_000, max_batch=1)
    parts = [p for p in parse_chat_request(body, limits).messages[0]["content"] if "video" in p]
    assert [p["max_frames"] for p in parts] == [20, 20, 20]  # the 60 frames the list left, shared
    assert [p["max_decoded"] for p in parts] == [3000] * 3
    assert [p["max_decoded_pixels"] for p in parts] == [9000 * 1280 * 720 // 3] * 3
    chat = parse_chat_request(body, limits)
    assert len(apply_chat_template(chat.messages)[1]) == 64  # every frame of the request, the limit and no more
    body = {"messages": [{"role": "user", "content": [video, video]}]}
    chat = parse_chat_request(body, Limits(context=100_000, max_batch=1, max_decoded_frames=100))
    with pytest.raises(VideoError, match="more than 50 frames to decode"):  # 80 each, 100 for the two
        apply_chat_template(chat.messages)
    chat = parse_chat_request(body, Limits(context=100_000, max_batch=1, max_decoded_pixels=100 * 64 * 48))
    with pytest.raises(VideoError, match="more than max_decoded_pixels=153600 pixels"):
        apply_chat_template(chat.messages)
    with pytest.raises(RequestError, match="2 data:video URLs, but a request may decode only 1 frames"):
        parse_chat_request(body, Limits(context=100_000, max_batch=1, max_decoded_frames=1))


def test_an_icon_is_refused_before_its_embedded_png_is_decoded(monkeypatch):
    from PIL import PngImagePlugin

    def never(*args, **kwargs):
        raise AssertionError("the icon's embedded PNG was decoded")

    buf = io.BytesIO()
    Image.new("RGBA", (300, 300)).save(buf, "PNG")
    png = buf.getvalue()
    icon = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", never)
    url = "data:image/x-icon;base64," + base64.b64encode(icon).decode()
    with pytest.raises(RequestError, match="looks like ICO, a format not accepted here"):
        parse_chat_request({"messages": _image_msg(url)}, Limits(context=4096, max_batch=1))


def test_a_data_video_carries_the_servers_pixel_limit_and_is_refused_before_decoding():
    from kimivl.processing.chat_template import apply_chat_template
    from kimivl.processing.video import VideoError

    clip = "data:video/mp4;base64," + base64.b64encode(_mp4([(200, 40, 40)] * 3)).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": clip}}]}]}
    chat = parse_chat_request(body, Limits(context=4096, max_batch=2, max_image_pixels=1000))
    assert chat.messages[0]["content"][0]["max_frame_pixels"] == 1000
    with pytest.raises(VideoError, match="pixels, over max_frame_pixels=1000"):  # a 400, as every ValueError
        apply_chat_template(chat.messages)
    chat = parse_chat_request(body, Limits(context=4096, max_batch=2))
    assert chat.messages[0]["content"][0]["max_frame_pixels"] == 1 << 24
    assert len(apply_chat_template(chat.messages)[1]) == 1


def test_images_in_formats_outside_the_allow_list_are_refused_unopened(monkeypatch):
    from PIL import EpsImagePlugin

    def never(*args, **kwargs):
        raise AssertionError("the EPS plugin was asked to open client bytes")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", never)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    url = "data:image/eps;base64," + base64.b64encode(eps).decode()
    with pytest.raises(RequestError, match=r"content\[0\]: image <58 bytes> looks like EPS, a format not accepted"):
        parse_chat_request({"messages": _image_msg(url)}, Limits(context=4096, max_batch=2))


def _raw(url: str, request: bytes, timeout: float = 30) -> bytes:
    """Send raw HTTP bytes; the response's bytes (until the server closes or ``timeout``)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
            if b"\r\n\r\n" in out and b"content-length" in out.lower():
                head, _, body = out.partition(b"\r\n\r\n")
                length = int(
                    next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
                )
                if len(body) >= length:
                    return out
    return out


def test_foreign_sites_cannot_drive_a_loopback_server(tmp_path):
    """A page elsewhere could POST text/plain (no preflight) and spend compute, and a name re-pointed at 127.0.0.1
    (DNS rebinding) could read answers and /metrics; keys: scheme case, empty keys."""
    from kimivl.serve.app import LOOPBACK_NAMES

    body = json.dumps({"model": "kimivl-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    with live_server("kimivl-tiny", api_key="k3y", hosts=LOOPBACK_NAMES) as (url, _):
        port = url.rsplit(":", 1)[1]

        def post(host: str, kind: str = "application/json", auth: str = "Bearer k3y") -> bytes:
            head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: {kind}\r\n"
            head += f"Authorization: {auth}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            return _raw(url, head.encode() + body.encode())

        assert post(f"127.0.0.1:{port}").startswith(b"HTTP/1.1 200")
        assert post(f"localhost:{port}", auth="bearer k3y").startswith(b"HTTP/1.1 200")  # the scheme's case is free
        assert post(f"[::1]:{port}", auth="BEARER  k3y").startswith(b"HTTP/1.1 200")
        assert post(f"rebind.attacker.example:{port}").startswith(b"HTTP/1.1 421")
        head = b"HEAD /health HTTP/1.1\r\nHost: rebind.attacker.example\r\nConnection: close\r\n\r\n"
        assert _raw(url, head).startswith(b"HTTP/1.1 421")  # HEAD passes the same guard
        reply = post(f"127.0.0.1:{port}", kind="text/plain")
        assert reply.startswith(b"HTTP/1.1 415") and b"Content-Type: application/json" in reply
        assert post(f"127.0.0.1:{port}", auth="Basic k3y").startswith(b"HTTP/1.1 401")
        with urllib.request.urlopen(url, timeout=10) as r:  # the page: its own scripts only, never framed
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
            assert r.headers["X-Content-Type-Options"] == "nosniff"
    from kimivl.cli import main

    for key in ("", " k", "clé"):
        with pytest.raises(ValueError, match="printable ASCII"):
            create_app_check(key)
        assert main(["serve", "--api-key", key]) == 2


CHAT_BODY = json.dumps({"model": "kimivl-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})


def _chat_raw(url: str, headers: str, data: bytes = CHAT_BODY.encode()) -> tuple[str, dict, dict]:
    """POST ``data`` to /v1/chat/completions after the raw header lines ``headers``: (status line, header fields in
    lower case, the JSON body)."""
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret-key\r\n"
    reply = _raw(url, f"{head}{headers}Connection: close\r\n\r\n".encode() + data)
    top, _, payload = reply.partition(b"\r\n\r\n")
    status, *lines = top.decode("latin-1").split("\r\n")
    return status, {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}, json.loads(payload)


def test_malformed_http_gets_the_openai_error_json():
    """A negative or conflicting Content-Length, or Transfer-Encoding: identity, got uvicorn's plain-text "Invalid HTTP
    request received.", where the docs promise every bad request the OpenAI error JSON."""
    json_type = f"Content-Type: application/json\r\nContent-Length: {len(CHAT_BODY)}\r\n"
    with live_server("kimivl-tiny", server_options={"http": HeaderDeadlineProtocol}) as (url, _):
        for bad in (
            "Content-Type: application/json\r\nContent-Length: -1\r\n",
            f"{json_type}Content-Length: {len(CHAT_BODY) + 1}\r\n",
            f"Transfer-Encoding: identity\r\n{json_type}",
        ):
            status, fields, error = _chat_raw(url, bad)
            assert status == "HTTP/1.1 400 Bad Request" and fields["content-type"] == "application/json", bad
            assert fields["connection"] == "close" and error["error"]["type"] == "invalid_request_error"
            assert error["error"]["message"].startswith("the request is not valid HTTP/1.1"), bad
        assert _chat_raw(url, json_type)[0] == "HTTP/1.1 200 OK"
        import socket  # the connection closes after the 400 (what follows in it cannot be framed), asked or not

        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=3) as conn:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
            reply = b""
            while chunk := conn.recv(65536):  # a socket left open would time out here
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 400 Bad Request")


def test_compressed_or_non_utf8_bodies_are_refused_with_415(tiny):
    """A gzip body was read as JSON ("'utf-8' codec can't decode byte 0x8b"), and one declared latin-1 as UTF-8."""
    import gzip

    url, _ = tiny
    packed = gzip.compress(CHAT_BODY.encode())
    for coding in ("gzip", "GZIP", "br, gzip"):
        headers = f"Content-Encoding: {coding}\r\nContent-Type: application/json\r\nContent-Length: {len(packed)}\r\n"
        status, fields, error = _chat_raw(url, headers, packed)
        assert status == "HTTP/1.1 415 Unsupported Media Type" and fields["content-type"] == "application/json"
        message = (
            f"content encodings are not supported (Content-Encoding: {coding.lower()}): send the body uncompressed"
        )
        assert error["error"]["message"] == message
    for kind, charset in (
        ("application/json; charset=latin-1", "latin-1"),
        ('Application/JSON;Charset="UTF-16"', "UTF-16"),
        ("application/json; charset=no-such-thing", "no-such-thing"),
    ):
        cached = len(encodings._cache)  # codecs.lookup kept every label asked about: a client could fill memory
        status, _, error = _chat_raw(url, f"Content-Type: {kind}\r\nContent-Length: {len(CHAT_BODY)}\r\n")
        assert status == "HTTP/1.1 415 Unsupported Media Type" and len(encodings._cache) == cached, kind
        message = f"the request body must be UTF-8 JSON (charset=utf-8), got charset={charset!r}"
        assert error["error"]["message"] == message
    # utf8 (a common alias) and ASCII (a subset) label UTF-8 bodies too
    for kind in (
        "application/json; charset=UTF-8",
        'application/json;charset="utf-8"',
        "application/json; charset=utf8",
        "application/json; charset=US-ASCII",
        "application/json; charset=U8",
    ):
        for coding in ("", "Content-Encoding: identity\r\n"):
            headers = f"{coding}Content-Type: {kind}\r\nContent-Length: {len(CHAT_BODY)}\r\n"
            status, _, answer = _chat_raw(url, headers)
            assert status == "HTTP/1.1 200 OK" and answer["object"] == "chat.completion", kind


def create_app_check(key: str) -> None:
    from kimivl.serve.app import check_api_key

    check_api_key(key)


def test_stalled_oversized_and_image_heavy_bodies_are_refused_early(monkeypatch):
    """A body that stalls held its buffer (up to 64 MiB) for good; a declared size over the limit was read to the
    limit first; images whose headers already overflow the context were all decoded first (42 s, 2 GB)."""
    import kimivl.serve.app as app_module

    monkeypatch.setattr(app_module, "BODY_IDLE_SECONDS", 1)
    with live_server("kimivl-tiny", max_body_bytes=10_000_000) as (url, _):
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
        )
        start = time.monotonic()
        reply = _raw(url, (head + "Content-Length: 1000\r\n\r\n").encode() + b'{"model":')  # then nothing
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 10
        reply = _raw(url, (head + "Content-Length: 999999999\r\n\r\n").encode())
        assert reply.startswith(b"HTTP/1.1 413")
        big = _png(1792, 1792)  # 1,024 tokens each: the fourth fills the 4,096-token context
        code, reply = _post(url, {"model": "kimivl-tiny", "messages": _image_msg(*[big] * 6), "max_tokens": 2}, None)
        assert code == 400 and reply["error"]["code"] == "context_length_exceeded"
        assert "the images up to messages[0].content[3] take 4096 tokens" in reply["error"]["message"]


def test_text_that_cannot_fit_the_context_is_refused_without_tokenizing_it(monkeypatch):
    """Megabytes of text were tokenized (seconds on the one encode thread, every other request waiting) before the
    prompt was found over the context; text whose characters over the longest token's bytes reach it is refused
    unread."""
    from kimivl.processing.processor import KimiVLProcessor

    encoded, encode = [], KimiVLProcessor.encode
    monkeypatch.setattr(KimiVLProcessor, "encode", lambda self, *a, **k: encoded.append(1) or encode(self, *a, **k))
    with live_server("kimivl-tiny") as (url, engine):
        longest = engine.processor.tokenizer.longest_token
        assert longest == max(len(t) for t in engine.processor.tokenizer.mergeable_ranks)
        parts = [{"type": "text", "text": "x" * (2048 * longest)}] * 2  # 4,096 tokens at the least
        code, reply = _post(url, {"model": "kimivl-tiny", "messages": [{"role": "user", "content": parts}]}, None)
        assert code == 400 and reply["error"]["code"] == "context_length_exceeded" and not encoded
        assert "the messages hold at least 4096 tokens of text" in reply["error"]["message"]
        code, reply = _post(url, {"model": "kimivl-tiny", "messages": [{"role": "user", "content": "hi"}]}, None)
        assert code == 200 and encoded == [1]


def test_connections_whose_headers_stall_are_closed_and_their_number_bounded(monkeypatch):
    """Sockets that never finished their headers were kept for good (about 20,000 exhausted the file descriptors);
    now each is closed ``HEADER_SECONDS`` after it opened or after its last answer, and past ``limit_concurrency``
    connections a whole request gets a clean 503 at once. A request whose headers arrived is never cut."""
    import http.client
    import socket

    import kimivl.serve.app as app_module

    monkeypatch.setattr(app_module, "HEADER_SECONDS", 1)
    options = {"http": HeaderDeadlineProtocol, "limit_concurrency": 4}
    models = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with live_server("kimivl-tiny", start=False, server_options=options) as (url, _):
        host, port = url.removeprefix("http://").split(":")

        def connect(data: bytes) -> socket.socket:
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(data)
            return s

        stalled = [connect(b"GET /health HTTP/1.1\r\nHost: x\r\n") for _ in range(8)]
        assert _raw(url, models, timeout=5).startswith(b"HTTP/1.1 503")  # over the limit: refused, not hung
        start = time.monotonic()
        for s in stalled:
            assert s.recv(100) == b""  # closed by the server
        assert time.monotonic() - start < 3
        assert _raw(url, models, timeout=5).startswith(b"HTTP/1.1 200")

        slow_body = connect(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        slow_body.sendall(b'Content-Length: 17\r\nConnection: close\r\n\r\n{"model":')  # headers done
        kept = connect(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive: then a stalled second request
        first = http.client.HTTPResponse(kept)
        first.begin()
        assert first.status == 200 and json.loads(first.read())["data"][0]["id"] == "kimivl-tiny"
        kept.sendall(b"GET /v1/models HTTP/1.1\r\n")
        assert kept.recv(100) == b""
        time.sleep(0.5)
        slow_body.sendall(b'"other"}')  # its body ends after the deadline: answered
        assert slow_body.recv(65536).startswith(b"HTTP/1.1 404")
        for s in (*stalled, kept, slow_body):
            s.close()


def test_local_media_opens_only_regular_files_under_the_root_and_parses_file_urls(tmp_path):
    """A FIFO swapped in after the checks blocked the event loop (the whole server); a NUL in a path was a 500;
    file:// URLs were not parsed (a space as %20 refused, file://localhost refused, file://media/x taken as local)."""
    media = tmp_path / "media"
    media.mkdir()
    png = base64.b64decode(_png(28, 28).split(",")[1])
    (media / "a b.png").write_bytes(png)
    os.mkfifo(media / "pipe.png")
    limits = Limits(context=4096, max_batch=8, allowed_local_media_path=str(media))
    good = {"model": "kimivl-tiny", "max_tokens": 2}
    with live_server("kimivl-tiny", limits=limits) as (url, _):
        path = media / "a b.png"
        for image in (path.as_uri(), "file://localhost" + path.as_uri().removeprefix("file://"), str(path)):
            assert _post(url, {**good, "messages": _image_msg(image)}, None)[0] == 200, image
        for image in (
            str(media / "pipe.png"),  # answered at once: not waited on
            str(media / "a b.png") + "\x00",
            "file://media/a%20b.png",
            str(media),
            path.as_uri() + "?x",
        ):
            code, reply = _post(url, {**good, "messages": _image_msg(image)}, None)
            assert code == 400 and "not a file under the allowed local media path" in reply["error"]["message"], image


def test_a_file_under_the_root_the_server_may_not_read_is_named_so_and_one_outside_is_not(tmp_path, unprivileged):
    """A file under the root that the server's user may not read was "not a file under the allowed local media path",
    as a missing one: the operator looked in the wrong place. Outside the root (through a link too) nothing changes."""
    media = tmp_path / "media"
    (media / "locked").mkdir(parents=True)
    png = base64.b64decode(_png(28, 28).split(",")[1])
    for path in (media / "secret.png", media / "locked" / "x.png", tmp_path / "outside.png"):
        path.write_bytes(png)
        path.chmod(0)
    (media / "locked").chmod(0o600)
    (media / "link.png").symlink_to(tmp_path / "outside.png")
    limits = Limits(context=4096, max_batch=8, allowed_local_media_path=str(media))

    def refusal(image):
        try:
            parse_chat_request({"model": "m", "messages": _image_msg(image)}, limits)
        except RequestError as e:
            return str(e).split(": ", 1)[1]

    (tmp_path / "private").mkdir(
        mode=0o600
    )  # a folder outside that the server may not enter: its existence is not told
    images = [media / "secret.png", media / "locked" / "x.png", media / "link.png", tmp_path / "outside.png"]
    images += [f"{tmp_path}/private/../media/secret.png", f"{tmp_path}/absent/../media/secret.png"]
    said = unprivileged(lambda: [refusal(str(image)) for image in images])
    assert said == [f"{str(image)!r} cannot be read by the server (permission denied)" for image in images[:2]] + [
        f"{str(image)!r} is not a file under the allowed local media path" for image in images[2:]
    ]


def test_a_file_url_names_a_file_by_the_bytes_of_its_percent_escapes(tmp_path):
    """file:///.../lat%E8.png (a Latin-1 name, as RFC 8089 writes its bytes) was "not a file under the allowed local
    media path" though it exists: the escapes were read as UTF-8."""
    media = tmp_path / "media"
    media.mkdir()
    with open(os.path.join(os.fsencode(media), b"lat\xe8.png"), "wb") as f:
        f.write(base64.b64decode(_png(28, 28).split(",")[1]))
    limits = Limits(context=4096, max_batch=8, allowed_local_media_path=str(media))
    with live_server("kimivl-tiny", limits=limits) as (url, _):
        for image in (f"file://{media}/lat%E8.png", f"file://{media}/lat%e8.png"):
            code, reply = _post(url, {"model": "kimivl-tiny", "max_tokens": 2, "messages": _image_msg(image)}, None)
            assert code == 200, (image, reply)
        code, reply = _post(
            url, {"model": "kimivl-tiny", "messages": _image_msg(f"file://{media}/lat%C3%A8.png")}, None
        )
        assert code == 400 and "not a file under the allowed local media path" in reply["error"]["message"]


def test_a_lone_surrogate_in_a_field_name_or_a_local_path_is_a_400_that_escapes_it(tmp_path):
    """A lone surrogate (JSON "\\ud800") in a field's name or in a local image path was a 500 with a traceback in the
    log: the 400's body held it, which the response's UTF-8 cannot encode. The body now holds its escape, and the path
    is not said to need PYTHONUTF8=1 (no encoding holds a lone surrogate)."""
    media = tmp_path / "media"
    media.mkdir()
    limits = Limits(context=4096, max_batch=8, allowed_local_media_path=str(media))
    hi, part = [{"role": "user", "content": "Hi"}], "messages[0].content[0]"

    def image(url: str, **more) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, **more}}]}]

    cases = [
        ({"messages": hi, "\ud800": 1}, "\\ud800"),
        ({"messages": [{"role": "user", "content": "Hi", "\udc00x": 1}]}, "messages[0].\\udc00x"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "\ud800": 1}]}]}, f"{part}.\\ud800"),
        ({"messages": image(_png(28, 28), **{"\ud800": 1})}, f"{part}.image_url.\\ud800"),
        ({"messages": hi, "stream": True, "stream_options": {"\ud800": True}}, "stream_options.\\ud800"),
        ({"messages": image(f"{media}/\ud800.png")}, part),
        ({"messages": image(f"file://{media}/\ud800.png")}, part),
    ]
    with live_server("kimivl-tiny", limits=limits) as (url, _):
        for body, param in cases:
            code, reply = _post(url, {"model": "kimivl-tiny", "max_tokens": 2, **body}, None)
            assert code == 400 and reply["error"]["param"] == param, (body, code, reply)
            assert "\\ud800" in reply["error"]["message"] or "\\udc00" in reply["error"]["message"], reply
            assert "PYTHONUTF8" not in reply["error"]["message"], reply


def test_a_local_media_name_the_filesystem_encoding_cannot_encode_is_named_so(tmp_path, ascii_filesystem):
    """Under LANG=C without Python's UTF-8 mode an existing картинка.png under the allowed path was "not a file under
    the allowed local media path"."""
    Image.new("RGB", (28, 28), "red").save(tmp_path / "картинка.png")
    imports = "from kimivl.serve.schema import Limits, RequestError, parse_chat_request"
    # the URL as a request's JSON gives it (Unicode text), not as argv under LANG=C would (surrogate escapes)
    body = {"model": "m", "messages": _image_msg(str(tmp_path / "картинка.png"))}
    call = f"parse_chat_request({ascii(body)}, Limits(context=4096, max_batch=2, allowed_local_media_path=sys.argv[1]))"
    encoding, said, stderr = ascii_filesystem(imports, call, "RequestError", str(tmp_path))
    assert len(said) == 1 and "not a file under" not in said[0], (said, stderr)
    assert f"holds 'картинка', which the filesystem encoding ({encoding}) cannot encode" in eval(said[0]), said


def test_a_refused_image_url_is_named_as_the_server_is_configured(tmp_path):
    """With --allowed-local-media-path set, the refusal said "(no remote URLs or local paths)" while files under the
    path are accepted; it now says which images are accepted in either configuration."""
    for root, words in (
        (None, "only data: URLs are accepted as images (no remote URLs or local paths)"),
        (
            str(tmp_path),
            "only data: URLs or files under the allowed local media path (an absolute path or a file:// URL) are "
            "accepted as images (no remote URLs or relative paths)",
        ),
    ):
        for url in ("photos/x.png", "https://example.com/x.png"):
            body = {"model": "m", "messages": _image_msg(url)}
            with pytest.raises(RequestError) as e:
                parse_chat_request(body, Limits(context=4096, max_batch=2, allowed_local_media_path=root))
            assert str(e.value).endswith(words)


def test_kimivl_serve_colours_its_log_at_a_terminal_only(monkeypatch):
    """At a terminal uvicorn's log lines were coloured even with NO_COLOR=1 or TERM=dumb; and ``kimivl serve 2> log``
    at a terminal wrote escape codes into the log file (uvicorn looks at stdout only, its server log goes to
    stderr)."""
    import uvicorn

    from kimivl import cli
    from kimivl.cli import main

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    colours = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: colours.append(server.config.use_colors))
    monkeypatch.setattr(cli, "_listen", lambda host, port: [])
    for no_color, term, stdout, stderr in (
        (None, "xterm", Terminal(), Terminal()),
        ("", "xterm", Terminal(), Terminal()),
        ("1", "xterm", Terminal(), Terminal()),
        (None, "dumb", Terminal(), Terminal()),
        (None, "xterm", Terminal(), io.StringIO()),  # 2> serve.log
        (None, "xterm", io.StringIO(), Terminal()),  # > access.log
    ):
        monkeypatch.setenv("TERM", term)
        if no_color is None:
            monkeypatch.delenv("NO_COLOR", raising=False)
        else:
            monkeypatch.setenv("NO_COLOR", no_color)
        monkeypatch.setattr(sys, "stdout", stdout)
        monkeypatch.setattr(sys, "stderr", stderr)
        assert main(["serve", "--model", str(MODELS / "kimivl-tiny"), "--device", "cpu"]) == 0
    assert colours == [True, True, False, False, False, False]


def test_kimivl_serve_serves_a_name_from_argv_under_lc_all_c_as_its_text(tmp_path, monkeypatch, capsys):
    """Under LC_ALL=C without UTF-8 mode argv's non-ASCII bytes are lone surrogates: a model directory named 模型 was
    served as '\\udce6...' (/v1/models a 500, every request naming 模型 a 404). A name that is not UTF-8 is refused
    before the model loads."""
    import functools

    import uvicorn
    from fastapi.testclient import TestClient

    from kimivl import cli
    from kimivl.cli import main

    def argv(raw: bytes) -> str:  # as Python reads it under LC_ALL=C
        return raw.decode("ascii", "surrogateescape")

    apps = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: apps.append(server.config.app))
    monkeypatch.setattr(cli, "_listen", lambda host, port: [])
    monkeypatch.setattr(cli, "_load", functools.cache(cli._load))
    model = argv(os.path.join(os.fsencode(tmp_path), "模型".encode()))
    os.symlink(MODELS / "kimivl-tiny", model)
    for more, name in (([], "模型"), (["--served-model-name", argv("名字".encode())], "名字")):
        assert main(["serve", "--model", model, *more, "--device", "cpu"]) == 0
        client, host = TestClient(apps[-1]), {"host": "127.0.0.1"}
        listed = client.get("/v1/models", headers=host)
        assert listed.status_code == 200 and listed.json()["data"][0]["id"] == name
        body = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "bogus": 1}  # past the model's check
        assert client.post("/v1/chat/completions", json=body, headers=host).json()["error"]["param"] == "bogus"
    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("loaded"))
    latin1 = argv(os.path.join(os.fsencode(tmp_path), b"mod\xe8le"))
    os.symlink(MODELS / "kimivl-tiny", latin1)
    assert main(["serve", "--model", model, "--served-model-name", argv(b"mod\xe8le")]) == 2
    assert "--served-model-name is not UTF-8 text" in capsys.readouterr().err
    assert main(["serve", "--model", latin1]) == 2
    assert "the model directory's name (the default --served-model-name) is not UTF-8" in capsys.readouterr().err


def test_serve_called_where_an_event_loop_runs_says_so_before_loading(tmp_path, capsys):
    """``main(['serve', ...])`` in a notebook cell loaded the model, then died in uvicorn: 'Cannot run the event loop
    while another loop is running'."""
    import asyncio

    from kimivl.cli import main

    async def cell():
        return main(["serve", "--model", str(tmp_path / "not-loaded")])

    assert asyncio.run(cell()) == 2
    err = capsys.readouterr().err
    assert "this thread runs an event loop already (a notebook's)" in err and "not-loaded" not in err
