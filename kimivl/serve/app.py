"""The FastAPI app: OpenAI chat completions (plain and server-sent events), models, health, Prometheus metrics, and
the chat page at ``/`` (``static/index.html`` and ``static/chat.js``: plain HTML and JavaScript over the same API)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import encodings.aliases
import functools
import hmac
import importlib.resources
import io
import json
import logging
import math
import string
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import h11
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from kimivl.inference.chat import check_fits
from kimivl.inference.generate import GenerationError
from kimivl.inference.generation_config import FALLBACK
from kimivl.inference.sampling import MIN_TEMPERATURE, SamplingParams
from kimivl.serve.engine import Engine, QueueFull
from kimivl.serve.engine import Request as EngineRequest
from kimivl.serve.reasoning import ThinkSplitter, split_reasoning
from kimivl.serve.schema import MAX_TEMPERATURE, ChatRequest, Limits, RequestError, parse_chat_request

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20
BODY_IDLE_SECONDS = 30  # a request body that stalls this long is refused (408), its buffer freed
BODY_TOTAL_SECONDS = 120  # and one that takes longer than this in all (64 MiB at about 4.5 Mbit/s)
HEADER_SECONDS = 10  # a connection whose request headers are not complete this long after it opened (or after its
# last answer) is closed: uvicorn waits for headers forever, and enough such sockets exhaust the file descriptors
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
PAGE_HEADERS = {  # the chat page: its own script file and server only (no inline script), never framed by another site
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; connect-src 'self' data: blob:; "
    "script-src 'self'; style-src 'self' 'unsafe-inline'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(
    engine: Engine,
    model_name: str,
    *,
    api_key: str | None = None,
    limits: Limits | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    start_engine: bool = True,
    hosts: tuple[str, ...] | None = None,
    sampling: dict | None = None,
) -> FastAPI:
    """An app serving ``engine`` under the name ``model_name``; the engine stops with the app, and starts with it
    unless ``start_engine`` is False (then the caller starts it; requests wait in its queue until then). ``hosts``:
    the only host names (lower case) a request may address (``kimivl serve`` on a loopback address gives
    ``LOOPBACK_NAMES``, its own and ``--allowed-host``'s, so a web page whose name an attacker re-points at 127.0.0.1
    cannot use the server); None accepts any. ``sampling``: the chat page's starting temperature, max tokens and top-p
    (``temperature``, ``max_new_tokens``, ``top_p``; ``kimivl serve`` gives the model's ``recommended_sampling``, as
    ``kimivl chat`` has), ``FALLBACK``'s where one is missing.
    ``api_key`` must be printable ASCII (what an HTTP header carries)."""
    if api_key is not None:
        check_api_key(api_key)
    context = engine.model.config.text_config.max_position_embeddings
    limits = limits or Limits(context=context, max_batch=engine.max_batch)
    if limits.image_tokens is None:  # images past the context are refused from their headers, before decoding
        limits = dataclasses.replace(limits, image_tokens=engine.processor.image_processor.image_tokens)

    # one thread turns messages into ids and pixels, its torch ops on one core: beside the engine's worker, a second
    # team of OpenMP threads on the same cores would make both wait (several times slower decode steps on 2 cores)
    encoder = ThreadPoolExecutor(1, "kimivl-encode", initializer=torch.set_num_threads, initargs=(1,))

    answering: set[asyncio.Task] = set()  # the requests' tasks, to let cancelled ones send their 503 on shutdown

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_engine:
            engine.start()
        yield
        if answering:  # uvicorn cancelled them (--shutdown-timeout ran out): their answers take a moment
            await asyncio.wait(set(answering), timeout=5)
        engine.shutdown()
        encoder.shutdown(wait=False, cancel_futures=True)

    # no redirect of a path with a trailing slash (an empty 307 whose Location comes from the Host header, wrong behind
    # a proxy): it is an unknown path, 404 as any other
    app = FastAPI(
        title="kimivl", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan, redirect_slashes=False
    )
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):  # unknown routes and methods, OpenAI-shaped
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        what = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(RequestError(what, status=e.status_code, code=code).body(), e.status_code, e.headers)

    @app.middleware("http")
    async def check_host_and_key(request: Request, call_next):
        if hosts is not None and _host_name(request.headers.get("host", "")).lower() not in hosts:
            return _error(RequestError(f"this server answers requests to {', '.join(hosts)} only", status=421))
        if api_key is not None and request.url.path.startswith("/v1/"):
            scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
                message = "invalid or missing API key (Authorization: Bearer KEY)"
                return _error(RequestError(message, status=401, code="invalid_api_key"))
        return await call_next(request)

    @app.middleware("http")  # added last, so it wraps the app and the check above
    async def unexpected_errors(request: Request, call_next):
        """A bug answers 500 with an OpenAI-shaped body (a client reads the error), its traceback in the log."""
        try:
            return await call_next(request)
        except Exception as e:
            log.exception("%s %s failed", request.method, request.url.path)
            message = f"the server failed on this request ({type(e).__name__}); its log has the details"
            return _error(RequestError(message, status=500))

    app.add_middleware(_CancelledQuietly, answering=answering)  # added last: outside the others

    static = importlib.resources.files("kimivl.serve").joinpath("static")
    starting = {**FALLBACK, **(sampling or {})}
    starting["temperature"] = min(starting["temperature"], MAX_TEMPERATURE)  # what a request may ask for
    page = string.Template(static.joinpath("index.html").read_text(encoding="utf-8")).substitute(starting)
    script = static.joinpath("chat.js").read_text(encoding="utf-8")

    # the GET routes answer HEAD too (RFC 9110; uptime monitors, HAProxy's `option httpchk HEAD /health`): the same
    # status and headers, the body left out by the server
    get = functools.partial(app.api_route, methods=["GET", "HEAD"])

    @get("/", response_class=HTMLResponse)
    async def index():  # the same page for every visitor: it asks for the API key itself when /v1/ answers 401
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @get("/chat.js")
    async def page_script():
        return Response(script, media_type="text/javascript", headers=PAGE_HEADERS)

    @get("/health")
    async def health():
        if not engine.alive():
            return JSONResponse({"status": "engine not running"}, status_code=503)
        return {"status": "ok"}

    @get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.prometheus(), media_type="text/plain; version=0.0.4")

    @get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "kimivl"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.monotonic()  # the time to first token counts from here: reading and encoding the body included
        try:
            raw = await _read_body(request, max_body_bytes)
            engine.metrics.encoding += 1  # waiting for or in the encode thread: counted in the queue gauge
            try:
                # off the event loop: parsing up to max_body_bytes of JSON, checking the media headers and decoding
                # data: URLs take time that would stall every stream
                chat, encoded = await asyncio.get_running_loop().run_in_executor(
                    encoder, _parse_and_encode, engine, raw, model_name, limits, context
                )
            finally:
                engine.metrics.encoding -= 1
        except RequestError as e:
            engine.metrics.requests["invalid"] += 1  # refused before it ran: a bad body, field, media, size or model
            return _error(e)
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            engine.metrics.requests["cancelled"] += 1
            return Response(status_code=499)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = EngineRequest(
            prompt=encoded.input_ids,
            pixel_values=encoded.pixel_values if len(encoded.image_grid_hws) else None,
            image_grid_hws=encoded.image_grid_hws if len(encoded.image_grid_hws) else None,
            params=_params(chat, context - len(encoded.input_ids)),
            emit=functools.partial(_deliver, loop, queue),
            n=chat.n,
            stop=chat.stop,
            logprobs=chat.top_logprobs if chat.logprobs else None,
            arrived=arrived,
        )
        try:
            engine.submit(job)
        except QueueFull as e:
            return _error(RequestError(str(e), status=429, code="queue_full"))
        reply = _Reply(model_name, chat, len(encoded.input_ids), engine.processor.tokenizer)
        if chat.stream:
            return StreamingResponse(_stream(job, queue, reply), media_type="text/event-stream")
        watch = asyncio.create_task(_watch_disconnect(request, job, queue))
        try:
            return await _collect(job, queue, reply)
        finally:
            watch.cancel()
            job.cancel()  # the client went away (or the answer is complete: then this is a no-op)

    return app


def check_api_key(key: str) -> None:
    """A ``ValueError`` for a key no client could send in a header (empty, spaces around it, not printable ASCII)."""
    if not (key.isascii() and key.isprintable() and key.strip() == key != ""):
        raise ValueError("the API key must be non-empty printable ASCII without surrounding spaces")


def _host_name(host: str) -> str:
    """The name in a Host header, without its port (``[::1]:8000`` -> ``::1``)."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _codec(charset: str) -> str:
    """The codec a charset label names, by Python's alias table (``utf8``, ``UTF-8`` and ``U8`` are ``utf_8``), not
    by ``codecs.lookup``, which keeps every label it is asked about for good (a client could fill memory)."""
    name = encodings.normalize_encoding(charset.lower())
    return encodings.aliases.aliases.get(name, name)


async def _read_body(request: Request, limit: int) -> bytearray:
    """A JSON request body of at most ``limit`` bytes: another content type is refused (a browser sends a foreign
    site's form or no-cors request as text, never as JSON without asking first), so is a body declared or grown
    over the limit, or one that stalls ``BODY_IDLE_SECONDS`` or takes over ``BODY_TOTAL_SECONDS`` in all (408). JSON
    is UTF-8 (RFC 8259): another charset is refused, and so is a compressed body (a Content-Encoding), unread (415)."""
    kind, *params = request.headers.get("content-type", "").split(";")
    kind = kind.strip().lower()
    if kind != "application/json":
        raise RequestError(f"the request body must be JSON (Content-Type: application/json), got {kind!r}", status=415)
    for name, _, value in (p.partition("=") for p in params):
        charset = value.strip().strip('"')
        if name.strip().lower() == "charset" and _codec(charset) not in ("utf_8", "ascii"):  # ASCII is UTF-8 too
            raise RequestError(
                f"the request body must be UTF-8 JSON (charset=utf-8), got charset={charset!r}", status=415
            )
    coding = request.headers.get("content-encoding", "").strip().lower()
    if coding not in ("", "identity"):
        raise RequestError(
            f"content encodings are not supported (Content-Encoding: {coding}): send the body uncompressed", status=415
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body is over the limit of {limit} bytes", status=413)
    raw, chunks = bytearray(), request.stream().__aiter__()
    deadline = time.monotonic() + BODY_TOTAL_SECONDS
    while True:
        left = deadline - time.monotonic()
        try:
            raw += await asyncio.wait_for(anext(chunks), min(BODY_IDLE_SECONDS, max(left, 0)))
        except StopAsyncIteration:
            return raw
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11, a class of its own on 3.10
            if left < BODY_IDLE_SECONDS:
                message = f"the request body took over {BODY_TOTAL_SECONDS} s to arrive"
            else:
                message = f"the request body stalled for {BODY_IDLE_SECONDS} s"
            raise RequestError(message, status=408) from None
        if len(raw) > limit:  # read no further than the limit
            raise RequestError(f"the request body is over the limit of {limit} bytes", status=413)


class _CancelledQuietly:
    """A request whose task the server cancels (``--shutdown-timeout`` ran out, or a second Ctrl-C) gets a 503 when
    nothing was sent yet, and one line in the log instead of a traceback each; its engine request was cancelled on the
    way out (the handlers' ``finally``). ``answering`` holds the tasks of the requests being answered."""

    def __init__(self, app, answering: set[asyncio.Task]):
        self.app, self.answering = app, answering

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        task = asyncio.current_task()
        self.answering.add(task)
        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            log.warning("%s %s: cancelled, the server is shutting down", scope["method"], scope["path"])
            if not started:
                error = RequestError("the server is shutting down; retry later", status=503, code="shutting_down")
                await JSONResponse(error.body(), 503, {"Connection": "close"})(scope, receive, send)
        finally:
            self.answering.discard(task)


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol (``uvicorn.run(http=...)``) that closes a connection whose request headers are not
    complete ``HEADER_SECONDS`` after it opened or after its last response: uvicorn itself has no such deadline (its
    keep-alive timer stops at the first byte), so a client sending headers slowly, or never, held a socket for good.
    A request whose headers arrived is never cut (its body has the app's own deadlines)."""

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot read gets the app's OpenAI-shaped JSON error, not uvicorn's plain text; the connection
        closes after it (what follows in it cannot be framed)."""
        error = RequestError(
            "the request is not valid HTTP/1.1 (a malformed request line or header, a bad or conflicting "
            "Content-Length, or a Transfer-Encoding other than chunked)"
        )
        body = json.dumps(error.body(), separators=(",", ":")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(HEADER_SECONDS, self._expire, self.cycle)

    def _expire(self, cycle) -> None:
        """Close the connection if no request began since the deadline was set (``cycle``: the request then)."""
        waiting = self.cycle is cycle and (cycle is None or cycle.response_complete)
        if waiting and not self.transport.is_closing():
            log.debug("closed a connection whose request headers took over %s s", HEADER_SECONDS)
            self.transport.close()


def _json_int(digits: str) -> int | float:
    """A JSON integer; one too long for Python to convert (over ``sys.get_int_max_str_digits()``) is read as the
    infinity of its sign, which the field's range check refuses by name."""
    try:
        return int(digits)
    except ValueError:
        return -math.inf if digits.startswith("-") else math.inf


def _deliver(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, event: tuple) -> None:
    """Hand an engine event to the request's coroutine (nothing to do once the server's loop has closed)."""
    try:
        loop.call_soon_threadsafe(queue.put_nowait, event)
    except RuntimeError:
        pass


def _parse_and_encode(
    engine: Engine, raw: bytearray, model_name: str, limits: Limits, context: int
) -> tuple[ChatRequest, Any]:
    """A request body's bytes -> its checked request and encoded prompt; a ``RequestError`` for what is wrong."""
    try:
        body = json.loads(raw, parse_int=_json_int)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError("the request body is JSON nested too deeply to read") from None
    if isinstance(body, dict) and not isinstance(body.get("model"), str):
        raise RequestError(f"model is required (a string): this server serves {model_name!r}", "model")
    if isinstance(body, dict) and body["model"] != model_name:
        raise RequestError(
            f"model {body['model']!r} is not served here; this server serves {model_name!r}",
            "model",
            status=404,
            code="model_not_found",
        )
    chat = parse_chat_request(body, limits)
    return chat, _encode(engine, chat, context)


def _encode(engine: Engine, chat: ChatRequest, context: int):
    try:  # refused unread: megabytes of text cost seconds of tokenizing on the one encode thread
        check_fits(engine.processor, chat.messages, context)
    except GenerationError as e:
        raise RequestError(str(e), "messages", code="context_length_exceeded") from None
    try:
        encoded = engine.processor.encode(chat.messages)
    except ValueError as e:  # MessageError, ImageError, VideoError
        raise RequestError(f"the messages cannot be encoded: {e}", "messages") from None
    n = len(encoded.input_ids)
    if n >= context:
        raise RequestError(
            f"the prompt is {n} tokens, which leaves no room for an answer in the model's context of {context} "
            "tokens; shorten the messages",
            "messages",
            code="context_length_exceeded",
        )
    if chat.max_tokens is not None and n + chat.max_tokens > context:
        raise RequestError(
            f"the prompt is {n} tokens and {chat.max_tokens} new tokens were asked for: together over the model's "
            f"context of {context} tokens; shorten the messages or ask for at most {context - n} tokens",
            "messages",
            code="context_length_exceeded",
        )
    return encoded


def _params(chat: ChatRequest, room: int) -> SamplingParams:
    temperature = 0.0 if chat.temperature < MIN_TEMPERATURE else chat.temperature
    return SamplingParams(
        max_new_tokens=chat.max_tokens or room, temperature=temperature, top_p=chat.top_p, seed=chat.seed
    )


class _Reply:
    """What the answer so far looks like in the OpenAI schema."""

    def __init__(self, model_name: str, chat: ChatRequest, prompt_tokens: int, tokenizer):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model_name
        self.chat, self.prompt_tokens, self.tokenizer = chat, prompt_tokens, tokenizer
        self.texts = [io.StringIO(newline="") for _ in range(chat.n)]  # each choice's text, not streamed (str +=
        # would copy the text so far for each piece)
        self.finish: list[str | None] = [None] * chat.n
        self.tokens = [0] * chat.n
        self.logprobs = [[] for _ in range(chat.n)]  # each choice's logprob entries not yet sent (or all, not streamed)

    def entries(self, records: list[tuple]) -> list[dict]:
        """The engine's logprob records as OpenAI's ``ChatCompletionTokenLogprob`` objects."""
        return [{**self._token(t, lp), "top_logprobs": [self._token(*top) for top in tops]} for t, lp, tops in records]

    def _token(self, token: int, logprob: float) -> dict:
        """A token's text (a special token's name; ``<|id N|>`` for one past the tokenizer, in a model whose vocabulary
        is larger), its bytes (null for a special token, which adds no text) and its logprob, at least -9999.0 (OpenAI's
        value for a token that cannot follow: never -inf, which JSON lacks)."""
        logprob = max(logprob, -9999.0)
        if self.tokenizer.is_special(token):
            name = self.tokenizer.id_to_special.get(token, f"<|id {token}|>")
            return {"token": name, "logprob": logprob, "bytes": None}
        raw = self.tokenizer.token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    def take_logprobs(self, i: int) -> dict | None:
        """Choice ``i``'s logprobs entries gathered so far, as a choice's ``logprobs`` (null when not asked for or,
        streamed, when none are due), and forget them."""
        if not self.chat.logprobs or (self.chat.stream and not self.logprobs[i]):
            return None
        content, self.logprobs[i] = self.logprobs[i], []
        return {"content": content, "refusal": None}

    def usage(self) -> dict:
        done = sum(self.tokens)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
        body["choices"] = choices
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _server_error(message: str) -> RequestError:
    return RequestError(message, status=500, code="generation_failed")


async def _watch_disconnect(request: Request, job: EngineRequest, queue: asyncio.Queue) -> None:
    """Cancel ``job`` once its client hangs up (the body is read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()
    queue.put_nowait(("disconnected",))


async def _collect(job: EngineRequest, queue: asyncio.Queue, reply: _Reply):
    while not all(reply.finish):
        event = await queue.get()
        if event[0] == "disconnected":
            return Response(status_code=499)  # nobody reads it
        if event[0] == "error":
            return _error(_server_error(event[1]))
        if event[0] == "text":
            reply.texts[event[1]].write(event[2])
        elif event[0] == "logprobs":
            reply.logprobs[event[1]] += reply.entries(event[2])
        else:
            reply.finish[event[1]], reply.tokens[event[1]] = event[2], event[3]
    choices = []
    for i, text in enumerate(reply.texts):
        reasoning, answer = split_reasoning(text.getvalue())
        message = {"role": "assistant", "content": answer}
        if reasoning:  # an empty thought is left out, as the stream sends no delta of it
            message["reasoning_content"] = reasoning
        choices.append(
            {"index": i, "message": message, "finish_reason": reply.finish[i], "logprobs": reply.take_logprobs(i)}
        )
    body = {"id": reply.id, "object": "chat.completion", "created": reply.created, "model": reply.model}
    return JSONResponse({**body, "choices": choices, "usage": reply.usage()})


async def _stream(job: EngineRequest, queue: asyncio.Queue, reply: _Reply):
    """Server-sent events: a role chunk per choice, content/reasoning deltas, each choice's finish, usage, [DONE]. A
    choice's logprobs entries go with its first chunk after the engine sent them (with their tokens' text, unless the
    reasoning splitter holds that text back)."""
    splitters = [ThinkSplitter() for _ in range(reply.chat.n)]

    def choice(i: int, d: dict, finish: str | None = None) -> dict:
        return {"index": i, "delta": d, "finish_reason": finish, "logprobs": reply.take_logprobs(i)}

    def delta(i: int, reasoning: str, answer: str) -> dict:
        d = {}
        if reasoning:
            d["reasoning_content"] = reasoning
        if answer:
            d["content"] = answer
        return choice(i, d)

    try:
        for i in range(reply.chat.n):  # one choice per chunk, as OpenAI streams several
            yield reply.chunk([choice(i, {"role": "assistant", "content": ""})])
        while not all(reply.finish):
            event = await queue.get()
            if event[0] == "error":
                yield f"data: {json.dumps(_server_error(event[1]).body())}\n\n"
                return
            i = event[1]
            if event[0] == "logprobs":
                reply.logprobs[i] += reply.entries(event[2])
                continue
            if event[0] == "text":
                reasoning, answer = splitters[i].feed(event[2])
            else:
                reasoning, answer = splitters[i].close()
                reply.finish[i], reply.tokens[i] = event[2], event[3]
            if reasoning or answer:
                yield reply.chunk([delta(i, reasoning, answer)])
            if event[0] == "done":
                yield reply.chunk([choice(i, {}, event[2])])
        if reply.chat.include_usage:
            yield reply.chunk([], reply.usage())
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()
