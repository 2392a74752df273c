"""The serving engine directly: a long prompt is prefilled in chunks between decode steps, so a running request keeps
receiving tokens meanwhile, and both answers equal the answers alone (greedy, float32); waiting prompts are packed
into one pass with their images in one vision call, each prompt's cache and first logits as alone, and a bad prompt in
a pack fails alone."""

from __future__ import annotations

import codecs
import collections
import re
import threading
import time
from unittest import mock

import pytest
import torch
from conftest import MODELS
from hypothesis import given, settings
from hypothesis import strategies as st
from test_serve import _questions

from kimivl import KimiVL, KimiVLProcessor
from kimivl.inference.generate import generate_ids
from kimivl.inference.sampling import MAX_SEED, SamplingParams
from kimivl.serve import engine as engine_module
from kimivl.serve.engine import PREFILL_BURST, Engine, Request, _Prefill


@pytest.fixture(scope="module")
def loaded():
    model = KimiVL.from_pretrained(MODELS / "kimivl-tiny", dtype=torch.float32, device="cpu")
    return model, KimiVLProcessor.from_pretrained(MODELS / "kimivl-tiny")


@pytest.fixture(scope="module")
def engine(loaded):
    engine = Engine(*loaded, max_batch=4, prefill_chunk=32)
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
    submitted, first = late.request.arrived, late.request.first_token
    during = [t for t, e in running.events if e[0] == "text" and submitted < t < first]
    # one decode step after each prefill pass: the running request got a token per pass, give or take its last
    assert len(during) >= late.prompt // 32 - 4, (len(during), late.prompt)
    assert max(t for t, e in running.events if e[0] == "done") > first  # it was still running when the long one began


def _request(processor, messages: list[dict], emit=lambda event: None) -> Request:
    encoded = processor.encode(messages)
    images = len(encoded.image_grid_hws) > 0
    return Request(
        encoded.input_ids,
        encoded.pixel_values if images else None,
        encoded.image_grid_hws if images else None,
        SamplingParams(max_new_tokens=8, temperature=0.0),
        emit,
    )


def test_prompts_packed_in_one_pass_and_one_vision_call_get_their_cache_and_logits_alone(loaded, monkeypatch):
    model, processor = loaded
    engine = Engine(model, processor)  # not started: its passes are called here
    messages = [local for task in ("caption", "ocr", "gui", "chart") for _, local in _questions(task, 2)]
    messages.insert(3, [{"role": "user", "content": "What is a square?"}])  # no image, between the others
    jobs = [_Prefill(_request(processor, m), model) for m in messages]
    calls, forward = [], model.vision_tower.forward
    monkeypatch.setattr(model.vision_tower, "forward", lambda p, g: (calls.append(len(g)), forward(p, g))[1])
    with torch.inference_mode():
        packed = engine._prefill_whole(jobs)
        assert calls == [8]  # the 8 images of 9 prompts in one call of the vision tower
        alone = [engine._prefill_whole([job]) for job in jobs]
        assert len(calls) == 9
        lm = model.language_model
        for job, (values, hidden), ((own_values, own_hidden),) in zip(jobs, packed, alone):
            assert values.shape == own_values.shape == (4, len(job.request.prompt), 80)
            torch.testing.assert_close(values, own_values, atol=1e-4, rtol=1e-4)
            logits, own = lm.logits(hidden), lm.logits(own_hidden)
            torch.testing.assert_close(logits, own, atol=1e-4, rtol=1e-4)
            assert logits.argmax() == own.argmax()
        assert len({int(lm.logits(h).argmax()) for _, h in packed}) > 1  # different prompts, different first tokens


def test_a_bad_prompt_packed_with_good_ones_fails_alone(loaded):
    model, processor = loaded
    messages = [local for task in ("gui", "ocr") for _, local in _questions(task, 1)]
    engine = Engine(model, processor, max_batch=4)
    engine.start()
    try:
        alone = [_Client(engine, m, 8).text() for m in messages]
    finally:
        engine.shutdown()
    engine = Engine(model, processor, max_batch=4)
    packs, whole = [], engine._prefill_whole
    engine._prefill_whole = lambda group: (packs.append(len(group)), whole(group))[1]
    events = []
    bad = _request(processor, messages[0], events.append)
    bad.prompt = bad.prompt[:5] + [model.config.text_config.vocab_size + 5]  # a token id past the vocabulary
    bad.pixel_values = bad.image_grid_hws = None
    first = _Client(engine, messages[0], 8)
    engine.submit(bad)
    second = _Client(engine, messages[1], 8)
    engine.start()  # all three wait: one pack
    try:
        assert [first.text(), second.text()] == alone and alone[0] != alone[1]
    finally:
        engine.shutdown()
    assert events[0][0] == "error" and "prefill failed" in events[0][1]
    assert packs == [3, 1, 1, 1]  # the pack failed, then each prompt went alone


def test_a_burst_of_waiting_prompts_gets_up_to_burst_chunks_per_turn(loaded):
    model, processor = loaded
    engine = Engine(model, processor, max_batch=32, prefill_chunk=64)  # not started: its turns are called here
    questions = [[{"role": "user", "content": f"Question {i}: what colour is the square?"}] for i in range(16)]
    jobs = collections.deque(_Prefill(_request(processor, q), model) for q in questions)
    width = len(jobs[0].request.prompt)
    packs, whole = [], engine._prefill_whole
    engine._prefill_whole = lambda group: (packs.append(sum(len(j.request.prompt) for j in group)), whole(group))[1]
    with torch.inference_mode():
        first = engine._prefill(jobs, running=0)  # 16 wait, none decodes: up to PREFILL_BURST chunks in one pack
        assert 64 < packs[0] <= PREFILL_BURST * 64 < packs[0] + width and len(first) == packs[0] // width
        second = engine._prefill(jobs, running=len(jobs))  # no more wait than rows decode: one chunk
    assert packs[1] <= 64 < packs[1] + width and len(second) == packs[1] // width
    assert len({len(j.request.prompt) for j in jobs}) == 1 and len(jobs) == 16 - len(first) - len(second)


def test_a_token_that_completes_two_stop_strings_ends_the_text_before_the_earlier():
    """The stop strings were tried in list order: "A re" came back for stop ["d", "re"] (and "A " for ["re", "d"])."""
    from kimivl.serve.engine import _Choice

    class Pieces:  # token i is the i-th piece of text
        pieces = ["A ", "red"]

        def is_special(self, token):
            return False

        def token_bytes(self, token):
            return self.pieces[token].encode()

    for stop in (["d", "re"], ["re", "d"]):
        events = []
        request = Request([1], None, None, SamplingParams(max_new_tokens=8), events.append, stop=stop)
        choice = _Choice(request, 0, Pieces(), torch.device("cpu"), context=64)
        choice.add(0, set())
        choice.add(1, set())
        assert choice.text == "A " and choice.finish == "stop", stop
        assert "".join(e[2] for e in events if e[0] == "text") == "A "


def test_a_choice_that_ends_inside_a_character_ends_its_text_with_a_replacement_character():
    """The first bytes of a character wait for the rest; a choice that reaches its length before them ends with one
    U+FFFD for them (as decoding its tokens' bytes gives), not with nothing."""
    from kimivl.serve.engine import _Choice

    class Bytes:  # token i is the i-th byte string: "A", then two of the three bytes of a CJK character
        pieces = [b"A", b"\xe4", b"\xb8"]

        def is_special(self, token):
            return False

        def token_bytes(self, token):
            return self.pieces[token]

    events = []
    request = Request([1], None, None, SamplingParams(max_new_tokens=3), events.append)
    choice = _Choice(request, 0, Bytes(), torch.device("cpu"), context=64)
    for token in (0, 1, 2):
        choice.add(token, set())
    assert [e for e in events if e[0] == "text"] == [("text", 0, "A"), ("text", 0, "\ufffd")]
    assert choice.text == b"A\xe4\xb8".decode("utf-8", errors="replace") == "A\ufffd"
    assert events[-1] == ("done", 0, "length", 3)


def test_each_logprobs_event_holds_the_records_of_the_text_event_after_it_while_a_stop_string_holds_text_back():
    """With stop "ZZZZZ" four characters wait: a record's span counts from the start of the whole text, not of the
    held text (measured from the held text, records go out with the wrong piece, and those of the stop string's
    tokens outlive its cut)."""
    from kimivl.serve.engine import _Choice

    class Letters:  # token i is the character chr(i)
        def is_special(self, token):
            return False

        def token_bytes(self, token):
            return bytes([token])

    def events(text: str) -> list[tuple]:
        got = []
        request = Request([1], None, None, SamplingParams(max_new_tokens=100), got.append, stop=["ZZZZZ"], logprobs=0)
        choice = _Choice(request, 0, Letters(), torch.device("cpu"), context=4096)
        for ch in text:
            choice.add(ord(ch), set(), (ch,))
            if choice.finish:
                return got
        choice._end("length")
        return got

    got = events("abcdefghij")
    texts = [e[2] for e in got if e[0] == "text"]
    assert "".join(texts) == "abcdefghij" and len(texts) > 1
    for i, e in enumerate(got):
        if e[0] == "logprobs":
            assert got[i + 1][0] == "text" and "".join(r[0] for r in e[2]) == got[i + 1][2], got
    got = events("abcdefgh" + "ZZZZZ")
    assert "".join(e[2] for e in got if e[0] == "text") == "abcdefgh"
    assert "".join(r[0] for e in got if e[0] == "logprobs" for r in e[2]) == "abcdefgh"
    assert got[-1] == ("done", 0, "stop", 13)


PIECES = [b"a", b"a", b"aa", b"aaaaa", b"b", b"ab", b"\n", "é".encode(), b"\xc3", b"\xa9", b"\xff"]  # "é" in halves


@st.composite
def outputs_and_stops(draw) -> tuple[list[int], list[str]]:
    """Tokens of PIECES, and up to 4 stop strings: pieces of their text (up to 40 characters, past the tail that is
    looked for first), some with a character changed."""
    tokens = draw(st.lists(st.integers(0, len(PIECES) - 1), min_size=1, max_size=80))
    text = b"".join(PIECES[t] for t in tokens).decode(errors="replace")
    stop = []
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(text) - 1))
        s = text[at : at + draw(st.integers(1, 40))]
        if draw(st.booleans()):
            i = draw(st.integers(0, len(s) - 1))
            s = s[:i] + draw(st.sampled_from("ab\né")) + s[i + 1 :]
        stop.append(s)
    return tokens, stop


@pytest.mark.parametrize("tail", [1, 3, engine_module.STOP_TAIL])
@settings(max_examples=200, deadline=None, derandomize=True)
@given(outputs_and_stops())
def test_a_choice_ends_where_the_whole_text_so_far_first_holds_a_stop_string(tail, case):
    """A choice looks for each stop string by its last ``STOP_TAIL`` characters in the text a token adds (then
    compares the whole string there), and holds back the text that may start one: what it sends is what searching
    the whole text after each token gives. Shorter tails than the engine's check the whole string more often."""
    from kimivl.serve.engine import _Choice

    class Pieces:
        def is_special(self, token):
            return False

        def token_bytes(self, token):
            return PIECES[token]

    tokens, stop = case
    decoder, text, expected = codecs.getincrementaldecoder("utf-8")(errors="replace"), "", None
    for token in tokens:
        text += decoder.decode(PIECES[token])
        if hits := [at for s in stop if (at := text.find(s)) >= 0]:
            expected = (text[: min(hits)], "stop")
            break
    expected = expected or (text + decoder.decode(b"", final=True), "length")
    events = []
    request = Request([1], None, None, SamplingParams(max_new_tokens=len(tokens)), events.append, stop=stop)
    choice = _Choice(request, 0, Pieces(), torch.device("cpu"), context=len(tokens) + 1)
    with mock.patch.object(engine_module, "STOP_TAIL", tail):
        for token in tokens:
            if choice.finish is None:
                choice.add(token, set())
    assert ("".join(e[2] for e in events if e[0] == "text"), choice.finish) == expected
    assert choice.text == expected[0]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("poison", ["+inf", "all -inf", "nan"])
def test_a_decode_step_with_nothing_to_choose_from_fails_its_requests_and_the_engine_goes_on(
    loaded, monkeypatch, temperature, poison
):
    """+inf logits (an overflow) made greedy rows take the argmax silently and sampled rows raise out of the step;
    now each such row's request fails with the reason, and the engine serves the next request."""
    model, processor = loaded
    lm = model.language_model
    real, real_step, poisoned, stepping = lm.logits, Engine._step, threading.Event(), threading.Event()

    def step(self, batch):  # a decode step's logits are poisoned, not a prefill's
        stepping.set()
        try:
            real_step(self, batch)
        finally:
            stepping.clear()

    def logits(hidden):
        out = real(hidden)
        if poisoned.is_set() and stepping.is_set():
            out = out.clone()
            if poison == "+inf":
                out[:, 7] = float("inf")
            else:
                out[:] = float("-inf") if poison == "all -inf" else float("nan")
        return out

    monkeypatch.setattr(lm, "logits", logits)
    monkeypatch.setattr(Engine, "_step", step)
    engine = Engine(model, processor, max_batch=4)
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=6, temperature=temperature, seed=1)
        events = [[] for _ in range(3)]
        done = [threading.Event() for _ in range(3)]

        def submit(i):
            def emit(event):
                events[i].append(event)
                if event[0] in ("done", "error"):
                    done[i].set()

            messages = [{"role": "user", "content": f"What is {i} plus {i}?"}]
            engine.submit(Request(processor.encode(messages).input_ids, None, None, params, emit))

        poisoned.set()
        submit(0), submit(1)
        assert done[0].wait(60) and done[1].wait(60)
        want = {"+inf": "hold \\+inf", "all -inf": "no finite value", "nan": "hold NaN"}[poison]
        for i in (0, 1):
            assert events[i][-1][0] == "error", events[i]
            assert re.search(f"next token cannot be chosen: .*{want}", events[i][-1][1]), events[i][-1]
        poisoned.clear()
        submit(2)
        assert done[2].wait(60) and events[2][-1][0] == "done" and events[2][-1][3] > 0, events[2]
    finally:
        engine.shutdown()


def test_requests_cancelled_while_queued_give_up_their_places(loaded):
    """Clients that left while queued kept their places: a new request got QueueFull and the queue gauge stayed full;
    a dead request at the head whose choices did not fit held back a live one behind it until rows were free."""
    model, processor = loaded
    engine = Engine(model, processor, max_batch=2, max_queue=2)  # not started
    dead = [_request(processor, [{"role": "user", "content": "Hi"}]) for _ in range(2)]
    for request in dead:
        engine.submit(request)
    for request in dead:
        request.cancel()
    alive = _Client(engine, [{"role": "user", "content": "Hi"}], 3)  # raised QueueFull
    assert engine.metrics.queue_length == 1 and engine.metrics.requests["cancelled"] == 2

    engine = Engine(model, processor, max_batch=2)
    engine.start()
    try:
        _, thinking = _questions("reasoning", 1)[0]
        running = _Client(engine, thinking, 200)  # one of the two rows for 200 steps
        while not any(e[0] == "text" for _, e in running.events):
            time.sleep(0.005)
        head = _request(processor, [{"role": "user", "content": "Hi"}])
        head.n = 2  # waits for both rows
        engine.submit(head)
        alive = _Client(engine, [{"role": "user", "content": "Hi"}], 3)
        head.cancel()
        alive.text()
        assert not running.done.is_set()  # answered beside the running request, not after it
        assert engine.metrics.requests["cancelled"] == 1 and engine.metrics.queue_length == 0
    finally:
        engine.shutdown()


def test_a_request_is_counted_once_when_its_last_choice_leaves_with_all_its_tokens(loaded, monkeypatch):
    """With n=2, choice 0 ending then the client leaving counted ok and cancelled, and only choice 0's tokens; choice 0
    ending then choice 1 failing counted ok and error. Now: one outcome per request, every choice's tokens."""
    model, processor = loaded
    lm = model.language_model
    messages = [{"role": "user", "content": "Describe a red circle."}]
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=11)

    def run(emit=lambda event, request: None):
        engine, events = Engine(model, processor, max_batch=2), []
        ids = processor.encode(messages).input_ids
        request = Request(ids, None, None, params, lambda e: (events.append(e), emit(e, request)), n=2, stop=stop)
        engine.submit(request)
        engine.start()
        try:
            _wait(lambda: engine.metrics.requests.total())
        finally:
            engine.shutdown()  # after the turn that counted the outcome
        return engine.metrics, events

    stop = []
    _, events = run()
    texts = ["".join(e[2] for e in events if e[0] == "text" and e[1] == i) for i in (0, 1)]
    cut = next(i for i in range(8, 60) if texts[0][i : i + 4].strip() and texts[0][i : i + 4] not in texts[1])
    stop = [texts[0][cut : cut + 4]]  # choice 0 stops at it, choice 1 runs on

    metrics, events = run(lambda event, request: event[:2] == ("done", 0) and request.cancel())
    ((_, _, reason, tokens0),) = [e for e in events if e[0] == "done"]
    assert reason == "stop" and tokens0 > 1
    assert dict(metrics.requests) == {"cancelled": 1}
    # choice 1 took as many tokens as choice 0, less the step's own: the cancel came while the step was at choice 0
    assert metrics.completion_tokens == 2 * tokens0 - 1

    poisoned, real = threading.Event(), lm.logits
    monkeypatch.setattr(lm, "logits", lambda hidden: real(hidden) * (float("nan") if poisoned.is_set() else 1))
    metrics, events = run(lambda event, request: event[:2] == ("done", 0) and poisoned.set())
    assert [e[0] for e in events if e[0] != "text"] == ["done", "error"]
    assert dict(metrics.requests) == {"error": 1}
    assert metrics.completion_tokens == 2 * events[[e[0] for e in events].index("done")][3]


def _wait(condition, seconds: float = 60.0) -> None:
    """Poll ``condition`` every 10 ms until it holds or ``seconds`` pass (the caller asserts what it needs)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_completion_tokens_leave_out_the_stop_token_as_generate_ids_does(engine):
    """An answer that ends on a stop id counts its tokens before it: as many as ``generate_ids`` returns."""
    model, processor = engine.model, engine.processor
    _, messages = _questions("ocr", 1)[0]  # the tiny model answers it in a few tokens and stops
    encoded = processor.encode(messages)
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    ids = generate_ids(
        model, [encoded.input_ids], encoded.pixel_values, encoded.image_grid_hws, params, processor.stop_ids
    )[0]
    counted, ok = engine.metrics.completion_tokens, engine.metrics.requests["ok"]
    client = _Client(engine, messages, 40)
    assert client.text() == processor.decode(ids)
    ((_, _, reason, tokens),) = [e for _, e in client.events if e[0] == "done"]
    assert reason == "stop" and tokens == len(ids) < 40
    _wait(lambda: engine.metrics.requests["ok"] == ok + 1)  # counted as the row leaves, after its done event
    assert engine.metrics.completion_tokens == counted + len(ids)


def test_a_prompt_that_is_empty_or_fills_the_context_is_refused_before_it_joins_the_batch(loaded, engine):
    """A prompt of exactly the context's tokens prefilled, then its first decode step (at position = context) failed
    every request in the batch; it is now refused at submit. One token shorter fits: it ends at the context."""
    model, processor = loaded
    context = model.config.text_config.max_position_embeddings
    _, thinking = _questions("reasoning", 1)[0]
    alone = _Client(engine, thinking, 48).text()
    running = _Client(engine, thinking, 48)
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    for prompt in ([], [1] * context):
        refused = f"a prompt of {len(prompt)} tokens: .* fewer than the context of {context}"
        with pytest.raises(ValueError, match=refused):
            engine.submit(Request(prompt, None, None, params, lambda event: None))
    events, finished = [], threading.Event()

    def emit(event):
        events.append(event)
        if event[0] in ("done", "error"):
            finished.set()

    engine.submit(Request([1] * (context - 1), None, None, params, emit))
    assert running.text() == alone
    assert finished.wait(60) and events[-1][0] == "done", events[-1]
    assert events[-1][2:] == ("length", 1)  # its one token fills the context (it took a second one past it)


def test_an_engine_needs_a_row_a_place_and_a_chunk_and_a_request_its_choices_in_one_batch(loaded):
    """An engine of no rows, queue places or prefill tokens would never answer, nor would a request of more choices
    than its rows (it would wait at the head of the queue for good): each is a ValueError naming the numbers."""
    model, processor = loaded
    for sizes in ({"max_batch": 0}, {"max_queue": 0}, {"prefill_chunk": 0}):
        with pytest.raises(ValueError, match="max_batch, max_queue and prefill_chunk must be >= 1, got"):
            Engine(model, processor, **sizes)
    engine = Engine(model, processor, max_batch=2)  # not started
    params = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="n=3 choices do not fit the batch of 2 rows"):
        engine.submit(Request([1, 2], None, None, params, lambda event: None, n=3))
    engine.submit(Request([1, 2], None, None, params, lambda event: None, n=2))
    assert engine.metrics.queue_length == 1


def test_a_request_waits_for_a_free_row_while_the_batch_is_full(loaded):
    """``max_batch`` bounds the rows decoding together and those being prefilled: a third request joins a long
    prompt (prefilled over several turns) and a short one only once a row left."""
    model, processor = loaded
    engine = Engine(model, processor, max_batch=2, prefill_chunk=16)  # started once all three wait
    engine._stop_ids = set()  # every request runs to its max_new_tokens
    long = processor.encode([{"role": "user", "content": " ".join(f"item {i} is red;" for i in range(20))}]).input_ids
    short = processor.encode([{"role": "user", "content": "Say hi"}]).input_ids
    assert len(long) > 4 * 16  # more than one turn's passes
    order = []
    for name, prompt, n in (("a", long, 12), ("b", short, 3), ("c", short, 3)):
        emit = lambda event, name=name: order.append((name, event[0]))  # noqa: E731
        engine.submit(Request(prompt, None, None, SamplingParams(max_new_tokens=n), emit))
    engine.start()
    try:
        _wait(lambda: ("c", "done") in order and ("a", "done") in order)
    finally:
        engine.shutdown()
    first_c = [name for name, _ in order].index("c")
    assert ("b", "done") in order[:first_c] and ("a", "done") not in order[:first_c], order
    assert engine.metrics.requests["ok"] == 3


def test_the_engine_stops_at_the_context_as_generate_ids_does(loaded, monkeypatch):
    """A prompt of context - 3 tokens got 4 tokens (prompt + completion = context + 1) and one of context - 1 got 2:
    the step ended a row after the token at the context, and the first token was never checked. Now each row stops
    where ``generate_ids`` does, with its tokens, alone and beside running rows (a context of 64, no stop ids)."""
    model, processor = loaded
    context = 64
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", context)
    text = " ".join(f"item {i} is red;" for i in range(40))
    ids = processor.encode([{"role": "user", "content": text}]).input_ids
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    submit = lambda engine, prompt: _submit(engine, prompt, params)  # noqa: E731
    prompts = [ids[:n] for n in (context - 1, context - 2, context - 3, context - 20)]
    want = [generate_ids(model, [p], params=params)[0] for p in prompts]
    assert [len(w) for w in want] == [1, 2, 3, 10]
    engine = Engine(model, processor, max_batch=4, prefill_chunk=16)
    engine._stop_ids = set()
    engine.start()
    try:
        for prompt, ref in zip(prompts, want):  # alone
            assert _tokens(*submit(engine, prompt)) == ref
        running = submit(engine, prompts[-1])  # the edge prompts join a running row, then decode beside it
        _wait(lambda: any(e[0] == "text" for e in running[0]))
        edges = [submit(engine, p) for p in prompts[:3]]
        assert [_tokens(*e) for e in edges] + [_tokens(*running)] == want
    finally:
        engine.shutdown()
    assert engine.metrics.completion_tokens == 2 * sum(len(w) for w in want)


def _submit(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[tuple], threading.Event]:
    """Submit ``prompt`` asking for logprobs; returns its events and an event set by its ``done`` or ``error``."""
    events, done = [], threading.Event()

    def emit(event):
        events.append(event)
        if event[0] in ("done", "error"):
            done.set()

    engine.submit(Request(prompt, None, None, params, emit, logprobs=0))
    return events, done


def _tokens(events: list[tuple], done: threading.Event) -> list[int]:
    """A request's tokens, read from its logprob records (all of them: the caller's engine has no stop ids, and it
    has no stop strings), once it ended at its length."""
    assert done.wait(60) and events[-1][0] == "done", events[-1:]
    got = [record[0] for e in events if e[0] == "logprobs" for record in e[2]]
    assert events[-1][2:] == ("length", len(got))
    return got


def test_a_batch_is_re_laid_when_rows_join_or_leave_not_at_every_step(loaded, monkeypatch):
    """A re-lay copies the whole cache: rows decoding together are laid once when they join and dropped once when they
    end, not re-laid at each of their steps (only a crowded cache, at the context or half padding, is re-laid)."""
    model, processor = loaded
    relays, relay = [], engine_module._Batch.relay
    monkeypatch.setattr(engine_module._Batch, "relay", lambda self, *a: (relays.append(len(a)), relay(self, *a))[1])
    ids = processor.encode([{"role": "user", "content": "Hi"}]).input_ids
    engine = Engine(model, processor, max_batch=2)
    engine._stop_ids = set()
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    requests = [_submit(engine, ids, params) for _ in range(2)]
    engine.start()
    try:
        assert [len(_tokens(*r)) for r in requests] == [12, 12]
        _wait(lambda: engine.metrics.batch_size == 0)
    finally:
        engine.shutdown()
    assert relays == [1, 0], relays  # the two rows joining, then dropping the empty batch


def test_choice_seeds_wrap_around_at_2_to_the_64(engine):
    """Choice i samples with (seed + i) mod 2**64: at the top seed the first choice draws as ``generate_ids`` with
    that seed, the second as with seed 0."""
    model, processor = engine.model, engine.processor
    prompt = processor.encode([{"role": "user", "content": "Say hi"}]).input_ids
    params = {seed: SamplingParams(max_new_tokens=8, temperature=1.0, seed=seed) for seed in (MAX_SEED, 0)}
    want = [generate_ids(model, [prompt], params=params[seed], stop_ids=processor.stop_ids)[0] for seed in params]
    assert want[0] != want[1]
    events = []
    engine.submit(Request(prompt, None, None, params[MAX_SEED], events.append, n=2, logprobs=0))
    _wait(lambda: len([e for e in events if e[0] in ("done", "error")]) == 2)
    got = [[r[0] for e in events if e[0] == "logprobs" and e[1] == i for r in e[2]] for i in (0, 1)]
    assert got == want
