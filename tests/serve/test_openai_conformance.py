"""How the server meets the OpenAI chat completions API at its edges: numbers too large to convert, fields it does not
implement, the streamed chunks' shape, error bodies, the ``developer`` role."""

from __future__ import annotations

import base64
import io
import json
import logging
import urllib.error
import urllib.request

from PIL import Image

from kimivl.serve import app as app_module
from kimivl.serve.schema import Limits

GOOD = {"model": "kimivl-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
LIMITS = Limits(context=4096, max_batch=2)


def _post(url: str, body: dict | bytes, key: str = "secret-key") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    req = urllib.request.Request(url + "/v1/chat/completions", data, headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


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


def test_a_bad_api_key_has_the_openai_code(tiny):
    url, _ = tiny
    code, reply = _post(url, GOOD, key="wrong-key")
    assert code == 401 and reply["error"]["code"] == "invalid_api_key"
