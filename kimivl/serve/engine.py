"""The serving engine: one background thread owns the model and runs a continuously batched decode loop.

Requests wait in a bounded queue. Each turn of the worker admits waiting requests while the batch has room for their
``n`` choices, prefills about ``prefill_chunk`` prompt tokens (``PREFILL_BURST`` times that while more prompts wait
than rows decode), then runs one decode step for every running row, so a long prompt's prefill is spread over many
steps instead of pausing the running rows. Prompts that fit one pass are prefilled together, packed into one row
(``cu_seqlens``: each attends to itself only; their images in one vision call); a longer prompt is prefilled alone,
``prefill_chunk`` tokens per turn at fixed offsets. A request's ``n`` choices are copied from its one prefill.

A request that asks for ``logprobs`` gets, for each generated token, its log-probability and the ``logprobs`` most
likely tokens' under the model's raw distribution at that step: a float32 log-softmax over the whole vocabulary of the
logits before temperature and top-p (vLLM's default "raw logprobs"), computed for the rows that asked only.

The running rows share one ``MLACache``, left-padded to one length with a key mask; every row keeps its own
positions. A row whose choice ends (stop token, stop string, ``max_tokens``, a cancelled request) becomes a free
slot: a new choice whose prompt fits the cache's length is written into it in place (``MLACache.write``); otherwise,
and when no request is waiting to use the free slots, the batch is re-laid (``MLACache.tokens`` and ``load``) with the
live rows only and the leading columns that are padding in all of them dropped.
"""

from __future__ import annotations

import codecs
import collections
import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kimivl.inference.cache import MLACache
from kimivl.inference.generate import prefill
from kimivl.inference.sampling import SamplingError, SamplingParams, check_logits, sample_next, seeded_generator

log = logging.getLogger(__name__)

PREFILL_BURST = 4  # prefill_chunks per turn while more prompts wait than rows decode
STOP_TAIL = 16  # a stop string is looked for by its last characters, at most this many (see _Choice._stop_at)


def token_logprobs(logits: torch.Tensor, tokens: list[int], tops: list[int]) -> list[tuple]:
    """Per row of ``logits`` (rows, vocab; raw, before temperature and top-p): ``(token, logprob, top)``, the
    float32 log-softmax over the vocabulary at its chosen token ``tokens[i]`` and ``top``, its ``tops[i]`` most likely
    tokens as ``(token, logprob)``, most likely first, equal ones lowest id first (as greedy decoding and top-p break
    ties: a greedy token is always the first, which ``topk``'s own order among ties does not keep)."""
    logprobs = logits.float().log_softmax(-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    k = max(tops)
    if k == 0:
        return [(t, lp, []) for t, lp in zip(tokens, chosen)]
    vocab = logprobs.shape[-1]
    values, ids = logprobs.topk(min(k + 1, vocab), -1)  # one more: whether a tie crosses the cut
    cut = (values[:, k] == values[:, k - 1]).nonzero()[:, 0] if k < vocab else values.new_empty(0, dtype=torch.long)
    values, ids = values[:, :k], ids[:, :k]
    ids, by_id = ids.sort(-1)
    values, order = values.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)  # equal values stay by id
    ids = ids.gather(-1, order)
    if len(cut):  # (rare) topk chose among the tokens tied at the cut: every more likely one, then the lowest ids
        least = values[cut, -1:]
        above = (values[cut] > least).sum(-1, keepdim=True)
        lowest = torch.arange(vocab, 0, -1, device=logits.device)
        tied = torch.where(logprobs[cut] == least, lowest, 0).topk(k, -1).indices  # by id
        j = torch.arange(k, device=logits.device)
        ids[cut] = torch.where(j < above, ids[cut], tied.gather(-1, (j - above).clamp(min=0)))
        values[cut] = torch.where(j < above, values[cut], least)
    values, ids = values.tolist(), ids.tolist()
    return [(t, lp, list(zip(ids[i][:n], values[i][:n]))) for i, (t, lp, n) in enumerate(zip(tokens, chosen, tops))]


class QueueFull(RuntimeError):
    """The waiting queue holds ``max_queue`` requests: the client should retry later (HTTP 429)."""


@dataclass
class Request:
    """One completion request: its prompt ids and images, sampling, ``n`` choices and stop strings. ``emit`` gets the
    events: ``("text", choice, piece)``, ``("done", choice, finish_reason, n_tokens)``, ``("error", message)``, and
    when ``logprobs`` is not None, ``("logprobs", choice, records)`` just before the text of the records' tokens (or
    before ``done`` for tokens without text): a record ``(token, logprob, [(token, logprob), ...])`` per generated
    token, with the ``logprobs`` most likely tokens, most likely first (see ``_Choice.add`` for which tokens)."""

    prompt: list[int]
    pixel_values: torch.Tensor | None
    image_grid_hws: torch.Tensor | None
    params: SamplingParams
    emit: Callable[[tuple], None]
    n: int = 1
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely tokens'
    cancelled: bool = False
    failed: bool = False
    rows: int = 0  # its choices in the batch: its outcome is counted when the last leaves
    cut: bool = False  # a choice left unfinished (the request was cancelled)
    arrived: float = field(default_factory=time.monotonic)  # the time to first token counts from this (the app gives
    # the moment the request reached it, so reading, parsing and encoding it, and waiting for the encode thread count)
    first_token: float | None = None

    def cancel(self) -> None:
        """Free the request's rows at the next step (a client that went away)."""
        self.cancelled = True


class _Choice:
    """One row of the batch: its request, generator, incremental UTF-8 decoder and stop-string hold-back. It takes at
    most ``max_new_tokens`` tokens, fewer where the prompt leaves less of the ``context`` (as ``generate_ids``). Only
    the text not sent yet is kept as one string (at most the hold-back and a token's text), so a token costs the same
    however long the text is."""

    def __init__(self, request: Request, index: int, tokenizer, device: torch.device, context: int):
        self.request, self.index, self.tokenizer = request, index, tokenizer
        self.room = min(request.params.max_new_tokens, context - len(request.prompt))
        seed = request.params.seed
        self.generator = None if seed is None else seeded_generator((seed + index) % 2**64, device)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.said = io.StringIO(newline="")  # the text sent (appending to a str would copy it each time)
        self.held, self.sent, self.tokens = "", 0, 0  # the text not sent yet, from offset ``sent``
        self.finish: str | None = None
        self.hold = max((len(s) for s in request.stop), default=1) - 1
        self.records: list[tuple[int, int, tuple]] = []  # logprob records not sent yet, with their text's span

    @property
    def text(self) -> str:
        """The text so far (up to a stop string's cut)."""
        return self.said.getvalue() + self.held

    def add(self, token: int, stop_ids: set[int], record: tuple | None = None) -> None:
        """Take one generated token (and its logprob ``record``, if asked for); set ``finish`` when the choice is
        over (a stop token or string; "length" once it holds ``room`` tokens), and emit any text that is safe to send.
        A record is sent with the piece of text that ends its token's text (a token without text, a special one or the
        first bytes of a character, goes with the next piece); the stop token gets none, nor does a token whose text
        starts at or after a stop string's cut (a token that is partly cut keeps its record)."""
        if token in stop_ids:
            self._end("stop")
            return
        self.tokens += 1
        start = self.sent + len(self.held)
        if not self.tokenizer.is_special(token):
            self.held += self.decoder.decode(self.tokenizer.token_bytes(token))
        if record is not None:
            self.records.append((start, self.sent + len(self.held), record))
        cut = self._stop_at(start - self.sent)
        if cut is not None:  # cut at the earliest, whichever stop string it is: no stop string is ever returned
            self.held = self.held[:cut]
            self.records = [r for r in self.records if r[0] < self.sent + cut]
            self._end("stop", flush=False)
            return
        if self.tokens >= self.room:
            self._end("length")
            return
        self._send(self.sent + len(self.held) - self.hold)

    def _stop_at(self, new: int) -> int | None:
        """Where in the held text the earliest stop string that ends at or after ``new`` in it begins, or None. The
        text before ``new`` holds none, and the hold-back keeps every one that may end later whole in the held text. A
        stop string is looked for by its last ``STOP_TAIL`` characters, and compared whole only where they are: a
        ``find`` of the whole string read it, and twice its length of text, at every token (milliseconds for long
        ones)."""
        cut = None
        for s in self.request.stop:
            tail = s[-STOP_TAIL:]
            at = self.held.find(tail, max(0, new - len(tail) + 1))
            while at >= 0:
                begin = at + len(tail) - len(s)
                if begin >= 0 and self.held.startswith(s, begin):
                    cut = begin if cut is None else min(cut, begin)
                    break
                at = self.held.find(tail, at + 1)
        return cut

    def _send(self, upto: int, last: bool = False) -> None:
        """Emit the text up to offset ``upto`` not sent yet, after the records of the tokens it ends (all of them if
        ``last``)."""
        if upto <= self.sent and not (last and self.records):
            return
        ready = [r for _, end, r in self.records if last or end <= upto]
        if ready:
            self.records = self.records[len(ready) :]
            self.request.emit(("logprobs", self.index, ready))
        if upto > self.sent:
            piece, self.held = self.held[: upto - self.sent], self.held[upto - self.sent :]
            self.said.write(piece)
            self.request.emit(("text", self.index, piece))
            self.sent = upto

    def _end(self, reason: str, flush: bool = True) -> None:
        if flush:
            self.held += self.decoder.decode(b"", final=True)
        self._send(self.sent + len(self.held), last=True)
        self.finish = reason
        self.request.emit(("done", self.index, reason, self.tokens))


@dataclass
class Metrics:
    """Counters and gauges for ``/metrics``. ``kimivl_queue_length`` counts the requests waiting for their prefill:
    ``encoding`` (the app's) and then ``queue_length`` (the engine's queue)."""

    requests: collections.Counter = field(default_factory=collections.Counter)  # by outcome
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_length: int = 0  # requests in the engine's queue (``max_queue`` bounds them)
    encoding: int = 0  # requests whose body has arrived, being encoded or waiting for the encode thread (the app's)
    batch_size: int = 0
    cache_bytes: int = 0  # the running batch's cache (``MLACache.nbytes()``)
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
        for outcome in sorted(set(self.requests) | {"ok", "error", "cancelled", "rejected", "invalid"}):
            lines.append(f'kimivl_requests_total{{outcome="{outcome}"}} {self.requests[outcome]}')
        lines += [
            "# TYPE kimivl_prompt_tokens_total counter",
            f"kimivl_prompt_tokens_total {self.prompt_tokens}",
            "# TYPE kimivl_completion_tokens_total counter",
            f"kimivl_completion_tokens_total {self.completion_tokens}",
            "# TYPE kimivl_queue_length gauge",
            f"kimivl_queue_length {self.queue_length + self.encoding}",
            "# TYPE kimivl_batch_size gauge",
            f"kimivl_batch_size {self.batch_size}",
            "# TYPE kimivl_cache_bytes gauge",
            f"kimivl_cache_bytes {self.cache_bytes}",
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
    """The running rows: their cache (left-padded to one length), key mask, next positions and last tokens. A row whose
    choice ended is a free slot (``None``) until a new choice is written into it (its prompt left-padded to the
    cache's length, the other rows untouched) or the batch is re-laid without it."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.rows: list[_Choice | None] = []
        self.cache: MLACache | None = None
        self.mask = self.positions = self.tokens = None

    def live(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is not None]

    def add(self, entries: list[tuple[_Choice, torch.Tensor, int]]) -> None:
        """Add choices given as (choice, its prompt's cache values (layers, tokens, width), its first token): into free
        slots where the prompt fits the cache's length, the rest by one re-lay of the whole batch."""
        free = [i for i, r in enumerate(self.rows) if r is None]
        rest = []
        for choice, values, token in entries:
            if free and values.shape[1] <= self.cache.length:
                self._place(free.pop(0), choice, values, token)
            else:
                rest.append((choice, values, token))
        if rest:
            self.relay(rest)

    def _place(self, i: int, choice: _Choice, values: torch.Tensor, token: int) -> None:
        width, n = self.cache.length, values.shape[1]
        pad = values.new_zeros(values.shape[0], width - n, values.shape[2])  # zeros: masked, but never NaN
        self.cache.write(i, torch.cat([pad, values], 1))
        self.mask[i] = 0
        self.mask[i, width - n :] = 1
        self.positions[i], self.tokens[i], self.rows[i] = n, token, choice

    def relay(self, new: list[tuple[_Choice, torch.Tensor, int]] = ()) -> None:
        """Re-lay the cache with the live rows, then ``new``, left-padded to the longest; free slots and the leading
        columns that are padding in every row are dropped (the old blocks are freed)."""
        keep = self.live()
        parts = []  # (values (layers, rows, n, width), mask (rows, n))
        if keep:
            idx = torch.tensor(keep, device=self.mask.device)
            mask = self.mask[idx]
            first = int(mask.any(0).long().argmax())
            parts.append((self.cache.tokens()[:, idx, first:], mask[:, first:]))
        for _, values, _ in new:
            parts.append((values[:, None], values.new_ones(1, values.shape[1], dtype=torch.long)))
        if not parts:
            self.__init__(self.cfg)
            return
        ref = parts[0][0]
        layers, width, depth = ref.shape[0], max(v.shape[2] for v, _ in parts), ref.shape[3]
        rows = sum(v.shape[1] for v, _ in parts)
        values = ref.new_zeros(layers, rows, width, depth)
        masks, start = [], 0
        for v, m in parts:
            b, pad = v.shape[1], width - v.shape[2]
            values[:, start : start + b, pad:] = v
            masks.append(torch.cat([m.new_zeros(b, pad), m], 1))
            start += b
        cache = MLACache(self.cfg, rows, self.cfg.max_position_embeddings, dtype=ref.dtype, device=ref.device)
        cache.load(values)
        device = ref.device
        old = (self.positions[idx], self.tokens[idx]) if keep else (None, None)
        positions = torch.tensor([v.shape[1] for _, v, _ in new], dtype=torch.long, device=device)
        tokens = torch.tensor([t for _, _, t in new], dtype=torch.long, device=device)
        self.positions = positions if old[0] is None else torch.cat([old[0], positions])
        self.tokens = tokens if old[1] is None else torch.cat([old[1], tokens])
        self.rows = [self.rows[i] for i in keep] + [c for c, _, _ in new]
        self.cache, self.mask = cache, torch.cat(masks)

    def crowded(self) -> bool:
        """Whether a re-lay is due: the cache is at the context, or half of it is padding in every live row."""
        keep = self.live()
        if not keep or self.cache.length + 1 > self.cache.max_len:
            return bool(keep)
        lead = int(self.mask[torch.tensor(keep, device=self.mask.device)].any(0).long().argmax())
        return lead >= max(64, self.cache.length // 2)


class _Prefill:
    """A request being prefilled: its prompt's own one-row cache, filled ``prefill_chunk`` tokens at a time at fixed
    offsets (so its numbers do not depend on the load), its embeddings (images encoded once) and its progress."""

    def __init__(self, request: Request, model):
        self.request = request
        n = len(request.prompt)
        self.ids = torch.tensor([request.prompt], dtype=torch.long, device=model.device)
        self.positions = torch.arange(n, device=model.device)[None]
        self.cache = MLACache(model.config.text_config, 1, n, dtype=model.dtype, device=model.device)
        self.embeds: torch.Tensor | None = None
        self.done = 0
        self.hidden: torch.Tensor | None = None


class Engine:
    """Owns ``model`` in a worker thread; ``submit`` queues a ``Request`` (``QueueFull`` past ``max_queue``). Prompts
    are prefilled ``prefill_chunk`` tokens per pass, and about that many tokens between two decode steps (up to
    ``PREFILL_BURST`` times that while more prompts wait than rows decode)."""

    def __init__(self, model, processor, *, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 512):
        if max_batch < 1 or max_queue < 1 or prefill_chunk < 1:
            raise ValueError(
                f"max_batch, max_queue and prefill_chunk must be >= 1, got {max_batch}, {max_queue}, {prefill_chunk}"
            )
        self.model, self.processor = model, processor
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.metrics = Metrics()
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._stop_ids = set(processor.stop_ids)
        self._threads = torch.get_num_threads()  # the creating thread's: the worker sets it for itself

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
        """Queue ``request``; a ``ValueError`` for one that cannot run (its prompt empty or filling the context: its
        first decode step would fail the whole batch), a ``QueueFull`` when the queue is."""
        if request.n > self.max_batch:
            raise ValueError(f"n={request.n} choices do not fit the batch of {self.max_batch} rows")
        context = self.model.config.text_config.max_position_embeddings
        if not 0 < len(request.prompt) < context:
            raise ValueError(
                f"a prompt of {len(request.prompt)} tokens: it needs at least one, and fewer than the context of "
                f"{context} tokens, to leave room for an answer"
            )
        with self._cond:
            self._drop_cancelled()
            if len(self._waiting) >= self.max_queue:
                self.metrics.requests["rejected"] += 1
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(request)
            self.metrics.queue_length = len(self._waiting)
            self._cond.notify()

    def _drop_cancelled(self) -> None:
        """Requests whose clients left while they waited give up their places (call with ``_cond`` held)."""
        live = [r for r in self._waiting if not r.cancelled]
        if len(live) < len(self._waiting):
            self.metrics.requests["cancelled"] += len(self._waiting) - len(live)
            self._waiting = collections.deque(live)
            self.metrics.queue_length = len(live)

    # ---- the worker ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        batch = _Batch(self.model.config.text_config)
        jobs: collections.deque[_Prefill] = collections.deque()
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not jobs and not batch.live():
                    self._cond.wait()
                if self._stop:
                    return
                self._drop_cancelled()  # a dead request at the head would hold back those behind it
                room = self.max_batch - len(batch.live()) - sum(j.request.n for j in jobs)
                while self._waiting and self._waiting[0].n <= room:
                    room -= self._waiting[0].n
                    request = self._waiting.popleft()
                    try:
                        jobs.append(_Prefill(request, self.model))
                    except Exception as e:
                        log.exception("admitting a request failed")
                        self._fail(request, f"admission failed: {e}")
                self.metrics.queue_length = len(self._waiting)
            ready = self._prefill(jobs, len(batch.live()))
            if ready:
                try:
                    batch.add(ready)
                except Exception as e:  # joining the batch: these requests fail, the running rows stay
                    log.exception("joining the batch failed")
                    for request in {id(c.request): c.request for c, _, _ in ready}.values():
                        self._fail(request, f"admission failed: {e}")
                    batch.rows = [None if r is not None and r.request.failed else r for r in batch.rows]
                    self._leave([c for c, _, _ in ready])
            try:
                if batch.live():
                    if batch.crowded():
                        batch.relay()
                    self._step(batch)
                if len(batch.live()) < len(batch.rows) and not jobs and not self._waiting:
                    batch.relay()  # nobody to take the free slots: drop them
            except Exception as e:  # a failure in the shared step ends the rows it holds, not the server
                log.exception("decode step failed")
                live = [r for r in batch.rows if r is not None]
                for request in {id(r.request): r.request for r in live}.values():
                    self._fail(request, f"generation failed: {e}")
                self._leave(live)
                batch.__init__(batch.cfg)
            self.metrics.batch_size = len(batch.live())
            self.metrics.cache_bytes = batch.cache.nbytes() if batch.cache is not None else 0

    def _fail(self, request: Request, message: str) -> None:
        """End ``request`` with an error, counted now (its choices still in the batch then leave uncounted)."""
        request.failed = request.cancelled = True
        self.metrics.requests["error"] += 1
        request.emit(("error", message))

    def _prefill(self, jobs: collections.deque[_Prefill], running: int) -> list[tuple[_Choice, torch.Tensor, int]]:
        """Prefill the oldest jobs, about ``prefill_chunk`` tokens in all, or ``PREFILL_BURST`` times that while more
        prompts wait than the ``running`` rows (a burst of arrivals gets its first tokens sooner, in fewer turns, each
        with a decode step of a small batch): the prompts that fit a pass whole go in one pass, packed into one row
        (``cu_seqlens``: each attends to itself only; their images in one vision call), a longer prompt alone, one
        pass of ``prefill_chunk`` tokens at a time. Returns the unfinished choices of the jobs whose prompt is done,
        as (choice, prompt cache values, first token) to join the batch."""
        ready, spent, pack = [], 0, []
        budget = self.prefill_chunk * (PREFILL_BURST if len(jobs) > running else 1)
        most = min(budget, self.model.config.text_config.max_position_embeddings)  # a pack's tokens
        while jobs and spent < budget:
            job = jobs[0]
            if job.request.cancelled:
                jobs.popleft()
                self.metrics.requests["cancelled"] += 1
                continue
            width = len(job.request.prompt)
            if job.done == 0 and width <= self.prefill_chunk:
                if pack and spent + width > most:
                    break
                pack.append(jobs.popleft())
                spent += width
                continue
            jobs.popleft()
            spent += min(self.prefill_chunk, width - job.done)
            try:
                self._prefill_pass(job)
            except Exception as e:
                log.exception("prefill failed")
                self._fail(job.request, f"prefill failed: {e}")
                continue
            if job.done < width:
                jobs.appendleft(job)
            else:
                ready += self._finish([job], [(job.cache.tokens()[:, 0], job.hidden[:, -1])])
        if pack:
            result = self._prefill_whole(pack)
            if isinstance(result, Exception) and len(pack) > 1:  # one bad prompt fails alone: each again on its own
                for job in pack:
                    ready += self._finish([job], self._prefill_whole([job]))
            else:
                ready += self._finish(pack, result)
        return ready

    def _prefill_pass(self, job: _Prefill) -> None:
        """The next ``prefill_chunk`` tokens of a long prompt, alone (one pass of generate's prefill, no key mask)."""
        if job.embeds is None:
            job.embeds = self.model.embed(job.ids, job.request.pixel_values, job.request.image_grid_hws)
        end = min(job.done + self.prefill_chunk, job.ids.shape[1])
        part = slice(job.done, end)
        lm = self.model.language_model
        job.hidden = prefill(lm, job.embeds[:, part], job.positions[:, part], job.cache, None, end - job.done)
        job.done = end

    def _prefill_whole(self, group: list[_Prefill]) -> list[tuple[torch.Tensor, torch.Tensor]] | Exception:
        """One pass over the whole prompts of ``group``: each prompt's cache values (layers, tokens, width) and last
        hidden state (1, D); or the exception that failed the pass. One prompt runs as ``generate`` prefills it; several
        are packed into one row, their images encoded in one call of the vision tower."""
        model, lm = self.model, self.model.language_model
        try:
            lengths = [len(j.request.prompt) for j in group]
            total = sum(lengths)
            cache = MLACache(model.config.text_config, 1, total, dtype=model.dtype, device=model.device)
            pixels = [j.request.pixel_values for j in group if j.request.pixel_values is not None]
            grids = [j.request.image_grid_hws for j in group if j.request.image_grid_hws is not None]
            if len(group) == 1:
                ids, positions, cu_seqlens = group[0].ids, group[0].positions, None
            else:
                ids = torch.tensor([[t for j in group for t in j.request.prompt]], device=model.device)
                positions = None  # restart at 0 in every prompt
                cu_seqlens = torch.tensor([0, *lengths], device=model.device).cumsum(0, dtype=torch.int32)
            embeds = model.embed(ids, torch.cat(pixels) if pixels else None, torch.cat(grids) if grids else None)
            if cu_seqlens is None:
                hidden = prefill(lm, embeds, positions, cache, None, total)
            else:
                hidden = lm(embeds, cu_seqlens=cu_seqlens, cache=cache)
            values, out, start = cache.tokens()[:, 0], [], 0
            for n in lengths:
                out.append((values[:, start : start + n], hidden[:, start + n - 1]))
                start += n
            return out
        except Exception as e:
            log.exception("prefill of %d prompt(s) failed", len(group))
            return e

    def _finish(self, group: list[_Prefill], result) -> list[tuple[_Choice, torch.Tensor, int]]:
        """Sample each choice's first token from the prefilled ``group``'s ``result``: per job, its prompt's cache
        values and last hidden state (or the exception that failed the pass)."""
        if isinstance(result, Exception):
            for job in group:
                self._fail(job.request, f"prefill failed: {result}")
            return []
        lm, ready = self.model.language_model, []
        context = self.model.config.text_config.max_position_embeddings
        tokenizer, device = self.processor.tokenizer, self.model.device
        for job, (own, hidden) in zip(group, result):
            request = job.request
            try:
                logits = lm.logits(hidden)
                rows = [_Choice(request, i, tokenizer, device, context) for i in range(request.n)]
                firsts = [int(sample_next(logits, request.params, row.generator)) for row in rows]
                records = [None] * len(rows)
                if request.logprobs is not None:
                    records = token_logprobs(logits.expand(len(rows), -1), firsts, [request.logprobs] * len(rows))
            except Exception as e:
                log.exception("sampling the first token failed")
                self._fail(request, f"prefill failed: {e}")
                continue
            request.first_token = time.monotonic()
            self.metrics.observe_ttft(request.first_token - request.arrived)
            self.metrics.prompt_tokens += len(request.prompt)
            request.rows = len(rows)
            for row, token, record in zip(rows, firsts, records):
                row.add(token, self._stop_ids, record)
            self._leave([row for row in rows if row.finish])
            ready += [(row, own, token) for row, token in zip(rows, firsts) if not row.finish]
        return ready

    def _leave(self, rows: list[_Choice]) -> None:
        """Count the tokens of choices leaving the batch (finished, cancelled or failed), and each request's outcome
        once, when its last choice leaves: ok, or cancelled if a choice left unfinished (a failed request was
        counted by ``_fail``)."""
        for row in rows:
            request = row.request
            self.metrics.completion_tokens += row.tokens
            request.cut |= row.finish is None
            request.rows -= 1
            if request.rows == 0 and not request.failed:
                self.metrics.requests["cancelled" if request.cut else "ok"] += 1

    def _step(self, batch: _Batch) -> None:
        """One decode step for every row (a free slot's result is ignored), then finished and cancelled rows leave
        their slots free."""
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
        bad = (~torch.isfinite(logits.amax(-1))).tolist()  # NaN, +inf, or no finite logit: nothing to choose from
        tokens = []
        for i, row in enumerate(batch.rows):
            if row is None:
                tokens.append(0)
                continue
            params = row.request.params
            try:
                if bad[i]:
                    check_logits(logits[i : i + 1])  # names what is wrong
                token = (
                    greedy[i] if params.temperature == 0 else int(sample_next(logits[i : i + 1], params, row.generator))
                )
            except SamplingError as e:  # this row's request fails; the others go on
                tokens.append(0)
                if not row.request.cancelled:
                    self._fail(row.request, f"this request's next token cannot be chosen: {e}")
                continue
            tokens.append(token)
        live = [(i, r) for i, r in enumerate(batch.rows) if r is not None and not r.request.cancelled]
        asked = [i for i, r in live if r.request.logprobs is not None]
        records = {}
        if asked:  # the rows that asked for logprobs, only
            tops = [batch.rows[i].request.logprobs for i in asked]
            records = dict(zip(asked, token_logprobs(logits[asked], [tokens[i] for i in asked], tops)))
        for i, row in live:
            if row.request.cancelled:  # meanwhile (a sibling choice's event may cancel it): its row takes nothing more
                continue
            row.add(tokens[i], self._stop_ids, records.get(i))
        batch.tokens = torch.tensor(tokens, device=batch.tokens.device)
        # the rows that leave, read once (a client may cancel meanwhile): each is counted and freed
        leaving = [r for r in batch.rows if r is not None and (r.finish or r.request.cancelled)]
        self._leave(leaving)
        batch.rows = [None if r in leaving else r for r in batch.rows]
