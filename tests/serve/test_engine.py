"""The serving engine directly: a long prompt is prefilled in chunks between decode steps, so a running request keeps
receiving tokens meanwhile, and both answers equal the answers alone (greedy, float32)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import MODELS
from test_serve import _questions

from kimivl import KimiVL, KimiVLProcessor
from kimivl.inference.sampling import SamplingParams
from kimivl.serve.engine import Engine, Request


@pytest.fixture(scope="module")
def engine():
    model = KimiVL.from_pretrained(MODELS / "kimivl-tiny", dtype=torch.float32, device="cpu")
    processor = KimiVLProcessor.from_pretrained(MODELS / "kimivl-tiny")
    engine = Engine(model, processor, max_batch=4, prefill_chunk=32)
    engine.start()
    yield engine
    engine.shutdown()


class _Client:
    """A request's events with the time each arrived."""

    def __init__(self, engine: Engine, messages: list[dict], max_new_tokens: int):
        encoded = engine.processor.encode(messages)
        self.prompt = len(encoded.input_ids)
        self.events: list[tuple[float, tuple]] = []
        self.done = threading.Event()
        has_images = len(encoded.image_grid_hws) > 0
        self.request = Request(
            encoded.input_ids,
            encoded.pixel_values if has_images else None,
            encoded.image_grid_hws if has_images else None,
            SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
            self._emit,
        )
        engine.submit(self.request)

    def _emit(self, event: tuple) -> None:
        self.events.append((time.monotonic(), event))
        if event[0] in ("done", "error"):
            self.done.set()

    def text(self) -> str:
        assert self.done.wait(60) and self.events[-1][1][0] == "done", self.events[-1:]
        return "".join(e[2] for _, e in self.events if e[0] == "text")


def test_a_long_prompt_is_prefilled_between_decode_steps_and_answers_equal_alone(engine):
    _, thinking = _questions("reasoning", 1)[0]  # the tiny model thinks on this one for hundreds of tokens
    long = [{"role": "user", "content": "Read this and answer. " + " ".join(f"item {i} is red;" for i in range(150))}]
    running_alone = _Client(engine, thinking, 200).text()
    long_alone = _Client(engine, long, 8).text()

    running = _Client(engine, thinking, 200)
    while not any(e[0] == "text" for _, e in running.events):
        time.sleep(0.005)
    late = _Client(engine, long, 8)
    assert late.prompt > 1000  # 32+ prefill passes of 32 tokens
    assert running.text() == running_alone and late.text() == long_alone
    submitted, first = late.request.submitted, late.request.first_token
    during = [t for t, e in running.events if e[0] == "text" and submitted < t < first]
    # one decode step after each prefill pass: the running request got a token per pass, give or take its last
    assert len(during) >= late.prompt // 32 - 4, (len(during), late.prompt)
    assert max(t for t, e in running.events if e[0] == "done") > first  # it was still running when the long one began
