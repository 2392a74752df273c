"""The engine's fault isolation: a failure in one request's admission, prefill chunk, first token or joining the
batch fails that request alone, while a running row goes on to the tokens it gets alone; a failure of the shared
decode step fails every row of the batch; either way the engine then serves a new request and its counters add up.
A request cancelled mid-prefill takes no more prefill passes."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import MODELS
from test_engine import _submit, _tokens, _wait

from kimivl import KimiVL, KimiVLProcessor
from kimivl.inference.generate import generate_ids
from kimivl.inference.sampling import SamplingParams
from kimivl.serve import engine as engine_module
from kimivl.serve.engine import Engine, Request


@pytest.fixture(scope="module")
def loaded():
    model = KimiVL.from_pretrained(MODELS / "kimivl-tiny", dtype=torch.float32, device="cpu")
    return model, KimiVLProcessor.from_pretrained(MODELS / "kimivl-tiny")


def _ids(processor, text: str) -> list[int]:
    return processor.encode([{"role": "user", "content": text}]).input_ids


def _inject(monkeypatch, site: str, bad: Request, fired: list) -> None:
    """Make ``site`` raise for ``bad`` (for the shared decode step: for a batch holding it), appending to ``fired`` the
    completion tokens the batch's rows hold then."""

    def fail(rows=()):
        fired.append(sum(r.tokens for r in rows if r is not None))
        raise RuntimeError(f"injected {site} fault")

    if site == "admission":
        real_prefill = engine_module._Prefill
        monkeypatch.setattr(engine_module, "_Prefill", lambda r, m: fail() if r is bad else real_prefill(r, m))
    elif site == "prefill chunk":  # its second pass of several

        def prefill_pass(self, job, real=Engine._prefill_pass):
            return fail() if job.request is bad and job.done else real(self, job)

        monkeypatch.setattr(Engine, "_prefill_pass", prefill_pass)
    elif site == "first token":

        def sample_next(logits, params, generator, real=engine_module.sample_next):
            return fail() if params is bad.params else real(logits, params, generator)

        monkeypatch.setattr(engine_module, "sample_next", sample_next)
    elif site == "joining the batch":

        def add(self, entries, real=engine_module._Batch.add):
            return fail() if any(c.request is bad for c, _, _ in entries) else real(self, entries)

        monkeypatch.setattr(engine_module._Batch, "add", add)
    else:  # the decode step all rows share

        def step(self, batch, real=Engine._step):
            return (
                fail(batch.rows) if any(r is not None and r.request is bad for r in batch.rows) else real(self, batch)
            )

        monkeypatch.setattr(Engine, "_step", step)


@pytest.mark.parametrize(
    "site, message",
    [
        ("admission", "admission failed"),
        ("prefill chunk", "prefill failed"),
        ("first token", "prefill failed"),
        ("joining the batch", "admission failed"),
        ("decode step", "generation failed"),
    ],
)
def test_a_fault_fails_its_request_alone_or_the_whole_batch_and_the_engine_goes_on(loaded, monkeypatch, site, message):
    model, processor = loaded
    running_ids, after_ids = _ids(processor, "Describe a red circle."), _ids(processor, "Say hi")
    bad_ids = _ids(processor, "Read this. " + " ".join(f"item {i} is red;" for i in range(12)))
    assert len(bad_ids) > 3 * 16 > len(running_ids)  # prefilled in passes of 16 tokens; the others in one
    running_params, short = SamplingParams(max_new_tokens=48), SamplingParams(max_new_tokens=5)
    running_alone = generate_ids(model, [running_ids], params=running_params)[0]
    after_alone = generate_ids(model, [after_ids], params=short)[0]
    bad_events, bad_done = [], threading.Event()
    bad_params = SamplingParams(max_new_tokens=5)  # its own object: the first-token fault knows it by it
    bad = Request(
        bad_ids,
        None,
        None,
        bad_params,
        lambda e: (bad_events.append(e), e[0] == "error" and bad_done.set()),
        logprobs=0,
    )
    fired = []
    _inject(monkeypatch, site, bad, fired)
    engine = Engine(model, processor, max_batch=4, prefill_chunk=16)
    engine._stop_ids = set()  # every request runs to its max_new_tokens
    engine.start()
    try:
        running = _submit(engine, running_ids, running_params)
        _wait(lambda: any(e[0] == "text" for e in running[0]))
        engine.submit(bad)
        assert bad_done.wait(60) and len(fired) == 1, fired  # the fault fired once: the request was not retried
        assert bad_events[-1] == ("error", f"{message}: injected {site} fault"), bad_events
        sampled = site in ("joining the batch", "decode step")  # its first token was sent before the fault
        assert len([r for e in bad_events if e[0] == "logprobs" for r in e[2]]) == sampled, bad_events
        monkeypatch.undo()
        after = _submit(engine, after_ids, short)
        assert _tokens(*after) == after_alone
        if site == "decode step":  # the running row failed with it, after the tokens it has alone
            assert running[1].wait(60) and running[0][-1] == ("error", f"{message}: injected {site} fault")
            got = [record[0] for e in running[0] if e[0] == "logprobs" for record in e[2]]
            assert 0 < len(got) < len(running_alone) and got == running_alone[: len(got)]
        else:
            assert _tokens(*running) == running_alone
    finally:
        engine.shutdown()  # after the turn that counted the last outcome
    if site == "decode step":
        assert dict(engine.metrics.requests) == {"error": 2, "ok": 1}
        assert engine.metrics.completion_tokens == fired[0] + len(after_alone)  # the failed rows' tokens counted
    else:
        assert dict(engine.metrics.requests) == {"error": 1, "ok": 2}
        assert engine.metrics.completion_tokens == len(running_alone) + len(after_alone) + sampled
    assert engine.metrics.batch_size == engine.metrics.queue_length == 0


def test_a_request_cancelled_mid_prefill_takes_no_more_passes(loaded, monkeypatch):
    """A long prompt whose client leaves during its third of eight passes: its job is dropped at the next turn (no
    event, counted cancelled), and the request waiting behind it is answered."""
    model, processor = loaded
    engine = Engine(model, processor, max_batch=2, prefill_chunk=8)
    events = []
    request = Request(_ids(processor, "word " * 60), None, None, SamplingParams(max_new_tokens=5), events.append)
    after_ids = _ids(processor, "Say hi")
    passes, real = [], Engine._prefill_pass

    def prefill_pass(self, job):
        real(self, job)
        if job.request is request:
            passes.append(job.done)
            if len(passes) == 3:
                request.cancel()

    monkeypatch.setattr(Engine, "_prefill_pass", prefill_pass)
    engine.submit(request)
    after = _submit(engine, after_ids, SamplingParams(max_new_tokens=3))  # admitted with it, prefilled after it
    engine.start()
    try:
        assert after[1].wait(60) and after[0][-1][:3] == ("done", 0, "length"), after[0][-1:]
    finally:
        engine.shutdown()
    assert len(request.prompt) > 7 * 8 and passes == [8, 16, 24] and events == []
    assert dict(engine.metrics.requests) == {"cancelled": 1, "ok": 1}
    assert engine.metrics.prompt_tokens == len(after_ids) and engine.metrics.batch_size == 0


def test_a_request_failing_to_join_after_a_choice_took_a_free_slot_frees_the_slot(loaded, monkeypatch):
    """A request of two choices joins a batch with one free slot: the first choice takes the slot, then the re-lay for
    the second fails (a cache allocation out of memory, say). The request fails alone, its placed choice leaves the
    slot, its tokens counted once, and the running row answers as alone."""
    model, processor = loaded
    long_ids, short_ids = _ids(processor, "Describe a red circle."), _ids(processor, "Say hi")
    long_params = SamplingParams(max_new_tokens=24)
    long_alone = generate_ids(model, [long_ids], params=long_params)[0]
    events, fired = [], []
    bad = Request(short_ids, None, None, SamplingParams(max_new_tokens=5), events.append, n=2)

    def relay(self, new=(), real=engine_module._Batch.relay):
        if any(c.request is bad for c, _, _ in new):
            fired.append(len(new))
            raise RuntimeError("injected re-lay fault")
        return real(self, new)

    monkeypatch.setattr(engine_module._Batch, "relay", relay)
    engine = Engine(model, processor, max_batch=3)
    engine._stop_ids = set()  # every request runs to its max_new_tokens
    running, first = (
        _submit(engine, long_ids, long_params),
        _submit(engine, short_ids, SamplingParams(max_new_tokens=3)),
    )
    engine.submit(bad)  # it waits for two free rows: the first one frees when the short request ends
    engine.start()
    try:
        assert len(_tokens(*first)) == 3 and _tokens(*running) == long_alone
        assert fired == [1]  # the other choice took the free slot
        assert events[-1] == ("error", "admission failed: injected re-lay fault")
    finally:
        engine.shutdown()
    assert dict(engine.metrics.requests) == {"error": 1, "ok": 2}
    assert engine.metrics.completion_tokens == len(long_alone) + 3 + 2  # and the failed choices' first tokens, once
    assert engine.metrics.batch_size == 0
