"""The Kimi tokenizer: byte-level BPE run by tiktoken, in the official two-file format.

A tokenizer directory holds ``tiktoken.model`` (one ``base64(token) rank`` line per BPE rank, ranks 0..n-1) and
``tokenizer_config.json`` whose ``added_tokens_decoder`` names some of the 256 special ids n..n+255. Unnamed special
ids are ``<|reserved_token_{id}|>`` with the absolute id, exactly as the released ``tokenization_moonshot.py`` does.
"""

from __future__ import annotations

import base64
import binascii
import functools
import heapq
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import pairwise

import regex
import tiktoken

from kimivl.files import write_text_atomic
from kimivl.processing.chat_template import MessageError

NUM_SPECIAL = 256
MODEL_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"

# The released split regex (spec section 8). tiktoken's fancy-regex engine supports the `&&` class intersection.
PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# Special tokens of the released table, by index from the first special id (163584 in the real model).
DEFAULT_SPECIAL_NAMES = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    10: "<|im_system|>",
    17: "<|im_middle|>",
    18: "<|media_start|>",
    19: "<|media_content|>",
    20: "<|media_end|>",
    21: "<|media_pad|>",
    254: "[UNK]",
    255: "[PAD]",
}

# The special tokens kimivl reads: the chat template's turns, the image and video placeholders, generation's stops,
# training's [BOS] / [EOS] / [PAD]. [UNK] is never used (byte-level BPE encodes any text).
REQUIRED_SPECIAL = tuple(name for name in DEFAULT_SPECIAL_NAMES.values() if name != "[UNK]")

# Chunking of long inputs, as the released tokenizer does: pieces of at most 400,000 characters, each cut inside
# runs of more than 25,000 consecutive whitespace or non-whitespace characters (tiktoken is quadratic there).
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


@functools.cache
def _long_run(max_run: int) -> re.Pattern:
    """Runs of more than ``max_run`` whitespace or non-whitespace characters. A match starts only where a run does:
    tried at every character, as a bare ``\\S{n,}`` is, each one of a shorter run would scan to the run's end, and
    runs just under the length would take time quadratic in it (minutes for a megabyte)."""
    return re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % (max_run + 1, max_run + 1))


class TokenizerError(ValueError):
    """A missing or malformed tokenizer file."""


def reserved_name(token_id: int) -> str:
    return f"<|reserved_token_{token_id}|>"


def split_long_runs(text: str, max_run: int = MAX_RUN_CHARS) -> list[str]:
    """Cut ``text`` every ``max_run`` characters inside longer whitespace / non-whitespace runs."""
    cuts = [c for m in _long_run(max_run).finditer(text) for c in range(m.start() + max_run, m.end(), max_run)]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in pairwise(bounds)]


def _check_surrogates(text: str) -> None:
    """A ``MessageError`` when ``text`` holds a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MessageError(
            f"the text holds a lone surrogate {ascii(text[e.start])} (half of a UTF-16 pair without the other, as "
            f"bytes decoded with errors='surrogateescape' or a JSON escape give) at character {e.start + 1}: not text; "
            "decode the bytes as UTF-8, or remove it"
        ) from None


def _special(name: str) -> property:
    return property(lambda self: self.special_id(name), doc=f"Id of the special token {name}.")


class KimiTokenizer:
    """Byte-level BPE with the Kimi split regex and 256 special ids after the ranks."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_names: dict[int, str],
        config: dict | None = None,
        name: str = "kimi",
    ):
        """``special_names`` maps absolute special ids to their names; the rest are reserved.

        ``config`` is the tokenizer_config.json content written back by :meth:`save_pretrained`.
        """
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise TokenizerError("BPE ranks must be exactly 0..n-1 with no gaps or duplicates")
        for i, content in special_names.items():
            if not n <= i < n + NUM_SPECIAL:
                raise TokenizerError(
                    f"special token {content!r} has id {i}, outside the special range {n}..{n + NUM_SPECIAL - 1}"
                )
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens: dict[str, int] = {}
        for i in range(n, n + NUM_SPECIAL):
            content = special_names.get(i, reserved_name(i))
            if content in self.special_tokens:
                raise TokenizerError(
                    f"special token {content!r} is named twice (ids {self.special_tokens[content]} and {i})"
                )
            self.special_tokens[content] = i
        self.id_to_special = {i: s for s, i in self.special_tokens.items()}
        self.config = config if config is not None else _default_config(special_names)
        self._enc = tiktoken.Encoding(
            name=name, pat_str=PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )

    @property
    def n_ranks(self) -> int:
        return len(self.mergeable_ranks)

    @property
    def vocab_size(self) -> int:
        return self.n_ranks + NUM_SPECIAL

    def special_id(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KeyError(f"this tokenizer has no special token {name!r}") from None

    bos_id = _special("[BOS]")
    eos_id = _special("[EOS]")
    im_end_id = _special("<|im_end|>")
    im_user_id = _special("<|im_user|>")
    im_assistant_id = _special("<|im_assistant|>")
    im_system_id = _special("<|im_system|>")
    im_middle_id = _special("<|im_middle|>")
    media_start_id = _special("<|media_start|>")
    media_content_id = _special("<|media_content|>")
    media_end_id = _special("<|media_end|>")
    media_pad_id = _special("<|media_pad|>")
    unk_id = _special("[UNK]")
    pad_id = _special("[PAD]")

    @property
    def stop_ids(self) -> list[int]:
        """Generation stops on ``<|im_end|>`` or ``[EOS]``."""
        return [self.im_end_id, self.eos_id]

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` has no text: a special id after the BPE ranks, or one past them all that a model with
        a larger vocabulary than its tokenizer's can generate (``decode`` refuses it)."""
        return token_id >= self.n_ranks

    @functools.cached_property
    def longest_token(self) -> int:
        """The most bytes one token holds: a text of n bytes is at least n / longest_token tokens."""
        return max(map(len, self.mergeable_ranks))

    def encode(self, text: str, allow_special: bool = True, limit: int | None = None) -> list[int]:
        """Token ids of ``text``; no BOS is added. Special-token strings become their ids, as the released tokenizer
        does, unless ``allow_special`` is False: then they are plain text (ordinary tokens), which is how message
        content and documents must be encoded so that they cannot forge turns, system prompts or image slots. Text
        holding a lone surrogate, which is no Unicode character, is a ``MessageError`` (tiktoken would read it as
        U+FFFD). With ``limit``, the first ``limit`` ids alone: the text is encoded in pieces, each on its own (at
        most ``MAX_ENCODE_CHARS`` characters), and those after the one that reaches ``limit`` are never encoded, so a
        document of megabytes cut to a few tokens costs one piece."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if not text.isascii():
            _check_surrogates(text)
        ids: list[int] = []
        for start in range(0, max(len(text), 1), MAX_ENCODE_CHARS):
            for chunk in split_long_runs(text[start : start + MAX_ENCODE_CHARS]):
                ids.extend(
                    self._enc.encode(chunk, allowed_special="all")
                    if allow_special
                    else self._enc.encode_ordinary(chunk)
                )
                if limit is not None and len(ids) >= limit:
                    return ids[:limit]
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes of ``ids`` (a streaming decoder can hold back an incomplete UTF-8 tail)."""
        ids = list(ids)
        self.check_ids(ids)
        return self._enc.decode_bytes(ids)

    def check_ids(self, ids: list[int]) -> None:
        """A ``ValueError`` naming the ids outside the vocabulary, if any."""
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})")

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode_bytes([token_id])

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> KimiTokenizer:
        model_file = os.path.join(path, MODEL_FILE)
        config_file = os.path.join(path, CONFIG_FILE)
        for f in (model_file, config_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"tokenizer directory {path} has no {os.path.basename(f)}")
        ranks = load_ranks(model_file)
        try:
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{config_file} is not valid JSON: {e}") from None
        decoder = config.get("added_tokens_decoder") if isinstance(config, dict) else None
        if not isinstance(decoder, dict):
            raise TokenizerError(f"{config_file} has no added_tokens_decoder object naming the special tokens")
        names = {}
        for key, entry in decoder.items():
            if not (key.isdigit() and isinstance(entry, dict) and isinstance(entry.get("content"), str)):
                raise TokenizerError(
                    f"{config_file}: bad added_tokens_decoder entry {key!r}: {entry!r} "
                    '(expected an integer id mapping to {"content": str, ...})'
                )
            names[int(key)] = entry["content"]
        tokenizer = cls(ranks, names, config=config, name=os.path.basename(os.path.normpath(path)))
        missing = [name for name in REQUIRED_SPECIAL if name not in tokenizer.special_tokens]
        if missing:
            raise TokenizerError(
                f"{config_file}: added_tokens_decoder names no {', '.join(missing)}: special tokens kimivl needs (chat "
                "turns, image placeholders, stopping, padding); name them as the released tokenizer_config.json does"
            )
        return tokenizer

    def save_pretrained(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        save_ranks(self.mergeable_ranks, os.path.join(path, MODEL_FILE))
        write_text_atomic(os.path.join(path, CONFIG_FILE), json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")


def _default_config(special_names: dict[int, str]) -> dict:
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    return {
        "added_tokens_decoder": {str(i): {"content": s, **entry} for i, s in sorted(special_names.items())},
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "unk_token": "[UNK]",
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
    }


def load_ranks(file: str | os.PathLike) -> dict[bytes, int]:
    """Read a ``tiktoken.model`` file (lines ``base64(token) rank``)."""
    ranks: dict[bytes, int] = {}
    with open(file, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                b64, rank = line.split()
                token, rank = base64.b64decode(b64, validate=True), int(rank)
            except (ValueError, binascii.Error):
                raise TokenizerError(f"{file}:{lineno}: expected 'base64(token) rank', got {line[:80]!r}") from None
            if token in ranks:
                raise TokenizerError(f"{file}:{lineno}: token {token!r} appears twice")
            ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{file} holds no BPE ranks")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{file}: ranks must be exactly 0..{len(ranks) - 1} with no gaps or duplicates")
    return ranks


def save_ranks(ranks: dict[bytes, int], file: str | os.PathLike) -> None:
    """Write ``ranks`` as tiktoken's file (base64 token, rank, a line each), atomically (``write_text_atomic``)."""
    ordered = sorted(ranks.items(), key=lambda kv: kv[1])
    write_text_atomic(file, "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in ordered))


# Python's `regex` module needs VERSION1 for the `&&` class intersection; used only to pre-split training text.
_TRAIN_SPLIT = regex.compile(PAT_STR, regex.VERSION1)


def train_bpe(
    texts: Iterable[str], vocab_size: int = 3840, special_names: dict[int, str] | None = None
) -> KimiTokenizer:
    """Learn ``vocab_size`` byte-level BPE ranks (the 256 single bytes are ranks 0..255) from ``texts``.

    Special tokens follow at ids ``vocab_size..vocab_size+255``, named like the released table unless
    ``special_names`` (index from the first special id -> name) says otherwise.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be an iterable of str (a list of documents), not one str")
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (one rank per byte), got {vocab_size}")
    word_counts: Counter[bytes] = Counter()
    for text in texts:  # long runs cut as encode cuts them: a merge never spans more than encode would see
        word_counts.update(
            w.encode("utf-8") for piece in split_long_runs(text, MAX_RUN_CHARS) for w in _TRAIN_SPLIT.findall(piece)
        )
    ranks = {bytes([b]): b for b in range(256)}
    vocab = [bytes([b]) for b in range(256)]  # rank -> bytes; words are lists of ranks
    words = [list(w) for w in word_counts]
    freqs = list(word_counts.values())
    pair_counts: Counter[tuple[int, int]] = Counter()
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, w in enumerate(words):
        for pair in pairwise(w):
            pair_counts[pair] += freqs[wi]
            where[pair].add(wi)
    heap = [(-c, vocab[a], vocab[b], (a, b)) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    while len(ranks) < vocab_size:
        while heap:
            neg, _, _, pair = heapq.heappop(heap)
            if pair_counts.get(pair, 0) == -neg and neg < 0:
                break
        else:
            raise ValueError(
                f"the training text only supports {len(ranks)} ranks, fewer than vocab_size="
                f"{vocab_size}; give more (or more varied) text"
            )
        # Always new bytes: the pair's tokens, wherever they lie, were split at every earlier step as their bytes
        # alone would be (no merge crosses a token boundary that lasts), so an earlier merge making the same bytes
        # would have joined them already.
        merged = vocab[pair[0]] + vocab[pair[1]]
        new_id = ranks[merged] = len(vocab)
        vocab.append(merged)
        touched: set[tuple[int, int]] = set()
        for wi in where.pop(pair):
            w, f = words[wi], freqs[wi]
            for p in pairwise(w):
                pair_counts[p] -= f
                touched.add(p)
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[wi] = out
            for p in pairwise(out):
                pair_counts[p] += f
                where[p].add(wi)
                touched.add(p)
        for p in touched:
            c = pair_counts[p]
            if c > 0:
                heapq.heappush(heap, (-c, vocab[p[0]], vocab[p[1]], p))
            else:
                pair_counts.pop(p, None)
    names = DEFAULT_SPECIAL_NAMES if special_names is None else special_names
    return KimiTokenizer(ranks, {vocab_size + i: s for i, s in names.items()}, name="trained")
