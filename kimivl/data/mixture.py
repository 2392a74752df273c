"""A deterministic, resumable stream of packed batches drawn from weighted sources.

Sample ``i`` is a pure function of (seed, stream, i), ``stream`` naming whose data it is (a stage's name): its
source is drawn with weights interpolated from ``start`` to ``end`` as ``i`` goes from 0 to ``horizon`` (a rising
multimodal share, for example), then an item of that source: at random, or, with ``replacement=False``, the next
item of a seeded shuffle of the source, reshuffled after each pass, so that every item comes once before any comes
twice. So a run resumes from a sample index alone (the draw counts saved beside it, ``state_dict``, spare a resume
without replacement the replay of every earlier draw), two runs with one seed see the same data, and two streams (or
two seeds) draw independently of each other.
"""

from __future__ import annotations

import logging
import random
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from kimivl.data.formats import DataError
from kimivl.data.indexed import locate
from kimivl.data.packing import PackedBatch, pack
from kimivl.processing.processor import Encoded

log = logging.getLogger(__name__)
SKIPPED_IN_A_ROW = 1000  # samples over the budget in a row that stop the stream: the data cannot fill a row


def sample_rng(seed: int, stream: str, i: int) -> random.Random:
    """The generator of sample ``i`` of the stream ``stream`` under ``seed``: a string seed, hashed by SHA-512 (not
    by Python's salted ``hash()``), so streams and seeds draw independently and every run alike."""
    return random.Random(f"{seed}/{stream}/{i}")


class Mixture:
    def __init__(
        self,
        sources: dict[str, Sequence[Any]],
        encode: Callable[[str, Any], Encoded],
        budget: int,
        start: dict[str, float],
        end: dict[str, float] | None = None,
        horizon: int = 1,
        seed: int = 0,
        replacement: bool = True,
        stream: str = "",
        fewest: Callable[[str, Any], int] | None = None,
    ):
        unknown = (set(start) | set(end or {})) - set(sources)
        if unknown:
            raise ValueError(f"mixture weights name unknown sources {sorted(unknown)}; have {sorted(sources)}")
        empty = sorted(k for k in set(start) | set(end or {}) if not sources[k])
        if empty:
            where = ", ".join(f"{k!r} ({getattr(sources[k], 'path', 'no file')})" for k in empty)
            raise ValueError(f"mixture sources {where} hold no records")
        self.sources, self.encode, self.budget = sources, encode, budget
        self.fewest = fewest  # (source, record) -> a floor on its tokens, read without encoding it
        self._over: dict[tuple[str, int], int] = {}  # (source, index) -> the floor of a record over the budget
        self.names = sorted(set(start) | set(end or {}))
        self.start = [float(start.get(n, 0.0)) for n in self.names]
        self.end = [float((end or start).get(n, 0.0)) for n in self.names]
        if sum(self.start) <= 0 or sum(self.end) <= 0:
            raise ValueError("mixture weights must have a positive sum")
        self.horizon, self.seed, self.replacement, self.stream = max(1, horizon), seed, replacement, stream
        self.skipped = 0
        # without replacement: the draws from each source before sample ``scanned``, as (scanned, counts); this, and
        # _orders, are replaced whole, never changed in place, so threads picking at once each see one consistent copy
        self._counted: tuple[int, dict[str, int]] = (0, dict.fromkeys(self.names, 0))
        self._orders: dict[tuple[str, int], np.ndarray] = {}  # (source, pass) -> its shuffle, the latest per source

    def weights(self, i: int) -> list[float]:
        t = min(1.0, i / self.horizon)
        return [a + (b - a) * t for a, b in zip(self.start, self.end)]

    def pick(self, i: int) -> tuple[str, int]:
        """Sample ``i``'s source and its index in that source."""
        rng = sample_rng(self.seed, self.stream, i)
        name = rng.choices(self.names, weights=self.weights(i))[0]
        if self.replacement:
            return name, rng.randrange(len(self.sources[name]))
        return name, self._next_of(name, self._draws_before(i, name))

    def _source(self, j: int) -> str:
        """Sample ``j``'s source (``pick``'s first draw)."""
        return sample_rng(self.seed, self.stream, j).choices(self.names, weights=self.weights(j))[0]

    def _draws_before(self, i: int, name: str) -> int:
        """How many of samples 0..i-1 came from ``name``: the counts kept for the samples before ``scanned``, moved to
        ``i`` by replaying the source draws between (cheap: no item is read), or counted from 0 when that is nearer."""
        scanned, drawn = self._counted
        if i < scanned - i:
            scanned, drawn = 0, dict.fromkeys(self.names, 0)
        drawn = dict(drawn)
        for j in range(scanned, i):
            drawn[self._source(j)] += 1
        for j in range(i, scanned):
            drawn[self._source(j)] -= 1
        self._counted = (i, drawn)
        return drawn[name]

    def identity(self) -> dict[str, Any]:
        """What the draw counts follow: a change of any of it draws other sources for the same samples."""
        return {
            "seed": self.seed,
            "stream": self.stream,
            "names": list(self.names),
            "start": list(self.start),
            "end": list(self.end),
            "horizon": self.horizon if self.start != self.end else None,  # fixed weights do not follow it
        }

    def state_dict(self) -> dict[str, Any]:
        """The draw counts (how many of samples 0..scanned-1 came from each source) with the mixture they belong to:
        saved with the data position, so that a resume without replacement need not replay every earlier draw."""
        scanned, drawn = self._counted
        return {"mixture": self.identity(), "scanned": scanned, "drawn": dict(drawn)}

    def load_state_dict(self, state: dict[str, Any]) -> str | None:
        """Go on from saved draw counts. Counts saved under another ``stream`` or ``horizon`` alone are a stage renamed
        (its folder moved with it), or a horizon estimated otherwise (``stage_mixture`` estimates it from a probe the
        name seeds, by a kimivl's own rule): the stream goes on as saved, its name and horizon taken from the saved
        state, so the rest of the stage draws what it would have. Those of another mixture (other sources, weights or
        seed) are left, the draws before a sample counted afresh from sample 0; what differs is returned, for the
        caller to warn of (None when the counts were taken)."""
        saved, now = state.get("mixture") or {}, self.identity()
        if saved != now and _without(saved, "stream", "horizon") == _without(now, "stream", "horizon"):
            if saved.get("stream") != self.stream:
                log.info(
                    "going on with the stream %r the saved draw counts belong to (the stage was renamed)",
                    saved["stream"],
                )
            else:  # a kimivl that estimated the samples a stage draws otherwise
                log.info("going on with the horizon of %s samples the stage began with", saved["horizon"])
            self.stream, self._orders = saved["stream"], {}
            self.horizon = saved["horizon"] or self.horizon  # None: fixed weights, which no horizon moves
            now = self.identity()
        if saved != now:
            return "; ".join(f"{k}: {saved.get(k)!r} then, {now[k]!r} now" for k in now if saved.get(k) != now[k])
        self._counted = (int(state["scanned"]), {n: int(state["drawn"][n]) for n in self.names})
        return None

    def _next_of(self, name: str, k: int) -> int:
        """The ``k``-th draw from ``name`` without replacement: item ``k % n`` of that pass's seeded shuffle."""
        n = len(self.sources[name])
        key = (name, k // n)
        orders = self._orders
        if key not in orders:
            salt = [zlib.crc32(self.stream.encode()), zlib.crc32(name.encode())]
            rng = np.random.default_rng([self.seed, *salt, k // n])
            orders = {o: v for o, v in orders.items() if o[0] != name} | {key: rng.permutation(n)}
            self._orders = orders
        return int(orders[key][k % n])

    def where(self, i: int) -> str:
        """Where sample ``i``'s record is: its ``file:line`` (``locate``) and source."""
        name, k = self.pick(i)
        return f"{locate(self.sources[name], k)} of source {name!r}"

    def sample(self, i: int) -> tuple[Encoded | None, int]:
        """Sample ``i`` encoded and its tokens; or, where ``fewest`` puts it over the budget, None and that floor on
        its tokens: a record that cannot fit is never encoded (a document of megabytes took seconds to tokenize), nor
        read again once found so."""
        name, k = self.pick(i)
        if (name, k) in self._over:
            return None, self._over[name, k]
        item = self.sources[name][k]
        if self.fewest is not None and (floor := self.fewest(name, item)) > self.budget:
            self._over[name, k] = floor
            return None, floor
        try:
            s = self.encode(name, item)
        except ValueError as e:  # DataError, ImageError, VideoError, a malformed conversation
            raise DataError(f"sample {i}: {self.where(i)} cannot be encoded: {e}") from e
        return s, len(s.input_ids)

    def batches(self, position: int) -> Iterator[tuple[PackedBatch, int]]:
        """Rows packed greedily from sample ``position`` on; a sample longer than the budget is skipped (and
        ``SKIPPED_IN_A_ROW`` of them in a row are a ``DataError``)."""
        i = position
        pending = None
        in_a_row = 0
        while True:
            row, used = [], 0
            while True:
                s, n = pending if pending is not None else self.sample(i)
                pending = None
                if n > self.budget:
                    self.skipped += 1
                    in_a_row += 1
                    log.warning(
                        "sample %d (%s, %s%d tokens) exceeds the %d-token budget; skipped",
                        i,
                        self.where(i),
                        "at least " if s is None else "",
                        n,
                        self.budget,
                    )
                    if in_a_row >= SKIPPED_IN_A_ROW:
                        raise DataError(
                            f"samples {i - in_a_row + 1} to {i} all exceed the {self.budget}-token "
                            "budget: raise the stage's budget or shorten the data"
                        )
                    i += 1
                    continue
                in_a_row = 0
                if used + n > self.budget:
                    pending = s, n
                    break
                row.append(s)
                used += n
                i += 1
            yield pack(row, self.budget), i


def _without(identity: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in identity.items() if k not in keys}
