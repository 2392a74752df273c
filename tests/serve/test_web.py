"""The chat page at ``/`` in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) against a live
server on kimivl-tiny: the API key asked for, an image attached through the file picker, the streamed answer equal
to the API's greedy answer, a follow-up turn carrying the history, and the stop button freeing the slot. A screenshot
is kept under $KIMIVL_ARTIFACTS (default tests/artifacts/). The page's edges (New chat while an answer streams,
failures, long words, its content security policy, what a screen reader hears, keyboard focus, 320 px reflow,
scrolling) run against a server whose engine plays a script."""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import os
import shutil
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import openai
import pytest
from conftest import live_server
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

HELDOUT = Path(__file__).resolve().parents[2] / "examples" / "heldout"
ARTIFACTS = Path(os.environ.get("KIMIVL_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))


def _question(task: str) -> tuple[Path, str]:
    """The first held-out ``task`` question: its one image and its text."""
    parts = json.loads((HELDOUT / f"{task}.jsonl").read_text().splitlines()[0])["messages"][0]["content"]
    (image,) = [HELDOUT / p["image"] for p in parts if p["type"] == "image"]
    return image, " ".join(p["text"] for p in parts if p["type"] == "text")


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.fail(
            "the page test needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, CSP violations included
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def _text(driver, selector: str) -> str:
    return driver.execute_script("return document.querySelector(arguments[0]).textContent", selector)


def _ask(driver, image: Path | None, text: str, timeout: float = 20) -> None:
    if image is not None:
        driver.find_element(By.ID, "file").send_keys(str(image))
        WebDriverWait(driver, 5).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"))
    driver.find_element(By.ID, "question").send_keys(text)
    turns = len(driver.find_elements(By.CSS_SELECTOR, ".turn.assistant"))
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 5).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn.assistant")) == turns + 1)


_DROP_AND_PASTE = """
const blob = await (await fetch(arguments[0])).blob();
for (const kind of ["drop", "paste"]) {
  const data = new DataTransfer();
  data.items.add(new File([blob], "image.png", {type: "image/png"}));
  document.dispatchEvent(kind === "drop" ? new DragEvent("drop", {dataTransfer: data, cancelable: true})
                                         : new ClipboardEvent("paste", {clipboardData: data}));
}
"""


def _set(driver, element_id: str, value) -> None:
    driver.execute_script("document.getElementById(arguments[0]).value = arguments[1]", element_id, str(value))


def test_page_asks_for_the_key_streams_the_greedy_answer_keeps_history_and_stops(tiny, browser, tmp_path, monkeypatch):
    url, engine = tiny
    client = openai.OpenAI(base_url=url + "/v1", api_key="secret-key", timeout=30, max_retries=0)
    browser.get(url + "/")
    assert "secret-key" not in browser.page_source  # the page never holds the key
    WebDriverWait(browser, 10).until(lambda d: "shown" in d.find_element(By.ID, "key-form").get_attribute("class"))
    browser.find_element(By.ID, "key").send_keys("secret-key")
    browser.find_element(By.ID, "key-save").click()
    WebDriverWait(browser, 10).until(lambda d: _text(d, "#model") == "kimivl-tiny")
    _set(browser, "temperature", 0)
    _set(browser, "max-tokens", 24)

    image, text = _question("caption")
    _ask(browser, image, text)
    WebDriverWait(browser, 20).until(
        lambda d: d.find_element(By.CSS_SELECTOR, ".turn.assistant").get_attribute("data-state") == "done"
    )
    shown = _text(browser, ".turn.assistant .answer")
    url_of_image = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url_of_image}}, {"type": "text", "text": text}],
        }
    ]
    expected = client.chat.completions.create(model="kimivl-tiny", messages=messages, temperature=0, max_tokens=24)
    assert shown == expected.choices[0].message.content and shown

    _ask(browser, None, "And how many shapes are red?")  # a follow-up: the request carries the first turn
    last = ".turn.assistant:last-of-type"
    WebDriverWait(browser, 20).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".turn.assistant")[-1].get_attribute("data-state") == "done"
    )
    messages += [
        {"role": "assistant", "content": shown},
        {"role": "user", "content": [{"type": "text", "text": "And how many shapes are red?"}]},
    ]
    expected = client.chat.completions.create(model="kimivl-tiny", messages=messages, temperature=0, max_tokens=24)
    assert _text(browser, last + " .answer") == expected.choices[0].message.content

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for folder in (tmp_path, ARTIFACTS):
        assert browser.save_screenshot(str(folder / "serve_page.png"))
    assert (ARTIFACTS / "serve_page.png").stat().st_size > 10_000

    # a thought streams into the folded reasoning above the (empty) answer; stop it after a few tokens (decoding
    # slowed to 20 steps a second, so that the answer cannot end first), the slot is freed at once
    cancelled = engine.metrics.requests["cancelled"]
    step = engine._step
    monkeypatch.setattr(engine, "_step", lambda batch: time.sleep(0.05) or step(batch))
    _set(browser, "max-tokens", 3000)
    browser.find_element(By.ID, "clear").click()  # a new conversation: the question alone
    assert not browser.find_elements(By.CSS_SELECTOR, ".turn")
    browser.execute_script(_DROP_AND_PASTE, "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode())
    WebDriverWait(browser, 5).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments img")) == 2)
    for _ in range(2):
        browser.find_element(By.CSS_SELECTOR, "#attachments button").click()  # remove both again
    assert not browser.find_elements(By.CSS_SELECTOR, "#attachments img")
    image, text = _question("reasoning")
    _ask(browser, image, text)
    WebDriverWait(browser, 20).until(lambda d: len(_text(d, last + " .reasoning-text")) >= 3)
    assert "has-text" in browser.find_elements(By.CSS_SELECTOR, "details.reasoning")[-1].get_attribute("class")
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 5).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".turn.assistant")[-1].get_attribute("data-state") == "stopped"
    )
    deadline = time.monotonic() + 5
    while engine.metrics.requests["cancelled"] == cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.metrics.requests["cancelled"] == cancelled + 1
    time.sleep(0.2)
    assert engine.metrics.batch_size == 0 and engine.metrics.completion_tokens < 3000
    assert _text(browser, last + " .note") == "stopped" and _text(browser, last + " .answer") == ""


def _play(job, script: dict) -> None:
    """Answer ``job`` from ``script``: its pieces of text (a dict piece is an engine error), one every ``delay``
    seconds, then its finish reason."""
    for piece in script["pieces"]:
        if job.cancelled:
            return
        if isinstance(piece, dict):
            job.emit(("error", piece["error"]))
            return
        job.emit(("text", 0, piece))
        time.sleep(script["delay"])
    job.emit(("done", 0, script["finish"], len(script["pieces"])))


@pytest.fixture(scope="module")
def scripted():
    """(base_url, script) of a server with no API key whose engine answers every request from ``script``."""
    script = {}
    with live_server("kimivl-tiny", start=False) as (url, engine):
        engine.submit = lambda job: threading.Thread(target=_play, args=(job, dict(script)), daemon=True).start()
        yield url, script


def _open(browser, url: str, script: dict, pieces: list, delay: float = 0.0, finish: str = "stop") -> None:
    """The page, loaded afresh with its model, the requests it sends kept in ``window.sent``."""
    script.update(pieces=pieces, delay=delay, finish=finish)
    browser.get(url + "/")
    WebDriverWait(browser, 10).until(lambda d: _text(d, "#model") == "kimivl-tiny")
    browser.execute_script(
        "window.sent = []; const f = window.fetch;"
        "window.fetch = (u, o) => { if (o && o.body) window.sent.push(JSON.parse(o.body)); return f(u, o); };"
    )


def _last_state(driver) -> str:
    return driver.find_elements(By.CSS_SELECTOR, ".turn.assistant")[-1].get_attribute("data-state")


def test_the_page_starts_from_the_served_models_sampling_and_sends_what_the_user_sets(browser):
    """The page began at temperature 0.7 and 512 tokens whatever the model recommended; it starts from the sampling
    the server was given (the model's generation_config.json under ``kimivl serve``), and the user can still change
    it."""
    script = {}
    sampling = {"temperature": 0.8, "max_new_tokens": 1024, "top_p": 0.9}
    with live_server("kimivl-tiny", start=False, sampling=sampling) as (url, engine):
        engine.submit = lambda job: threading.Thread(target=_play, args=(job, dict(script)), daemon=True).start()
        _open(browser, url, script, ["an answer"])
        shown = [browser.find_element(By.ID, i).get_attribute("value") for i in ("temperature", "max-tokens")]
        assert shown == ["0.8", "1024"]
        _ask(browser, None, "a question")
        WebDriverWait(browser, 10).until(lambda d: _last_state(d) == "done")
        _set(browser, "temperature", 0.3)
        _set(browser, "max-tokens", 40)
        _ask(browser, None, "another")
        WebDriverWait(browser, 10).until(lambda d: _last_state(d) == "done")
        sent = browser.execute_script("return window.sent.map((b) => [b.temperature, b.max_tokens, b.top_p])")
        assert sent == [[0.8, 1024, 0.9], [0.3, 40, 0.9]]


def test_new_chat_while_an_answer_streams_starts_an_empty_conversation(scripted, browser):
    """The aborted answer's send() went on after New chat emptied the history and put the cut-off answer into the new
    conversation: its first request began with an assistant message."""
    url, script = scripted
    _open(browser, url, script, ["part "] * 100, delay=0.05)
    _ask(browser, None, "a first question")
    WebDriverWait(browser, 10).until(lambda d: "part part" in _text(d, ".answer"))
    browser.find_element(By.ID, "clear").click()
    time.sleep(0.3)  # the aborted request's send() ends
    script.update(pieces=["fresh"], delay=0.0)
    _ask(browser, None, "a new conversation")
    WebDriverWait(browser, 10).until(lambda d: _last_state(d) == "done")
    _ask(browser, None, "and a follow-up")
    WebDriverWait(browser, 10).until(lambda d: _last_state(d) == "done")
    sent = browser.execute_script("return window.sent.map((b) => b.messages)")
    assert sent[1:] == [
        [{"role": "user", "content": [{"type": "text", "text": "a new conversation"}]}],
        [
            {"role": "user", "content": [{"type": "text", "text": "a new conversation"}]},
            {"role": "assistant", "content": "fresh"},
            {"role": "user", "content": [{"type": "text", "text": "and a follow-up"}]},
        ],
    ]
    assert len(browser.find_elements(By.CSS_SELECTOR, ".turn")) == 4


def test_the_page_runs_its_own_script_file_only(scripted, browser):
    """The policy allowed inline scripts ('unsafe-inline'), so an injected one would run; the page's script is now a
    file of its own and runs without a single CSP violation."""
    url, script = scripted
    with urllib.request.urlopen(url + "/", timeout=10) as r:
        policy = dict(p.strip().split(" ", 1) for p in r.headers["Content-Security-Policy"].split(";"))
        assert "<script>" not in r.read().decode()
    assert policy["script-src"] == "'self'" and policy["base-uri"] == "'none'" and policy["form-action"] == "'self'"
    browser.get("about:blank")
    browser.get_log("browser")  # emptied
    _open(browser, url, script, ["an ", "answer"])
    _ask(browser, None, "a question")
    WebDriverWait(browser, 10).until(lambda d: _last_state(d) == "done")
    assert _text(browser, ".answer") == "an answer"
    assert not [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    ran = browser.execute_script(
        "const s = document.createElement('script'); s.textContent = 'window.injected = 1'; document.body.append(s);"
        "return window.injected === 1"
    )
    assert ran is False
    assert any("Content Security Policy" in e["message"] for e in browser.get_log("browser"))  # the log sees one


class _PrefixProxy(http.server.BaseHTTPRequestHandler):
    """A reverse proxy serving the upstream ``self.server.upstream`` under ``/kimi/`` (the prefix stripped), as
    nginx's ``location /kimi/ { proxy_pass http://upstream/; }`` does; HTTP/1.0, so a stream ends with the
    connection."""

    def _forward(self) -> None:
        if not self.path.startswith("/kimi/"):
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        upstream.request(self.command, self.path.removeprefix("/kimi"), body or None, headers)
        answer = upstream.getresponse()
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.end_headers()
        while piece := answer.read1(65536):
            self.wfile.write(piece)
            self.wfile.flush()
        upstream.close()

    do_GET = do_POST = _forward

    def log_message(self, *args) -> None:
        pass


def test_the_page_works_behind_a_proxy_that_serves_it_under_a_path_prefix(scripted, browser):
    """The page asked for /chat.js and /v1/... at the site's root: under /kimi/ its script was a 404 and nothing
    could be sent. Its URLs are relative now."""
    url, script = scripted
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PrefixProxy)
    proxy.upstream = urllib.parse.urlsplit(url).netloc
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        _open(browser, f"http://127.0.0.1:{proxy.server_address[1]}/kimi", script, ["through ", "the proxy"])
        _ask(browser, None, "a question")
        WebDriverWait(browser, 10).until(lambda d: _last_state(d) == "done")
        assert _text(browser, ".answer") == "through the proxy"
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_a_bad_key_or_a_failing_model_list_says_so(scripted, browser):
    """A key with non-Latin-1 characters made every fetch throw (nothing shown, Send did nothing), and a /v1/models
    that failed (network, not JSON) was an unhandled rejection with nothing shown."""
    url, script = scripted
    _open(browser, url, script, ["hi"])
    submit = "document.getElementById('key').value = arguments[0]; document.getElementById('key-form').requestSubmit()"
    browser.execute_script(submit, "sécret-ключ")
    assert "printable ASCII" in _text(browser, "#error")
    assert browser.execute_script("return sessionStorage.getItem('kimivl-key')") is None
    for fake, words in [
        ("() => Promise.reject(new TypeError('Failed to fetch'))", "the server cannot be reached (Failed to fetch)"),
        ("async () => new Response('<html>bad gateway</html>', {status: 502})", "HTTP 502, not a list of models"),
    ]:
        browser.execute_script(f"window.fetch = {fake}; document.getElementById('error').textContent = ''")
        browser.execute_script(submit, "a-good-key")
        WebDriverWait(browser, 5).until(lambda d: words in _text(d, "#error"))
    browser.execute_script("sessionStorage.clear()")


def test_long_words_stay_inside_their_bubbles(scripted, browser):
    url, script = scripted
    _open(browser, url, script, ["y" * 2000])
    _ask(browser, None, "x" * 2000)
    WebDriverWait(browser, 10).until(lambda d: _last_state(d) == "done")
    widths = browser.execute_script(
        "return ['#chat', '.question', '.answer'].map((s) => document.querySelector(s))"
        ".map((e) => [e.scrollWidth, e.clientWidth])"
    )
    assert all(scroll <= client for scroll, client in widths), widths


def _contrast_on_white(color: str) -> float:
    """WCAG's contrast ratio of a CSS ``rgb(r, g, b)`` colour on white."""
    channels = [int(c) / 255 for c in color[color.index("(") + 1 : color.index(")")].split(",")[:3]]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 1.05 / (0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2] + 0.05)


def test_a_failed_question_comes_back_and_an_answer_cut_by_max_tokens_says_so(scripted, browser):
    """A question that got no answer left the conversation but stayed on screen as if asked; an answer cut at
    max_tokens looked complete."""
    url, script = scripted
    _open(browser, url, script, [{"error": "the engine failed"}])
    image, _ = _question("caption")
    _ask(browser, image, "a question that fails")
    WebDriverWait(browser, 10).until(lambda d: _last_state(d) == "error")
    assert _text(browser, ".turn.assistant .note") == "the engine failed"
    user = browser.find_element(By.CSS_SELECTOR, ".turn.user")
    assert user.get_attribute("data-state") == "unsent" and "not sent" in _text(browser, ".turn.user .note")
    color = browser.execute_script("return getComputedStyle(document.querySelector('.turn.user .question')).color")
    assert _contrast_on_white(color) >= 4.5, color  # #777 was 4.48
    assert browser.find_element(By.ID, "question").get_attribute("value") == "a question that fails"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#attachments img")) == 1  # its image too
    script.update(pieces=["cut ", "short"], finish="length")
    browser.find_element(By.ID, "send").click()  # sent again as it is
    WebDriverWait(browser, 10).until(lambda d: _last_state(d) == "done")
    messages = browser.execute_script("return window.sent.at(-1).messages")
    assert [m["role"] for m in messages] == ["user"]
    assert [p["type"] for p in messages[0]["content"]] == ["image_url", "text"]
    assert "max tokens" in _text(browser, ".turn.assistant:last-of-type .note")
    script.update(finish="stop")
    _ask(browser, None, "one more")
    WebDriverWait(browser, 10).until(lambda d: _last_state(d) == "done")
    assert _text(browser, ".turn.assistant:last-of-type .note") == ""


def test_a_failed_question_leaves_a_new_draft_in_the_box_and_says_only_not_sent(scripted, browser):
    """A question failing while a new draft was being typed said it was back in the box, which held the draft."""
    url, script = scripted
    _open(browser, url, script, ["", {"error": "a late failure"}], delay=1.0)
    _ask(browser, None, "a question that fails late")
    browser.find_element(By.ID, "question").send_keys("a new draft")
    WebDriverWait(browser, 10).until(lambda d: _last_state(d) == "error")
    assert _text(browser, ".turn.user .note") == "not sent"
    assert browser.find_element(By.ID, "question").get_attribute("value") == "a new draft"


_DROP = """
const data = new DataTransfer();
for (const [name, type, url] of arguments[0]) data.items.add(new File([await (await fetch(url)).blob()], name, {type}));
document.dispatchEvent(new DragEvent("drop", {dataTransfer: data, cancelable: true}));
"""


def _png(width: int, height: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _accessibility_tree(driver) -> list[tuple[str, str, dict]]:
    """What a screen reader is told: (role, name, properties) of each node Chromium does not leave out, in the
    page's order."""
    nodes = driver.execute_cdp_cmd("Accessibility.getFullAXTree", {})["nodes"]
    by_id, order, todo = {n["nodeId"]: n for n in nodes}, [], [nodes[0]["nodeId"]]
    while todo:
        node = by_id[todo.pop()]
        if not node.get("ignored"):
            properties = {p["name"]: p["value"].get("value") for p in node.get("properties", [])}
            order.append((node["role"]["value"], node.get("name", {}).get("value", ""), properties))
        todo += [c for c in reversed(node.get("childIds", [])) if c in by_id]
    return order


def _focused(driver) -> str:
    return driver.execute_script(
        "return document.activeElement.id || document.activeElement.getAttribute('aria-label')"
    )


def test_a_screen_reader_hears_who_speaks_each_answer_once_and_named_images_and_buttons(scripted, browser):
    """The conversation was no live region (nothing was read as it came), turns differed only by colour, images had
    no alt text, the remove button was named "×", the question box had no label and a dropped video vanished without a
    word."""
    url, script = scripted
    _open(browser, url, script, ["an ", "answer ", "read once"], delay=0.5)
    video = "data:video/mp4;base64," + base64.b64encode(b"\0\0\0\x18ftypmp42").decode()
    browser.execute_script(_DROP, [["cat.png", "image/png", _png(8, 8)], ["clip.mp4", "video/mp4", video]])
    WebDriverWait(browser, 5).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"))
    assert "only images can be attached here; send videos through the API" in _text(browser, "#error")
    names = {(role, name) for role, name, _ in _accessibility_tree(browser)}
    assert {("image", "attached image 1: cat.png"), ("button", "remove image 1"), ("textbox", "question")} <= names
    _ask(browser, None, "what is it?")
    WebDriverWait(browser, 5).until(lambda d: "answer" in _text(d, ".answer"))
    turn = browser.find_elements(By.CSS_SELECTOR, ".turn.assistant")[-1]
    assert turn.get_attribute("aria-busy") == "true"  # the log holds the answer back while it streams
    WebDriverWait(browser, 10).until(lambda d: _last_state(d) == "done")
    assert turn.get_attribute("aria-busy") is None
    tree = _accessibility_tree(browser)
    live = {role: props for role, _, props in tree if role in ("log", "alert", "status")}
    assert (
        live["log"]["live"] == "polite" and live["alert"]["live"] == "assertive" and live["status"]["live"] == "polite"
    )
    assert [role for role, _, _ in tree].count("status") == 2  # each turn's note
    said = [name for role, name, _ in tree if role in ("StaticText", "image")]
    assert said.index("You:") < said.index("image 1: cat.png") < said.index("what is it?") < said.index("Kimi-VL:")


def test_focus_follows_send_stop_and_remove_and_the_enter_of_an_input_method_does_not_send(scripted, browser):
    """Send and Stop disable themselves and removed buttons vanish: the focus fell to the page's body. The Enter that
    confirms a CJK composition sent the half-typed question."""
    url, script = scripted
    _open(browser, url, script, ["part "] * 100, delay=0.05)
    _ask(browser, None, "a long answer")
    assert _focused(browser) == "stop"
    WebDriverWait(browser, 10).until(lambda d: "part part" in _text(d, ".answer"))
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 5).until(lambda d: _last_state(d) == "stopped")
    assert _focused(browser) == "question"

    browser.execute_script(_DROP, [[f"{i}.png", "image/png", _png(8, 8)] for i in range(2)])
    WebDriverWait(browser, 5).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments img")) == 2)
    browser.find_element(By.CSS_SELECTOR, "#attachments button").click()
    assert _focused(browser) == "remove image 1"  # the next one, now the first
    browser.find_element(By.CSS_SELECTOR, "#attachments button").click()
    assert _focused(browser) == "file"

    browser.find_element(By.ID, "question").click()
    browser.execute_cdp_cmd("Input.insertText", {"text": "这张图"})
    browser.execute_cdp_cmd("Input.imeSetComposition", {"text": "里有什么", "selectionStart": 4, "selectionEnd": 4})
    browser.execute_script(
        "document.getElementById('question').dispatchEvent(new KeyboardEvent('keydown',"
        "{key: 'Enter', isComposing: true, bubbles: true, cancelable: true}))"
    )
    browser.execute_cdp_cmd("Input.insertText", {"text": "里有什么"})  # the composition ends
    enter = {"type": "rawKeyDown", "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 229}
    browser.execute_cdp_cmd("Input.dispatchKeyEvent", enter)  # Safari's Enter that ends it: keyCode 229 only
    time.sleep(0.3)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".turn.user")) == 1
    assert browser.find_element(By.ID, "question").get_attribute("value") == "这张图里有什么"


def test_the_page_reflows_at_320_pixels_and_wide_images_fit(scripted, browser):
    """At 320 CSS pixels (400 % zoom) the page scrolled sideways, the question box was 6 px wide and Send and Stop
    were off screen; a wide image overflowed its turn."""
    url, script = scripted
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 320, "height": 640, "deviceScaleFactor": 1, "mobile": False}
    )
    try:
        _open(browser, url, script, ["fits"])
        browser.execute_script(_DROP, [["wide.png", "image/png", _png(3000, 60)]])
        WebDriverWait(browser, 5).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"))
        layout = (
            "const rect = (s) => document.querySelector(s).getBoundingClientRect();"
            "return {page: document.documentElement.scrollWidth, view: document.documentElement.clientWidth,"
            "        box: rect('#question').width, right: Math.max(...['#send', '#stop', '#attachments img',"
            "        '#attachments button', '#file'].map((s) => rect(s).right))}"
        )
        shown = browser.execute_script(layout)
        assert shown["page"] <= shown["view"] == 320 and shown["right"] <= 320 and shown["box"] >= 150, shown
        _ask(browser, None, "wide")
        WebDriverWait(browser, 10).until(lambda d: _last_state(d) == "done")
        fit = browser.execute_script(
            "const img = document.querySelector('.turn.user img').getBoundingClientRect();"
            "return [img.right, document.querySelector('.turn.user').getBoundingClientRect().right,"
            "        document.documentElement.scrollWidth]"
        )
        assert fit[0] <= fit[1] and fit[2] <= 320, fit
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_a_reader_who_scrolled_up_stays_there_and_a_stream_without_its_end_is_cut_off(scripted, browser):
    """Every piece of a streaming answer scrolled the conversation to its end, away from the earlier turn being
    read; a stream that stopped without a finish reason or [DONE] (the server shut down) looked complete."""
    url, script = scripted
    _open(browser, url, script, ["line\n"] * 60, delay=0.02)
    gap = "const c = document.getElementById('chat'); return c.scrollHeight - c.scrollTop - c.clientHeight"
    _ask(browser, None, "a long answer")
    WebDriverWait(browser, 10).until(lambda d: _last_state(d) == "done")
    assert browser.execute_script(gap) < 30  # followed to the end
    _ask(browser, None, "another")
    WebDriverWait(browser, 5).until(lambda d: _text(d, ".turn.assistant:last-of-type .answer").count("line") > 5)
    browser.execute_script("document.getElementById('chat').scrollTop = 0")
    WebDriverWait(browser, 10).until(lambda d: _last_state(d) == "done")
    assert browser.execute_script("return document.getElementById('chat').scrollTop") == 0

    piece = {"choices": [{"index": 0, "delta": {"content": "partly"}, "finish_reason": None}]}
    browser.execute_script(
        "window.fetch = async () => new Response(arguments[0], {headers: {'Content-Type': 'text/event-stream'}})",
        f"data: {json.dumps(piece)}\n\n",
    )
    _ask(browser, None, "a question whose answer is cut off")
    WebDriverWait(browser, 10).until(lambda d: _last_state(d) != "streaming")
    assert _last_state(browser) == "error" and _text(browser, ".turn.assistant:last-of-type .answer") == "partly"
    assert _text(browser, ".turn.assistant:last-of-type .note").startswith("cut off")

    # the connection reset mid-answer, or no server to reach: Chromium's bare "network error" / "Failed to fetch"
    browser.execute_script(
        "const sent = arguments[0];"
        "window.fetch = async () => new Response(new ReadableStream({start(c) {"
        "  c.enqueue(new TextEncoder().encode(sent));"
        "  setTimeout(() => c.error(new TypeError('network error')), 50); }}),"
        "  {headers: {'Content-Type': 'text/event-stream'}})",
        f"data: {json.dumps(piece)}\n\n",
    )
    _ask(browser, None, "a question whose connection breaks")
    WebDriverWait(browser, 10).until(lambda d: _last_state(d) != "streaming")
    assert _last_state(browser) == "error" and _text(browser, ".turn.assistant:last-of-type .answer") == "partly"
    note = _text(browser, ".turn.assistant:last-of-type .note")
    assert note == "cut off: the connection to the server was lost (network error)"
    browser.execute_script("window.fetch = async () => { throw new TypeError('Failed to fetch'); }")
    _ask(browser, None, "a question no server hears")
    WebDriverWait(browser, 10).until(lambda d: _last_state(d) != "streaming")
    note = _text(browser, ".turn.assistant:last-of-type .note")
    assert note == "the server could not be reached (Failed to fetch)"
