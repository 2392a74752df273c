"""The serving engine: one background thread owns the model and runs a continuously batched decode loop.

Requests wait in a bounded queue. Between decode steps the worker admits waiting requests while the batch has room:
each is prefilled alone (its images encoded once, its compressed MLA cache built in a cache of its own), its ``n``
choices copied from that one prefill, and the rows joined to the running batch by left-padding the caches to one
length (a key mask hides the padding, and every row keeps its own positions). Rows that finish, hit a stop string or
belong to a cancelled request leave the batch after the step. A prompt is prefilled in chunks (bounded memory), but
all of them before the next decode step: a long prompt's prefill holds up the running rows for its duration.

The batch cache is an ``MLACache`` whose tokens (layers, rows, tokens, latent + rope key) this module re-lays
(``MLACache.tokens`` and ``load``) when rows join or leave; the model code sees an ordinary cache.
"""

from __future__ import annotations

import codecs
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kimivl.inference.cache import MLACache
from kimivl.inference.generate import PREFILL_CHUNK, prefill
from kimivl.inference.sampling import SamplingParams, sample_next

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue holds ``max_queue`` requests: the client should retry later (HTTP 429)."""


@dataclass
class Request:
    """One completion request: its prompt ids and images, sampling, ``n`` choices and stop strings. ``emit`` gets the
    events: ``("text", choice, piece)``, ``("done", choice, finish_reason, n_tokens)``, ``("error", message)``."""

    prompt: list[int]
    pixel_values: torch.Tensor | None
    image_grid_hws: torch.Tensor | None
    params: SamplingParams
    emit: Callable[[tuple], None]
    n: int = 1
    stop: list[str] = field(default_factory=list)
    cancelled: bool = False
    failed: bool = False
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None

    def cancel(self) -> None:
        """Free the request's rows at the next step (a client that went away)."""
        self.cancelled = True


class _Choice:
    """One row of the batch: its request, generator, incremental UTF-8 decoder and stop-string hold-back."""

    def __init__(self, request: Request, index: int, tokenizer, device: torch.device):
        self.request, self.index, self.tokenizer = request, index, tokenizer
        seed = request.params.seed
        self.generator = None if seed is None else torch.Generator(device).manual_seed((seed + index) % 2**64)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent, self.tokens = "", 0, 0
        self.finish: str | None = None
        self.hold = max((len(s) for s in request.stop), default=1) - 1

    def add(self, token: int, stop_ids: set[int]) -> None:
        """Take one generated token; set ``finish`` when the choice is over, and emit any text that is safe to send."""
        if token in stop_ids:
            self._end("stop")
            return
        self.tokens += 1
        if not self.tokenizer.is_special(token):
            self.text += self.decoder.decode(self.tokenizer.token_bytes(token))
        for s in self.request.stop:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text = self.text[:at]
                self._end("stop", flush=False)
                return
        if self.tokens >= self.request.params.max_new_tokens:
            self._end("length")
            return
        self._send(len(self.text) - self.hold)

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.request.emit(("text", self.index, self.text[self.sent : upto]))
            self.sent = upto

    def _end(self, reason: str, flush: bool = True) -> None:
        if flush:
            self.text += self.decoder.decode(b"", final=True)
        self._send(len(self.text))
        self.finish = reason
        self.request.emit(("done", self.index, reason, self.tokens))


@dataclass
class Metrics:
    """Counters and gauges for ``/metrics``."""

    requests: collections.Counter = field(default_factory=collections.Counter)  # by outcome
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_length: int = 0
    batch_size: int = 0
    ttft_buckets: tuple = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
    ttft_counts: list = field(default_factory=lambda: [0] * 9)
    ttft_sum: float = 0.0

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_sum += seconds
        for i, edge in enumerate(self.ttft_buckets):
            if seconds <= edge:
                self.ttft_counts[i] += 1
        self.ttft_counts[-1] += 1

    def prometheus(self) -> str:
        lines = ["# TYPE kimivl_requests_total counter"]
        for outcome in sorted(set(self.requests) | {"ok", "error", "cancelled", "rejected"}):
            lines.append(f'kimivl_requests_total{{outcome="{outcome}"}} {self.requests[outcome]}')
        lines += [
            "# TYPE kimivl_prompt_tokens_total counter",
            f"kimivl_prompt_tokens_total {self.prompt_tokens}",
            "# TYPE kimivl_completion_tokens_total counter",
            f"kimivl_completion_tokens_total {self.completion_tokens}",
            "# TYPE kimivl_queue_length gauge",
            f"kimivl_queue_length {self.queue_length}",
            "# TYPE kimivl_batch_size gauge",
            f"kimivl_batch_size {self.batch_size}",
            "# TYPE kimivl_time_to_first_token_seconds histogram",
        ]
        for edge, count in zip(self.ttft_buckets, self.ttft_counts):
            lines.append(f'kimivl_time_to_first_token_seconds_bucket{{le="{edge}"}} {count}')
        lines += [
            f'kimivl_time_to_first_token_seconds_bucket{{le="+Inf"}} {self.ttft_counts[-1]}',
            f"kimivl_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
            f"kimivl_time_to_first_token_seconds_count {self.ttft_counts[-1]}",
        ]
        return "\n".join(lines) + "\n"


class _Batch:
    """The running rows: their cache (left-padded to one length), key mask, next positions and last tokens."""

    def __init__(self):
        self.rows: list[_Choice] = []
        self.cache: MLACache | None = None
        self.mask = self.positions = self.tokens = None

    def join(self, cfg, rows: list[_Choice], cache: MLACache, mask, positions, tokens) -> None:
        """Add rows whose cache holds ``cache.length`` tokens (their mask, next positions and last tokens)."""
        if not self.rows:
            parts = [(cache, mask)]
        else:
            parts = [(self.cache, self.mask), (cache, mask)]
        width = max(c.length for c, _ in parts)
        room = max(r.request.params.max_new_tokens - r.tokens for r in self.rows + rows) + 1
        room = min(room, cfg.max_position_embeddings - width)
        ref = parts[0][0]
        merged = MLACache(cfg, len(self.rows) + len(rows), width + room, dtype=ref.dtype, device=ref.device)
        layers, _, depth = merged.shape
        values = torch.zeros(layers, merged.shape[1], width, depth, dtype=ref.dtype, device=ref.device)
        masks, start = [], 0
        for c, m in parts:
            b, pad = c.shape[1], width - c.length
            values[:, start : start + b, pad:width] = c.tokens()
            masks.append(torch.cat([m.new_zeros(b, pad), m], 1))
            start += b
        merged.load(values)
        self.cache, self.mask = merged, torch.cat(masks)
        self.rows += rows
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions])
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens])

    def keep(self, alive: list[int]) -> None:
        """Drop every row not in ``alive`` (and the leading columns that are padding in all kept rows)."""
        if len(alive) == len(self.rows):
            return
        if not alive:
            self.__init__()
            return
        idx = torch.tensor(alive, device=self.mask.device)
        self.rows = [self.rows[i] for i in alive]
        mask = self.mask[idx]
        first = int(mask.any(0).long().argmax())
        self.cache.max_len -= first
        self.cache.load(self.cache.tokens()[:, idx, first:])  # indexing copies: the old blocks are freed
        self.mask, self.positions, self.tokens = mask[:, first:], self.positions[idx], self.tokens[idx]


class Engine:
    """Owns ``model`` in a worker thread; ``submit`` queues a ``Request`` (``QueueFull`` past ``max_queue``)."""

    def __init__(self, model, processor, *, max_batch: int = 8, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.model, self.processor = model, processor
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = Metrics()
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._stop_ids = set(processor.stop_ids)

    def alive(self) -> bool:
        """Whether the worker thread is running (False before ``start`` and after ``shutdown``)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kimivl-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        if request.n > self.max_batch:
            raise ValueError(f"n={request.n} choices do not fit the batch of {self.max_batch} rows")
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                self.metrics.requests["rejected"] += 1
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(request)
            self.metrics.queue_length = len(self._waiting)
            self._cond.notify()

    # ---- the worker ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        batch = _Batch()
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not batch.rows:
                    self._cond.wait()
                if self._stop:
                    return
                admitted = []
                rows = len(batch.rows)
                while self._waiting and rows + self._waiting[0].n <= self.max_batch:
                    rows += self._waiting[0].n
                    admitted.append(self._waiting.popleft())
                self.metrics.queue_length = len(self._waiting)
            for request in admitted:
                try:
                    self._admit(request, batch)
                except Exception as e:  # after prefill (joining the batch): this request fails, the rows stay
                    log.exception("admitting a request failed")
                    self._fail(request, f"admission failed: {e}")
            if batch.rows:
                try:
                    self._step(batch)
                except Exception as e:  # a failure in the shared step ends the rows it holds, not the server
                    log.exception("decode step failed")
                    for request in {id(r.request): r.request for r in batch.rows}.values():
                        self._fail(request, f"generation failed: {e}")
                    batch.keep([])
            self.metrics.batch_size = len(batch.rows)

    def _fail(self, request: Request, message: str) -> None:
        request.failed = request.cancelled = True
        self.metrics.requests["error"] += 1
        request.emit(("error", message))

    @torch.inference_mode()
    def _admit(self, request: Request, batch: _Batch) -> None:
        """Prefill ``request`` alone, sample each choice's first token, and join the unfinished choices to ``batch``."""
        if request.cancelled:
            self.metrics.requests["cancelled"] += 1
            return
        model, cfg = self.model, self.model.config.text_config
        try:
            ids = torch.tensor([request.prompt], dtype=torch.long, device=model.device)
            n_prompt = ids.shape[1]
            cache = MLACache(cfg, 1, n_prompt, dtype=model.dtype, device=model.device)
            mask = torch.ones_like(ids)
            positions = torch.arange(n_prompt, device=model.device)[None]
            lm = model.language_model
            embeds = model.embed(ids, request.pixel_values, request.image_grid_hws)
            # as generate prefills a prompt alone: in chunks, no key mask
            logits = lm.logits(prefill(lm, embeds, positions, cache, None, PREFILL_CHUNK)[:, -1])
            rows = [_Choice(request, i, self.processor.tokenizer, model.device) for i in range(request.n)]
            firsts = [int(sample_next(logits, request.params, row.generator)) for row in rows]
        except Exception as e:
            log.exception("prefill failed")
            self._fail(request, f"prefill failed: {e}")
            return
        request.first_token = time.monotonic()
        self.metrics.observe_ttft(request.first_token - request.submitted)
        self.metrics.prompt_tokens += n_prompt
        for row, token in zip(rows, firsts):
            row.add(token, self._stop_ids)
        self._account([r for r in rows if r.finish])
        live = [i for i, r in enumerate(rows) if not r.finish]
        if not live:
            return
        k = len(live)
        cache.load(cache.tokens().expand(-1, k, -1, -1))
        tokens = torch.tensor([firsts[i] for i in live], device=model.device)
        batch.join(
            cfg,
            [rows[i] for i in live],
            cache,
            mask.expand(k, -1),
            torch.full((k,), n_prompt, device=model.device),
            tokens,
        )

    def _account(self, finished: list[_Choice]) -> None:
        for row in finished:
            self.metrics.completion_tokens += row.tokens
            if row.index == 0:  # one request counted once, by its first choice's end (choices may end apart)
                self.metrics.requests["ok"] += 1

    @torch.inference_mode()
    def _step(self, batch: _Batch) -> None:
        """One decode step for every running row, then the finished and cancelled rows leave."""
        lm = self.model.language_model
        batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], 1)
        hidden = lm(
            lm.model.embed_tokens(batch.tokens[:, None]),
            position_ids=batch.positions[:, None],
            cache=batch.cache,
            attention_mask=batch.mask,
        )
        logits = lm.logits(hidden[:, -1])
        batch.positions = batch.positions + 1
        greedy = logits.argmax(-1).tolist()  # sample_next's greedy choice for all rows at once
        nan = torch.isnan(logits).any(-1).tolist()
        context = self.model.config.text_config.max_position_embeddings
        tokens = []
        for i, (row, position) in enumerate(zip(batch.rows, batch.positions.tolist())):
            params = row.request.params
            if nan[i]:  # this row's request fails; the others go on
                tokens.append(0)
                if not row.request.cancelled:
                    self._fail(row.request, "the model's logits hold NaN for this request")
                continue
            token = greedy[i] if params.temperature == 0 else int(sample_next(logits[i : i + 1], params, row.generator))
            tokens.append(token)
            if not row.request.cancelled:
                row.add(token, self._stop_ids)
                if not row.finish and position >= context:
                    row._end("length")
        batch.tokens = torch.tensor(tokens, device=batch.tokens.device)
        self._account([r for r in batch.rows if r.finish])
        cancelled = {id(r.request) for r in batch.rows if r.request.cancelled and not r.request.failed and not r.finish}
        self.metrics.requests["cancelled"] += len(cancelled)
        batch.keep([i for i, r in enumerate(batch.rows) if not r.finish and not r.request.cancelled])
