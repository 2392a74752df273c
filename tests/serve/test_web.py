"""The chat page at ``/`` in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) against a live
server on kimivl-tiny: the API key asked for, an image attached through the file picker, the streamed answer equal
to the API's greedy answer, a follow-up turn carrying the history, and the stop button freeing the slot. A screenshot
is kept under $KIMIVL_ARTIFACTS (default tests/artifacts/)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

import openai
import pytest
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
