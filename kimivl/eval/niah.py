"""Needle in a haystack: can the model find one fact at any depth of a long context (Kimi-VL report, Table 2)?

Two haystacks, each built to a target prompt length in tokens (the whole chat prompt, as the model sees it):
- ``text``: filler sentences with the needle sentence "The secret number of the day is N." placed at the
  sentence boundary nearest to the asked depth (0% = first, 100% = last).
- ``video``: frames (timestamped images, 224x224) of coloured shapes; the frame at the asked depth shows the
  secret number written large.
Each case asks for the number; it is recalled when the answer contains it (digits not part of a longer number).
Rows are indexed ``kind/length/depth/trial``; the secret is a seeded function of the index, so predictions can
be re-scored from the index alone. Recall is reported per length bucket (the report's buckets: 0-2K, 2K-4K, ...,
64K-128K) and drawn as a depth x length heatmap.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from kimivl.eval.answers import final_answer
from kimivl.eval.tables import Sample
from kimivl.files import path_text
from kimivl.processing.chat_template import apply_chat_template
from kimivl.processing.video import frames_to_parts

KINDS = ("text", "video")
DEFAULT_DEPTHS = tuple(range(0, 101, 10))
BUCKETS = ((0, 2048), (2048, 4096), (4096, 8192), (8192, 16384), (16384, 32768), (32768, 65536), (65536, 131072))
NEEDLE = "The secret number of the day is {secret}."
TEXT_QUESTION = "What is the secret number of the day mentioned in the text above? Answer with the number only."
VIDEO_QUESTION = "One frame of this video shows a secret number. What is the number? Answer with the number only."
FRAME_SIZE = 224
FILLER = (
    "The river bends twice before it reaches the old mill at the edge of town.",
    "Most mornings the market opens early and the bakers sell out of rye bread by nine.",
    "A narrow staircase leads from the kitchen to a library full of atlases.",
    "Rain fell all afternoon, so the football match was moved to the following week.",
    "The museum keeps its collection of clocks in a quiet room on the second floor.",
    "Farmers in the valley grow apples, pears and a few rows of sunflowers.",
    "The train to the coast leaves from platform four and stops at every village.",
    "Children fly kites on the hill whenever the wind comes from the west.",
    "An old lighthouse stands on the rocks, painted white with a red band.",
    "The committee met on Tuesday to discuss the repairs to the bridge.",
    "In winter the lake freezes and people skate from one shore to the other.",
    "The gardener planted tulips along the path that leads to the greenhouse.",
    "Every summer a travelling circus sets up its tent in the square.",
    "The library lends bicycles as well as books to anyone with a card.",
    "A small café near the station serves soup and sandwiches at lunchtime.",
    "Geese fly south in long lines when the first cold nights arrive.",
)


def case_index(kind: str, length: int, depth: int, trial: int) -> str:
    return f"{kind}/{length}/{depth}/{trial}"


def secret_for(index: str, seed: int = 0) -> str:
    """The 7-digit secret of a case, a function of its index and the seed."""
    return str(random.Random(f"{seed}:{index}").randrange(1_000_000, 10_000_000))


def meta_from_index(index: str, seed: int = 0) -> dict:
    """A case's meta from its index ``kind/length/depth/trial`` (what re-scoring needs); any other index is a
    ``ValueError``."""
    found = re.fullmatch(r"([a-z]+)/([0-9]+)/([0-9]+)/([0-9]+)", str(index))
    if not found or found[1] not in KINDS:
        raise ValueError(
            f"not a NIAH index: {str(index)!r:.80} (expected kind/length/depth/trial, kind one of {', '.join(KINDS)}, "
            "the others whole numbers)"
        )
    return {
        "kind": found[1],
        "length": int(found[2]),
        "depth": int(found[3]),
        "trial": int(found[4]),
        "secret": secret_for(str(index), seed),
    }


def default_lengths(context: int, max_new_tokens: int = 32) -> list[int]:
    """1K, 2K, 4K, ... below the context, then the longest prompt that leaves room for the answer."""
    top = context - max_new_tokens
    return [n for n in (1024 << k for k in range(12)) if n < top] + [top]


def _prompt_tokens(processor, messages: list[dict]) -> int:
    return len(processor.encode(messages).input_ids)


def _text_messages(haystack: str) -> list[dict]:
    return [{"role": "user", "content": f"{haystack}\n\n{TEXT_QUESTION}"}]


def text_case(processor, length: int, depth: int, secret: str, seed: int = 0) -> tuple[list[dict], dict]:
    """A text haystack of at most ``length`` prompt tokens (short of it by less than a filler sentence) with the needle
    at ``depth`` percent.
    Returns the messages and where things landed: ``tokens`` (prompt length), ``haystack`` (token span of the
    haystack in the prompt) and ``needle`` (token position of the needle's first token)."""
    tok = processor.tokenizer
    needle = NEEDLE.format(secret=secret)
    overhead = _prompt_tokens(processor, _text_messages(needle))
    rng = random.Random(f"{seed}:{length}")
    sentences, counts, budget = [], [], length - overhead
    while budget > 0:
        sentence = FILLER[rng.randrange(len(FILLER))]
        n = len(tok.encode(" " + sentence))
        if n > budget and sentences:
            break
        sentences.append(sentence)
        counts.append(n)
        budget -= n
    while True:  # joined text can tokenize longer than its sentences' counts: drop filler until it fits
        messages, where = _place_needle(processor, sentences, counts, needle, depth)
        if where["tokens"] <= length or not sentences:
            return messages, where
        sentences, counts = sentences[:-1], counts[:-1]


def _place_needle(processor, sentences: list[str], counts: list[int], needle: str, depth: int) -> tuple[list, dict]:
    """The text haystack of ``sentences`` (of ``counts`` tokens) with the needle at the sentence boundary nearest
    ``depth`` percent, and where things landed."""
    tok = processor.tokenizer
    total, before, cut = sum(counts), 0, 0
    target = depth / 100 * total
    for i, n in enumerate(counts):  # the sentence boundary nearest the target depth
        if abs(before + n - target) < abs(before - target):
            before, cut = before + n, i + 1
        else:
            break
    haystack = " ".join(sentences[:cut] + [needle] + sentences[cut:])
    messages = _text_messages(haystack)
    text, _ = apply_chat_template(messages)
    start = text.index(haystack)
    at = text.index(needle, start)
    at -= text[at - 1] == " "  # the space before the needle belongs to its first token

    def position(offset: int) -> int:
        return len(tok.encode(text[:offset]))

    where = {
        "tokens": _prompt_tokens(processor, messages),
        "haystack": [position(start), position(start + len(haystack))],
        "needle": position(at),
    }
    return messages, where


@lru_cache(maxsize=4)
def _frame_pool(seed: int, n: int = 24) -> tuple[Image.Image, ...]:
    rng = random.Random(seed)
    frames = []
    for _ in range(n):
        img = Image.new("RGB", (FRAME_SIZE, FRAME_SIZE), tuple(rng.randrange(40, 216) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randrange(2, 5)):
            x, y, r = rng.randrange(20, 204), rng.randrange(20, 204), rng.randrange(10, 40)
            box = (x - r, y - r, x + r, y + r)
            colour = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        frames.append(img)
    return tuple(frames)


def needle_frame(secret: str) -> Image.Image:
    """A white frame with the secret number written large in black."""
    img = Image.new("RGB", (FRAME_SIZE, FRAME_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((FRAME_SIZE // 2, 70), "secret number", fill=(0, 0, 0), anchor="mm", font=ImageFont.load_default(22))
    draw.text((FRAME_SIZE // 2, 130), secret, fill=(0, 0, 0), anchor="mm", font=ImageFont.load_default(40))
    return img


def _video_messages(frames: list) -> list[dict]:
    parts = frames_to_parts(frames, [float(i) for i in range(len(frames))])
    return [{"role": "user", "content": [*parts, {"type": "text", "text": VIDEO_QUESTION}]}]


def video_fit(processor, length: int, seed: int = 0) -> tuple[int, int]:
    """The most frames whose video prompt fits in ``length`` tokens, and that prompt's tokens (measured on the frames
    ``video_case`` draws with ``seed``). The count hangs on the frames' sizes and timestamps, not their pixels, so
    every depth and trial of a length shares it: ``Cases`` measures it once per length."""
    pool = _frame_pool(seed)
    one, two = (_prompt_tokens(processor, _video_messages(list(pool[:k]))) for k in (1, 2))
    per_frame = two - one  # a guess: later timestamps ("00:10.0") can take more tokens than "00:01.0"
    n = max(1, (length - (one - per_frame)) // per_frame)
    draw = _frame_draw(seed, length)
    drawn: list = []  # the frames in the order drawn, as many as a prompt measured has needed

    def tokens(k: int) -> int:
        while len(drawn) < k:
            drawn.append(next(draw))
        return _prompt_tokens(processor, _video_messages(drawn[:k]))

    count = tokens(n)
    for _ in range(3):  # again from the mean tokens per frame so far, until a step or two from the most that fit
        guess = max(1, 1 + int((length - one) * (n - 1) / (count - one))) if n > 1 else n
        if abs(guess - n) <= 1:
            break
        n, count = guess, tokens(guess)
    while count > length and n > 1:
        n, count = n - 1, tokens(n - 1)
    while (more := tokens(n + 1)) <= length:
        n, count = n + 1, more
    return n, count


def _frame_draw(seed: int, length: int):
    """The haystack frames of a case, drawn from the pool one at a time (the same order for each ``seed`` and
    ``length``)."""
    pool = _frame_pool(seed)
    rng = random.Random(f"{seed}:{length}")
    while True:
        yield pool[rng.randrange(len(pool))]


def video_case(
    processor, length: int, depth: int, secret: str, seed: int = 0, fit: tuple[int, int] | None = None
) -> tuple[list[dict], dict]:
    """A video haystack of the most frames that fit in ``length`` prompt tokens, the needle frame at ``depth`` percent.
    ``fit`` is ``video_fit``'s answer for ``length`` where already measured.
    Returns the messages and ``tokens``, ``frames`` (count) and ``needle`` (index of the needle frame)."""
    n, count = fit or video_fit(processor, length, seed)
    draw = _frame_draw(seed, length)
    frames = [next(draw) for _ in range(n)]
    at = round(depth / 100 * (n - 1))
    frames[at] = needle_frame(secret)
    return _video_messages(frames), {"tokens": count, "frames": n, "needle": at}


class Cases:
    """The NIAH cases of a grid, built lazily as they are iterated; ``len`` is their number."""

    def __init__(self, processor, lengths, depths, kinds, trials: int, seed: int):
        self.processor, self.lengths, self.depths, self.kinds = processor, lengths, depths, kinds
        self.trials, self.seed = trials, seed

    def __len__(self) -> int:
        return len(self.kinds) * len(self.lengths) * len(self.depths) * self.trials

    def __iter__(self):
        fits: dict[int, tuple[int, int]] = {}  # video frames and tokens per length, measured once
        for kind in self.kinds:
            for length in self.lengths:
                for depth in self.depths:
                    for trial in range(self.trials):
                        index = case_index(kind, length, depth, trial)
                        meta = meta_from_index(index, self.seed)
                        seed, secret = self.seed + trial, meta["secret"]
                        if kind == "text":
                            messages, where = text_case(self.processor, length, depth, secret, seed)
                        else:
                            if length not in fits:
                                fits[length] = video_fit(self.processor, length, seed)
                            messages, where = video_case(self.processor, length, depth, secret, seed, fits[length])
                        yield Sample(index, messages, {**meta, **where})


def check_options(
    lengths=None,
    depths=DEFAULT_DEPTHS,
    kinds=KINDS,
    trials: int = 1,
    context: int | None = None,
    max_new_tokens: int = 32,
) -> list[int]:
    """The prompt lengths the cases get (``lengths``, else ``default_lengths(context, max_new_tokens)``), after
    checking the options (no model needed, so the command line checks them before loading one): known haystack
    kinds, no value given twice, depths in 0-100 (percent), positive lengths and trials, and, where ``context`` is
    known, ``max_new_tokens`` below it and no length above ``context - max_new_tokens`` (such a prompt leaves no room
    for the answer: every row would fail)."""
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown haystack {kind!r} (expected one of {', '.join(KINDS)})")
    for flag, given in (("--lengths", lengths or []), ("--depths", depths), ("--haystack", kinds)):
        values = list(given)
        repeated = list(dict.fromkeys(v for i, v in enumerate(values) if v in values[:i]))
        if repeated:
            raise ValueError(
                f"NIAH {flag} gives {', '.join(map(str, repeated))} more than once (each would build the same cases "
                "again); give each value once"
            )
    bad = [d for d in depths if not 0 <= d <= 100]
    if bad:
        raise ValueError(f"NIAH depths are percentages from 0 to 100; got {', '.join(map(str, bad))} (--depths)")
    if context is not None and max_new_tokens >= context:
        raise ValueError(
            f"--max-new-tokens {max_new_tokens} must be below the model's context of {context} tokens: the prompt "
            "and the answer share it"
        )
    lengths = list(lengths or default_lengths(context or 131072, max_new_tokens))
    if any(n <= 0 for n in lengths) or trials < 1:
        raise ValueError(f"NIAH lengths and trials must be positive; got lengths {lengths}, trials {trials}")
    if context is not None:
        top = context - max_new_tokens
        over = [n for n in lengths if n > top]
        if over:
            raise ValueError(
                f"NIAH lengths {', '.join(map(str, over))} exceed what the model's context of {context} tokens leaves "
                f"for a prompt with {max_new_tokens} new tokens ({top}); give --lengths up to {top}"
            )
    return lengths


def load(
    data=None,
    processor=None,
    lengths=None,
    depths=DEFAULT_DEPTHS,
    kinds=KINDS,
    trials: int = 1,
    seed: int = 0,
    context: int | None = None,
    max_new_tokens: int = 32,
    **_,
) -> Cases:
    """NIAH cases for every kind x length x depth x trial (built lazily), with the options ``check_options``
    accepts."""
    if processor is None:
        raise ValueError("building NIAH haystacks needs the model's processor (pass --model)")
    lengths = check_options(lengths, depths, kinds, trials, context, max_new_tokens)
    return Cases(processor, lengths, list(depths), list(kinds), trials, seed)


def score(prediction: str, meta: dict, mode: str = "official", extracted: str | None = None) -> dict:
    """Recalled when the secret appears in the answer (both modes); ``extracted`` replaces the answer."""
    if extracted is not None:
        prediction = extracted
    answer = final_answer(prediction)
    found = answer is not None and re.search(rf"(?<!\d){meta['secret']}(?!\d)", answer) is not None
    return {"score": float(found), "extracted": answer}


def bucket_name(length: int) -> str:
    for lo, hi in BUCKETS:
        if length <= hi:
            return f"{lo // 1024}K-{hi // 1024}K"
    return f">{BUCKETS[-1][1] // 1024}K"


def _metric_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows each metric is over: ``recall/<kind>`` and ``recall/<kind>/<bucket>``."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        kind = r["meta"]["kind"]
        groups[f"recall/{kind}"].append(r)
        groups[f"recall/{kind}/{bucket_name(r['meta']['length'])}"].append(r)
    return groups


def summarize(rows: list[dict], mode: str = "official") -> dict[str, float]:
    """``recall/<kind>`` and ``recall/<kind>/<bucket>`` in percent."""
    return {k: 100 * sum(r["score"] for r in v) / len(v) for k, v in _metric_rows(rows).items()}


def table(rows: list[dict]) -> str:
    """Recall by length bucket, one row per haystack kind (Markdown, like the report's Table 2)."""
    metrics = summarize(rows)
    names = [bucket_name(hi) for _, hi in BUCKETS]
    names = [b for b in names if any(k.endswith(f"/{b}") for k in metrics)]
    lines = ["| haystack | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for kind in KINDS:
        if f"recall/{kind}" in metrics:
            cells = [f"{metrics[f'recall/{kind}/{b}']:.1f}" if f"recall/{kind}/{b}" in metrics else "-" for b in names]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heatmap(rows: list[dict], kind: str, path: str | Path) -> Path:
    """Recall (percent, mean over trials) as a depth x length heatmap PNG (a figure of its own: matplotlib's backend,
    a notebook's, is left as it is)."""
    from matplotlib.figure import Figure

    cells: dict[tuple[int, int], list[float]] = defaultdict(list)
    for r in rows:
        if r["meta"]["kind"] == kind:
            cells[(r["meta"]["depth"], r["meta"]["length"])].append(r["score"])
    depths = sorted({d for d, _ in cells})
    lengths = sorted({n for _, n in cells})
    grid = [
        [100 * sum(cells[(d, n)]) / len(cells[(d, n)]) if cells.get((d, n)) else float("nan") for n in lengths]
        for d in depths
    ]
    fig = Figure(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.45 * len(depths)))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n / 1024:.3g}K" for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"NIAH recall, {kind} haystack")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="recall %")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def report(rows: list[dict], out_dir: str | Path) -> dict:
    """The recall table, one heatmap PNG per haystack kind under ``out_dir`` (``figures``: their absolute paths), and
    each metric's own row counts (``metric_rows``: its rows scored and answered, which ``results.md`` shows beside
    it)."""
    kinds = sorted({r["meta"]["kind"] for r in rows})
    figures = [path_text(heatmap(rows, kind, Path(out_dir).resolve() / f"niah_{kind}.png")) for kind in kinds]
    counts = {
        k: {"scored": len(v), "answered": sum("failed" not in r for r in v)} for k, v in _metric_rows(rows).items()
    }
    return {"table": table(rows), "figures": figures, "metric_rows": counts}
