"""``logprobs`` / ``top_logprobs``: the raw distribution's log-probabilities of each generated token (a float32
log-softmax of the logits before temperature and top-p), equal to a full forward's; the most likely tokens sorted;
streamed entries adding up to the plain answer's, with stop strings and several choices; bad values refused; the
``openai`` client's types read them."""

from __future__ import annotations

import json
import threading
import urllib.request

import openai
import pytest
import torch
from conftest import live_server
from openai.types.chat import chat_completion, chat_completion_chunk
from openai.types.chat.chat_completion_token_logprob import ChatCompletionTokenLogprob, TopLogprob
from test_serve import _client, _post, _questions

from kimivl.inference.generate import generate_ids
from kimivl.inference.sampling import SamplingParams
from kimivl.serve import engine as engine_module
from kimivl.serve.app import _Reply
from kimivl.serve.engine import Engine, Request
from kimivl.serve.schema import Limits, RequestError, parse_chat_request

TEXT = [{"role": "user", "content": "Describe a red circle."}]
GOOD = {"model": "kimivl-tiny", "messages": TEXT, "max_tokens": 3}


def _ask(client: openai.OpenAI, messages=TEXT, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 16, "logprobs": True, **kwargs}
    return client.chat.completions.create(model="kimivl-tiny", messages=messages, **kwargs)


def _streamed(client: openai.OpenAI, n: int = 1, **kwargs) -> tuple[list[str], list[list]]:
    """Each choice's streamed content and its logprobs entries, chunk after chunk joined; checks that each entry came
    with the chunk that carried the end of its token's text: after each chunk, the entries sent end within the text
    sent (but for a token that a stop string cuts), the next one beyond it."""
    texts, entries = [""] * n, [[] for _ in range(n)]
    sent = []  # (choice, characters sent, entries sent) after each chunk
    for chunk in _ask(client, n=n, stream=True, **kwargs):
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.logprobs is not None:
            assert isinstance(choice.logprobs, chat_completion_chunk.ChoiceLogprobs) and choice.logprobs.content
            entries[choice.index] += choice.logprobs.content
        sent.append((choice.index, len(texts[choice.index]), len(entries[choice.index])))
    for i, chars, count in sent:
        ends = [len("".join(e.token for e in entries[i][: j + 1])) for j in range(len(entries[i]))]
        if chars < len(texts[i]):  # before the last text (which may end inside a token cut by a stop string)
            assert count == 0 or ends[count - 1] <= chars, (i, chars, count, ends)
        assert count == len(ends) or chars < ends[count], (i, chars, count, ends)
    return texts, entries


def _same(got: list, want: list) -> None:
    """Two runs' entries: the same tokens and alternatives, their logprobs within 1e-5 (a batch of another shape
    rounds differently: the engine is not bit-for-bit under load)."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a.token, a.bytes, [(t.token, t.bytes) for t in a.top_logprobs]) == (
            b.token,
            b.bytes,
            [(t.token, t.bytes) for t in b.top_logprobs],
        )
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [t.logprob for t in a.top_logprobs] == pytest.approx([t.logprob for t in b.top_logprobs], abs=1e-5)


def _ids(tokenizer, entries) -> list[int]:
    """The token ids of ``entries``, from their exact bytes (a special token from its name)."""
    return [
        tokenizer.special_tokens[e.token] if e.bytes is None else tokenizer.mergeable_ranks[bytes(e.bytes)]
        for e in entries
    ]


def test_greedy_logprobs_equal_the_log_softmax_of_a_full_forward(tiny):
    url, engine = tiny
    client, tokenizer = _client(url), engine.processor.tokenizer
    for api, local in [(TEXT, TEXT), _questions("gui", 1)[0]]:
        r = _ask(client, api, top_logprobs=5)
        (choice,) = r.choices
        entries = choice.logprobs.content
        assert len(entries) == r.usage.completion_tokens > 4  # the stop token, if one ended it, has none
        ids = _ids(tokenizer, entries)
        assert tokenizer.decode(ids) == choice.message.content  # the bytes are exact
        encoded = engine.processor.encode(local)
        prompt = encoded.input_ids
        assert len(prompt) == r.usage.prompt_tokens
        images = len(encoded.image_grid_hws) > 0
        with torch.inference_mode():
            logits = engine.model(
                torch.tensor([prompt + ids]),
                encoded.pixel_values if images else None,
                encoded.image_grid_hws if images else None,
            ).logits[0]
        want = logits.float().log_softmax(-1)[len(prompt) - 1 : -1]  # the distribution each token was drawn from
        for j, (e, token) in enumerate(zip(entries, ids)):
            assert e.logprob == pytest.approx(want[j, token].item(), abs=1e-4), (j, e.token)
            assert e.logprob == pytest.approx(want[j].max().item(), abs=1e-4)  # greedy: the most likely
            assert (e.top_logprobs[0].token, e.top_logprobs[0].logprob) == (e.token, e.logprob)
            top = want[j].topk(5).values.tolist()
            assert [t.logprob for t in e.top_logprobs] == pytest.approx(top, abs=1e-4)


def test_top_logprobs_are_sorted_as_many_as_asked_and_before_temperature(tiny):
    url, engine = tiny
    client = _client(url)
    greedy = _ask(client, top_logprobs=20, max_tokens=4).choices[0].logprobs.content
    for k in (0, 1, 7, 20):
        sampled = _ask(client, top_logprobs=k, temperature=1.5, top_p=0.9, seed=3, max_tokens=12)
        entries = sampled.choices[0].logprobs.content
        assert entries and all(len(e.top_logprobs) == k for e in entries)
        listed = 0
        for e in entries:
            values = [t.logprob for t in e.top_logprobs]
            assert values == sorted(values, reverse=True) and all(v <= 0 for v in values) and e.logprob <= 0
            assert len({(t.token, tuple(t.bytes or ())) for t in e.top_logprobs}) == k
            mine = [t.logprob for t in e.top_logprobs if t.token == e.token]
            if mine:
                listed += 1
                assert mine == [e.logprob]
            elif k:
                assert e.logprob <= values[-1]  # not among the k most likely: no more likely than the last
        assert listed or k == 0
        # the first token's distribution is the greedy answer's: raw, not divided by the temperature
        first = greedy[0].top_logprobs[:k]
        assert [t.token for t in entries[0].top_logprobs] == [t.token for t in first]
        assert [t.logprob for t in entries[0].top_logprobs] == pytest.approx([t.logprob for t in first], abs=1e-5)
    plain = _ask(client, logprobs=False).choices[0]
    assert plain.logprobs is None


def test_streamed_entries_add_up_to_the_plain_answers(tiny):
    url, engine = tiny
    client = _client(url)
    whole = _ask(client, top_logprobs=2).choices[0]
    texts, (entries,) = _streamed(client, top_logprobs=2)
    assert texts == [whole.message.content]
    _same(entries, whole.logprobs.content)

    # without stop strings nothing is held back: each chunk carries the entries of exactly its own text
    body = json.dumps({**GOOD, "stream": True, "temperature": 0, "max_tokens": 16, "logprobs": True}).encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer secret-key"}
    with urllib.request.urlopen(urllib.request.Request(url + "/v1/chat/completions", body, headers), timeout=30) as r:
        chunks = [json.loads(line[6:]) for line in r.read().decode().splitlines() if line.startswith("data: {")]
    for c in (c["choices"][0] for c in chunks):
        tokens = "".join(e["token"] for e in (c["logprobs"] or {"content": []})["content"])
        assert tokens == c["delta"].get("content", ""), c
        assert c["logprobs"] is None or c["logprobs"]["refusal"] is None

    # a stop string from inside one token into the next: the first keeps its entry (its text starts before the
    # cut), the next, and any after, have none
    content, tokens = whole.message.content, [e.token for e in whole.logprobs.content]
    starts = [len("".join(tokens[:i])) for i in range(len(tokens))]
    t = next(i for i in range(2, len(tokens) - 1) if len(tokens[i]) > 2 and len(tokens[i + 1]) > 1)
    cut = starts[t] + 2
    stop = content[cut : starts[t + 1] + 2]
    assert content.index(stop) == cut
    stopped = _ask(client, top_logprobs=2, stop=stop).choices[0]
    assert stopped.message.content == content[:cut] and stopped.finish_reason == "stop"
    _same(stopped.logprobs.content, whole.logprobs.content[: t + 1])
    texts, (entries,) = _streamed(client, top_logprobs=2, stop=stop)
    assert texts == [content[:cut]]
    _same(entries, whole.logprobs.content[: t + 1])

    # a stop string at a token's first character cuts all its text: that token has no entry either
    t = next(i for i in range(2, len(tokens)) if len(tokens[i]) > 1 and content.index(tokens[i][:2]) == starts[i])
    stop = tokens[t][:2]
    stopped = _ask(client, top_logprobs=2, stop=stop).choices[0]
    assert stopped.message.content == content[: starts[t]]
    _same(stopped.logprobs.content, whole.logprobs.content[:t])
    texts, (entries,) = _streamed(client, top_logprobs=2, stop=stop)
    assert texts == [content[: starts[t]]]
    _same(entries, whole.logprobs.content[:t])

    # two sampled choices with a seed: streamed as they are answered whole
    both = _ask(client, n=2, seed=5, temperature=1.0, top_logprobs=3)
    texts, entries = _streamed(client, n=2, seed=5, temperature=1.0, top_logprobs=3)
    assert texts == [c.message.content for c in both.choices] and texts[0] != texts[1]
    for mine, theirs in zip(entries, (c.logprobs.content for c in both.choices)):
        _same(mine, theirs)


def test_a_thinking_models_reasoning_tokens_have_entries_streamed_as_whole():
    """The reasoning splitter holds text back (a possible marker, whitespace): the entries wait with it, and the
    streamed ones join to the plain answer's, which cover every generated token, the reasoning's first."""
    with live_server("kimivl-tiny-thinking") as (url, engine):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)
        api, local = _questions("reasoning", 1)[0]
        ask = {"model": "kimivl-tiny-thinking", "messages": api, "temperature": 0, "max_tokens": 160, "logprobs": True}
        r = client.chat.completions.create(**ask)
        entries = r.choices[0].logprobs.content
        assert r.choices[0].message.reasoning_content and len(entries) == r.usage.completion_tokens
        encoded = engine.processor.encode(local)
        (expected,) = generate_ids(
            engine.model,
            [encoded.input_ids],
            encoded.pixel_values if len(encoded.image_grid_hws) else None,
            encoded.image_grid_hws if len(encoded.image_grid_hws) else None,
            SamplingParams(max_new_tokens=160, temperature=0.0),
            engine.processor.stop_ids,
        )
        assert _ids(engine.processor.tokenizer, entries) == expected
        streamed = []
        for chunk in client.chat.completions.create(**ask, stream=True):
            if chunk.choices and chunk.choices[0].logprobs is not None:
                streamed += chunk.choices[0].logprobs.content
        _same(streamed, entries)


def test_a_token_that_cannot_follow_gets_openais_minus_9999_never_minus_infinity(tiny):
    _, engine = tiny
    chat = parse_chat_request({**GOOD, "logprobs": True, "top_logprobs": 1}, LIMITS)
    reply = _Reply("kimivl-tiny", chat, 1, engine.processor.tokenizer)
    token = engine.processor.tokenizer.encode("A")[0]
    (entry,) = reply.entries([(token, float("-inf"), [(token, float("-inf"))])])
    top = {"token": "A", "logprob": -9999.0, "bytes": [65]}
    assert entry == {**top, "top_logprobs": [top]}
    past = engine.processor.tokenizer.vocab_size + 3  # a model's vocabulary may be larger than its tokenizer's
    (entry,) = reply.entries([(token, -1.0, [(past, -2.0)])])
    assert entry["top_logprobs"] == [{"token": f"<|id {past}|>", "logprob": -2.0, "bytes": None}]


def test_a_row_joining_a_running_batch_gets_the_logprobs_it_gets_alone_and_other_rows_none(tiny, monkeypatch):
    """A request that asks joins a batch whose row does not ask: its records equal those of it alone (its first
    token's from the prefill), and the other row gets no records, nor are any computed for it."""
    _, engine = tiny
    rows, real = [], engine_module.token_logprobs
    monkeypatch.setattr(
        engine_module, "token_logprobs", lambda logits, *a: (rows.append(len(logits)), real(logits, *a))[1]
    )
    processor = engine.processor
    local = Engine(engine.model, processor, max_batch=2)
    local.start()

    def submit(messages, tokens: int, logprobs: int | None):
        events, done = [], threading.Event()
        encoded = processor.encode(messages)
        request = Request(
            encoded.input_ids,
            None,
            None,
            SamplingParams(max_new_tokens=tokens, temperature=0.0),
            lambda e: (events.append(e), e[0] in ("done", "error") and done.set()),
            logprobs=logprobs,
        )
        local.submit(request)
        return events, done

    try:
        question = [{"role": "user", "content": "What is a square?"}]
        alone, done = submit(question, 8, 4)
        assert done.wait(60)
        running, running_done = submit(TEXT, 40, None)
        while not any(e[0] == "text" for e in running):
            assert not running_done.wait(0.01)
        joined, done = submit(question, 8, 4)
        assert not running_done.is_set()  # it joins the running row's batch
        assert done.wait(60) and running_done.wait(60)
    finally:
        local.shutdown()
    records = [[r for e in events if e[0] == "logprobs" for r in e[2]] for events in (alone, joined)]
    assert not [e for e in running if e[0] == "logprobs"]
    stops = sum(e[2] == "stop" for e in alone + joined if e[0] == "done")  # the stop token's was computed too
    assert rows == [1] * (len(records[0]) + len(records[1]) + stops)  # one row a call: never the running row's
    assert len(records[0]) == [e for e in alone if e[0] == "done"][0][3] > 1
    assert [r[0] for r in records[1]] == [r[0] for r in records[0]]
    for a, b in zip(*records):
        assert b[1] == pytest.approx(a[1], abs=1e-4) and [t for t, _ in b[2]] == [t for t, _ in a[2]]
        assert [v for _, v in b[2]] == pytest.approx([v for _, v in a[2]], abs=1e-4)


LIMITS = Limits(context=4096, max_batch=2)


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", r"must be an integer in \[0, 20\], got 21"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", "top_logprobs must be an integer"),
        ({"logprobs": True, "top_logprobs": 2.0}, "top_logprobs", "top_logprobs must be an integer"),
        ({"logprobs": True, "top_logprobs": True}, "top_logprobs", "top_logprobs must be an integer"),
        ({"top_logprobs": 5}, "top_logprobs", "top_logprobs=5 needs logprobs: true"),
        ({"logprobs": False, "top_logprobs": 1}, "top_logprobs", "top_logprobs=1 needs logprobs: true"),
        ({"logprobs": 1}, "logprobs", "logprobs must be true or false, got 1"),
        ({"logprobs": "true"}, "logprobs", "logprobs must be true or false, got 'true'"),
    ],
)
def test_bad_logprobs_fields_are_refused_by_name(fields, param, words):
    with pytest.raises(RequestError, match=words) as e:
        parse_chat_request({**GOOD, **fields}, LIMITS)
    assert e.value.status == 400 and e.value.param == param


def test_logprobs_fields_are_read_and_refused_over_http(tiny):
    url, _ = tiny
    chat = parse_chat_request({**GOOD, "logprobs": True, "top_logprobs": 20}, LIMITS)
    assert (chat.logprobs, chat.top_logprobs) == (True, 20)
    assert parse_chat_request({**GOOD, "logprobs": False, "top_logprobs": 0}, LIMITS) == parse_chat_request(
        GOOD, LIMITS
    )
    code, reply = _post(url, {**GOOD, "top_logprobs": 3})
    assert code == 400 and reply["error"]["param"] == "top_logprobs"
    assert "top_logprobs=3 needs logprobs: true" in reply["error"]["message"]
    code, reply = _post(url, {**GOOD, "logprobs": True, "top_logprobs": 0})
    assert code == 200 and all(e["top_logprobs"] == [] for e in reply["choices"][0]["logprobs"]["content"])


def test_the_openai_client_reads_the_logprobs_into_its_types(tiny):
    url, engine = tiny
    special = engine.processor.tokenizer.special_tokens
    choice = _ask(_client(url), top_logprobs=3).choices[0]
    assert isinstance(choice.logprobs, chat_completion.ChoiceLogprobs) and choice.logprobs.refusal is None
    for e in choice.logprobs.content:
        assert isinstance(e, ChatCompletionTokenLogprob) and not e.model_extra
        assert isinstance(e.token, str) and isinstance(e.logprob, float) and e.bytes == list(e.token.encode())
        assert len(e.top_logprobs) == 3 and all(isinstance(t, TopLogprob) for t in e.top_logprobs)
        assert all((t.bytes is None) == (t.token in special) for t in e.top_logprobs)


def test_tied_tokens_are_listed_lowest_id_first_so_a_greedy_token_leads():
    """Greedy decoding picks the lowest id among tied logits, but ``topk`` ordered ties as it liked: in bf16 (where
    ties are common) a greedy token came second behind its tie in 5 of 2,012 steps, and with top_logprobs 1 it was
    missing from its own list. Ties are now listed by id, at the cut of the k most likely too."""
    token_logprobs = engine_module.token_logprobs
    logits = torch.zeros(4, 64)
    logits[:, [50, 9, 33]] = 3.0  # a three-way tie at the top
    logits[:, 20] = 2.0
    logits[:, [60, 5]] = 1.0  # a tie across the cut of the 5 most likely
    greedy = logits.argmax(-1).tolist()
    rows = token_logprobs(logits, greedy, [1, 3, 5, 6])
    want = logits.log_softmax(-1)[0]
    assert [t for t, _, _ in rows] == [9] * 4
    for (_, lp, top), ids in zip(rows, ([9], [9, 33, 50], [9, 33, 50, 20, 5], [9, 33, 50, 20, 5, 60])):
        assert [i for i, _ in top] == ids
        assert [v for _, v in top] == pytest.approx(want[ids].tolist(), abs=1e-6) and lp == top[0][1]
    assert token_logprobs(logits[:2], [9, 20], [0, 0]) == [
        (9, pytest.approx(want[9].item()), []),
        (20, pytest.approx(want[20].item()), []),
    ]


@pytest.mark.parametrize("vocab", [64, 163840])
def test_a_wide_tie_at_the_cut_lists_the_lowest_ids(vocab):
    """40 tokens tied at the top: ``topk`` returned some 5 of them, not the 5 lowest ids, so the greedy token (the
    lowest) was missing from a list of 1 or 5. Row 1 has one token above the tie: it leads, then the lowest tied ids."""
    torch.manual_seed(0)
    tied = torch.randperm(vocab - 1)[:40]
    logits = torch.zeros(2, vocab)
    logits[:, tied] = 5.0
    logits[1, vocab - 1] = 6.0
    lowest = sorted(tied.tolist())
    greedy = logits.argmax(-1).tolist()
    assert greedy == [lowest[0], vocab - 1]
    want = logits.log_softmax(-1)
    for tops in ([1, 1], [5, 5]):
        rows = engine_module.token_logprobs(logits, greedy, tops)
        for row, (t, lp, top), ids in zip(want, rows, (lowest[:5], [vocab - 1, *lowest[:4]])):
            assert [i for i, _ in top] == ids[: tops[0]] and top[0] == (t, lp)
            assert [v for _, v in top] == pytest.approx(row[ids[: tops[0]]].tolist(), abs=1e-6)
