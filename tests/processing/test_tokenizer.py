import base64
import json
import os
import time
from collections import Counter
from itertools import accumulate, pairwise
from pathlib import Path

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from kimivl.config import TINY_SPECIAL_BASE, TINY_VOCAB, KimiVLConfig
from kimivl.processing.processor import KimiVLProcessor
from kimivl.processing.tokenizer import (
    _TRAIN_SPLIT,
    DEFAULT_SPECIAL_NAMES,
    MAX_RUN_CHARS,
    PAT_STR,
    KimiTokenizer,
    TokenizerError,
    load_ranks,
    split_long_runs,
    train_bpe,
)

SAMPLE = (
    "The quick brown fox jumps over the lazy dog. It's what they'd say, isn't it? I'll DON'T.\n"
    "Numbers 1234567 and 3.14159; URLs https://example.com/a_b?c=d#e.\n"
    "中文分词测试：今天天气很好，我们去公园散步。日本語のテキストも少し。한국어 문장입니다.\n"
    "Emoji 😀🎉👍🏽 and flags 🇫🇷, accents: naïve café résumé Ångström, Ελληνικά, русский текст.\n"
    "Tabs\tand    spaces   \n\n\n  indented\r\nwindows line\n"
)


def corpus(repeat: int = 30) -> list[str]:
    words = SAMPLE.split()
    return [SAMPLE] * repeat + [" ".join(words[i:] + words[:i]) for i in range(len(words))]


@pytest.fixture(scope="module")
def tok() -> KimiTokenizer:
    return train_bpe(corpus(), vocab_size=500)


def tiktoken_pieces(text: str) -> list[str]:
    """Pre-tokens as tiktoken's own regex engine splits them: with every substring of ``text`` in the vocabulary,
    BPE merges each pre-token into a single token."""
    b = text.encode()
    ranks = {bytes([i]): i for i in range(256)}
    for s in sorted({b[i:j] for i in range(len(b)) for j in range(i + 2, len(b) + 1)}, key=lambda s: (len(s), s)):
        ranks[s] = len(ranks)
    enc = tiktoken.Encoding("pieces", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    return [enc.decode_single_token_bytes(t).decode() for t in enc.encode_ordinary(text)]


@pytest.mark.parametrize(
    "text, pieces",
    [
        ("a中文b", ["a", "中文", "b"]),  # Han is cut out of the letter classes by the && intersection
        ("Hello World's", ["Hello", " World's"]),
        ("ÉCOLE normale", ["ÉCOLE", " normale"]),
        ("camelCaseWord", ["camel", "Case", "Word"]),
        ("12345 ab", ["123", "45", " ab"]),
        ("x  \t y\n\n z", ["x", "  \t", " y", "\n\n", " z"]),
        ("Hi!\n\nYo 1234567", ["Hi", "!\n\n", "Yo", " ", "123", "456", "7"]),  # punctuation keeps its newlines
        ("日本語のテキスト", ["日本語", "のテキスト"]),
    ],
)
def test_split_regex_in_tiktoken(text, pieces):
    assert tiktoken_pieces(text) == pieces
    assert _TRAIN_SPLIT.findall(text) == pieces


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.text(alphabet=st.sampled_from(list("aZé 中文\n\t'sS1😀!-ÉΩж")), max_size=14))
def test_training_split_matches_tiktoken(text):
    assert _TRAIN_SPLIT.findall(text) == tiktoken_pieces(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        SAMPLE,
        "  leading and trailing  ",
        "\n\n\n",
        " " * 100,
        "中文" * 50,
        "😀" * 20 + "x",
        "mixed 中文 and english and 한국어",
        "\u0301combining first",
        "a\u0000b",
        "<|im_end|> inside <|im_user|>text",
    ],
)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_strings_are_single_ids(tok):
    base = tok.n_ranks
    ids = tok.encode("<|im_user|>user<|im_middle|>hi<|im_end|>")
    assert ids[0] == base + 3 and ids[-1] == base + 2 and base + 17 in ids
    assert tok.encode("<|media_pad|>" * 3) == [base + 21] * 3
    assert tok.encode(f"<|reserved_token_{base + 7}|>") == [base + 7]
    assert all(i < base for i in tok.encode("<|im_end"))  # an incomplete special string is plain text
    assert tok.encode("hi")[0] != tok.bos_id  # no BOS added


def test_named_special_ids(tok):
    base = tok.n_ranks
    expect = {
        "bos_id": 0,
        "eos_id": 1,
        "im_end_id": 2,
        "im_user_id": 3,
        "im_assistant_id": 4,
        "im_system_id": 10,
        "im_middle_id": 17,
        "media_start_id": 18,
        "media_content_id": 19,
        "media_end_id": 20,
        "media_pad_id": 21,
        "unk_id": 254,
        "pad_id": 255,
    }
    assert {k: getattr(tok, k) - base for k in expect} == expect
    assert tok.stop_ids == [base + 2, base + 1]
    assert tok.decode([tok.media_pad_id]) == "<|media_pad|>"
    assert tok.vocab_size == base + 256
    with pytest.raises(KeyError, match="no special token"):
        tok.special_id("<|nope|>")


def test_tiny_preset_layout():
    stdlib = Path(os.__file__).parent
    texts = [(stdlib / f).read_text(encoding="utf-8") for f in ("os.py", "argparse.py", "typing.py", "inspect.py")]
    tok = train_bpe(texts, vocab_size=TINY_SPECIAL_BASE)
    cfg = KimiVLConfig.from_preset("tiny")
    assert tok.vocab_size == TINY_VOCAB == cfg.text_config.vocab_size
    assert tok.bos_id == cfg.text_config.bos_token_id
    assert tok.stop_ids == sorted(cfg.text_config.eos_token_id, reverse=True)
    assert tok.media_pad_id == cfg.media_placeholder_token_id


def test_trainer_bytes_first_and_exact_size(tok):
    ranks = tok.mergeable_ranks
    assert len(ranks) == 500 and sorted(ranks.values()) == list(range(500))
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert tok.decode(tok.encode("\x7f\xff never seen ☃")) == "\x7f\xff never seen ☃"
    assert len(tok.encode(SAMPLE)) < len(SAMPLE.encode()) / 2  # merges were learned


def naive_bpe(texts, vocab_size):
    """Reference trainer: recount every pair each step."""
    words = Counter(w.encode() for t in texts for w in _TRAIN_SPLIT.findall(t))
    seqs = {w: [bytes([b]) for b in w] for w in words}
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < vocab_size:
        pairs = Counter()
        for w, s in seqs.items():
            for p in pairwise(s):
                pairs[p] += words[w]
        a, b = min(pairs, key=lambda p: (-pairs[p], p[0], p[1]))
        ranks.setdefault(a + b, len(ranks))
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return ranks


def test_trainer_matches_naive_reference():
    texts = corpus(2)
    assert train_bpe(texts, vocab_size=420).mergeable_ranks == naive_bpe(texts, 420)


def test_runs_of_one_letter_train_each_length_once_with_the_ranks_worked_out_by_hand():
    """Words a, aa, ... a*9 (once each), trained to the end. Where bytes could be reached by two merge paths (aaa as
    aa+a or a+aa, a*5 as a*4+a or aa+aaa ...) the trainer meets only one: each merge makes new bytes, one rank each.
    By hand: aa (36 pairs), aa+aa (12), then ties of 2 and of 1 go to the smallest bytes, left token first: aa+a,
    a*4+a, a*4+aa, a*4+aaa, a*4+a*4, a*4+a*5."""
    tok = train_bpe(["a" * n for n in range(1, 10)], vocab_size=264)
    merged = {token: rank for token, rank in tok.mergeable_ranks.items() if rank >= 256}
    assert merged == {b"a" * n: rank for n, rank in zip((2, 4, 3, 5, 6, 7, 8, 9), range(256, 264))}
    assert [tok.encode("a" * n) for n in (3, 5, 10, 11)] == [[258], [259], [257, 260], [257, 261]]
    assert tok.mergeable_ranks == naive_bpe(["a" * n for n in range(1, 10)], 264)


def test_trainer_rejects_too_small_corpus():
    with pytest.raises(ValueError, match="only supports"):
        train_bpe(["abab"], vocab_size=300)


def test_split_long_runs_matches_released_loop():
    def released(s, limit):  # the released tokenizer's splitting loop, restated
        out, run, start, space = [], 0, 0, s[0].isspace() if s else False
        for i, ch in enumerate(s):
            if ch.isspace() != space:
                run, space = 1, ch.isspace()
            else:
                run += 1
                if run > limit:
                    out.append(s[start:i])
                    start, run = i, 1
        return out + [s[start:]]

    for s in ["", "abc", "a" * 25, " " * 10 + "b" * 23 + "\u3000" * 9, "x" * 20 + " " * 5 + "y" * 7]:
        assert split_long_runs(s, 10) == released(s, 10)
    text = "a" * (2 * MAX_RUN_CHARS + 7) + " " * (MAX_RUN_CHARS + 1) + "end"
    assert split_long_runs(text) == released(text, MAX_RUN_CHARS)
    near = ("A" * (MAX_RUN_CHARS - 1) + " ") * 3 + "\u4e2d" * (MAX_RUN_CHARS + 2) + " " * (MAX_RUN_CHARS - 2) + "x"
    assert split_long_runs(near) == released(near, MAX_RUN_CHARS)


def test_runs_just_under_the_cut_are_found_in_linear_time(tok):
    """Finding the runs to cut once scanned each shorter run from every one of its characters (a bare ``\\S{25001,}``):
    runs just under MAX_RUN_CHARS took about 0.5 s each, a minute per megabyte of such text, before a server refused
    it as longer than the context. They are left whole, and the text still round-trips."""
    text = ("A" * (MAX_RUN_CHARS - 1000) + " ") * 10
    start = time.perf_counter()
    chunks = split_long_runs(text)
    ids = tok.encode(text, allow_special=False)
    assert time.perf_counter() - start < 1.0  # before: 5 s or more
    assert chunks == [text] and tok.decode(ids) == text


def test_chunked_encoding(tok):
    normal = SAMPLE * 300  # about 100k characters, no long runs: one chunk
    assert len(split_long_runs(normal)) == 1
    assert tok.encode(normal) == tok._enc.encode(normal, allowed_special="all")
    long_run = "ab" * MAX_RUN_CHARS + " " * (MAX_RUN_CHARS + 5) + "tail"
    ids = tok.encode(long_run)
    assert tok.decode(ids) == long_run
    chunks = split_long_runs(long_run)
    assert [len(c) for c in chunks] == [MAX_RUN_CHARS, 2 * MAX_RUN_CHARS, 9]  # cut inside each long run
    assert [len(c) for c in split_long_runs("a" * 50_001 + " b")] == [25_000, 25_000, 3]  # the released run length


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = KimiTokenizer.from_pretrained(tmp_path)
    assert again.mergeable_ranks == tok.mergeable_ranks and again.special_tokens == tok.special_tokens
    assert again.encode(SAMPLE) == tok.encode(SAMPLE)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["added_tokens_decoder"][str(tok.n_ranks + 21)]["content"] == "<|media_pad|>"
    again.save_pretrained(tmp_path / "b")
    for f in ("tiktoken.model", "tokenizer_config.json"):
        assert (tmp_path / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def write_hand_built(path, extra_config=None):
    merges = [b"he", b"ll", b"hell", b"hello", b" w"]
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    lines += [f"{base64.b64encode(m).decode()} {256 + i}" for i, m in enumerate(merges)]
    (path / "tiktoken.model").write_text("\n".join(lines) + "\n")
    n = 256 + len(merges)
    cfg = {
        "added_tokens_decoder": {str(n + i): {"content": s, "special": True} for i, s in DEFAULT_SPECIAL_NAMES.items()},
        **(extra_config or {}),
    }
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return n


def test_hand_built_files(tmp_path):
    n = write_hand_built(tmp_path, {"chat_template": "kept", "model_max_length": 1048576})
    tok = KimiTokenizer.from_pretrained(tmp_path)
    assert tok.encode("hello world") == [259, 260, ord("o"), ord("r"), ord("l"), ord("d")]
    assert tok.encode("hello<|im_end|>") == [259, n + 2]
    assert tok.decode([n + 5]) == f"<|reserved_token_{n + 5}|>"  # unnamed ids are reserved by absolute id
    tok.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == "kept" and cfg["model_max_length"] == 1048576
    assert load_ranks(tmp_path / "out" / "tiktoken.model") == tok.mergeable_ranks
    with open(tmp_path / "out" / "tiktoken.model", "a") as f:  # blank lines are skipped
        f.write("\n \n")
    assert load_ranks(tmp_path / "out" / "tiktoken.model") == tok.mergeable_ranks


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: (p / "tiktoken.model").unlink(), "no tiktoken.model"),
        (lambda p: (p / "tokenizer_config.json").unlink(), "no tokenizer_config.json"),
        (lambda p: (p / "tiktoken.model").write_text("!!notbase64 0\n"), "expected 'base64"),
        (lambda p: (p / "tiktoken.model").write_text("YQ== 0\n\n!!x 1\n"), r"tiktoken.model:3: expected 'base64"),
        (
            lambda p: (p / "tiktoken.model").write_text("YQ== 0\nYg== 5\n"),
            r"tiktoken.model: ranks must be exactly 0..1",
        ),
        (lambda p: (p / "tiktoken.model").write_text("YQ== 0\nYQ== 1\n"), "appears twice"),
        (lambda p: (p / "tiktoken.model").write_text(""), "no BPE ranks"),
        (lambda p: (p / "tokenizer_config.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "tokenizer_config.json").write_text("{}"), "no added_tokens_decoder"),
        (
            lambda p: (p / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"3": {"content": "x"}}}'),
            "outside the special range",
        ),
        (
            lambda p: (p / "tokenizer_config.json").write_text(
                '{"added_tokens_decoder": {"261": {"content": "[BOS]"}, "262": {"content": "[BOS]"}}}'
            ),
            "named twice",
        ),
        (lambda p: (p / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"x": 1}}'), "bad added_tokens"),
    ],
)
def test_bad_files(tmp_path, damage, match):
    write_hand_built(tmp_path)
    damage(tmp_path)
    with pytest.raises((TokenizerError, FileNotFoundError), match=match):
        KimiTokenizer.from_pretrained(tmp_path)


def test_a_config_without_a_special_token_kimivl_needs_is_refused_by_file_and_name(tmp_path):
    """Before, it loaded and the first chat, image or generation failed with a bare KeyError naming no file."""
    n = write_hand_built(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    full = json.loads(config.read_text())
    for dropped in (["<|media_pad|>"], ["[EOS]", "<|im_end|>"], ["[PAD]"]):
        kept = {k: v for k, v in full["added_tokens_decoder"].items() if v["content"] not in dropped}
        config.write_text(json.dumps({"added_tokens_decoder": kept}))
        with pytest.raises(TokenizerError) as e:
            KimiTokenizer.from_pretrained(tmp_path)
        assert str(e.value).startswith(f"{config}: added_tokens_decoder names no {', '.join(dropped)}: "), e.value
    kept = {k: v for k, v in full["added_tokens_decoder"].items() if v["content"] != "[UNK]"}  # never used
    config.write_text(json.dumps({"added_tokens_decoder": kept}))
    assert KimiTokenizer.from_pretrained(tmp_path).media_pad_id == n + 21


def test_decode_rejects_out_of_range(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_train_bpe_cuts_long_runs_as_encode_does_and_wants_a_list(monkeypatch):
    """A long run trained merges longer than encode (which cuts runs at MAX_RUN_CHARS) ever sees, in time growing
    with the run's length times the merges; one str was read as a corpus of characters."""
    import kimivl.processing.tokenizer as tokenizer

    assert max(len(b) for b in train_bpe(["a" * 40, "b" * 40], vocab_size=264).mergeable_ranks) == 16  # uncut
    monkeypatch.setattr(tokenizer, "MAX_RUN_CHARS", 8)  # (a cut at the default length was once taken for any)
    with pytest.raises(ValueError, match="only supports 262 ranks"):  # runs of 8 hold no pair past 'a' * 8
        train_bpe(["a" * 40, "b" * 40], vocab_size=264)
    tok = train_bpe(["a" * 40, "b" * 40], vocab_size=262)
    assert max(len(b) for b in tok.mergeable_ranks) == 8
    with pytest.raises(TypeError, match="iterable of str"):
        train_bpe("hello world", vocab_size=260)


def test_a_special_id_past_the_last_of_the_256_is_refused(tok):
    n = tok.n_ranks
    assert KimiTokenizer(tok.mergeable_ranks, {n + 255: "[LAST]"}).special_id("[LAST]") == n + 255
    with pytest.raises(TokenizerError, match=f"outside the special range {n}..{n + 255}"):
        KimiTokenizer(tok.mergeable_ranks, {n + 256: "[PAST]"})  # it would be dropped without a word


def test_is_special_starts_at_the_first_special_id(tok):
    assert tok.is_special(tok.bos_id) and tok.bos_id == tok.n_ranks
    assert not tok.is_special(tok.n_ranks - 1) and tok.is_special(tok.vocab_size - 1)


def test_invalid_utf8_decodes_to_the_replacement_character(tok):
    half = tok.mergeable_ranks[b"\xc3"]  # the first byte of "é" alone is not UTF-8
    assert tok.decode([half]) == "\ufffd" and tok.decode([half, *tok.encode("x")]) == "\ufffdx"


def test_texts_longer_than_one_encode_chunk_lose_nothing(tok, monkeypatch):
    import kimivl.processing.tokenizer as tokenizer

    monkeypatch.setattr(tokenizer, "MAX_ENCODE_CHARS", 1000)
    text = SAMPLE * (2500 // len(SAMPLE) + 1)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == [i for start in range(0, len(text), 1000) for i in tok._enc.encode(text[start : start + 1000])]


def test_a_limit_gives_the_first_ids_and_leaves_the_pieces_after_them_unencoded(tok, monkeypatch):
    """A caption of megabytes cut to 62 tokens, or a document cut to the context, was tokenized whole; with ``limit``
    the ids are the first ``limit`` of the whole text's, and no piece after the one that reaches them is encoded."""
    import kimivl.processing.tokenizer as tokenizer

    monkeypatch.setattr(tokenizer, "MAX_ENCODE_CHARS", 1000)
    text = SAMPLE * (5000 // len(SAMPLE) + 1)
    whole = tok.encode(text, allow_special=False)
    chunks = [text[start : start + 1000] for start in range(0, len(text), 1000)]
    reach = list(accumulate(len(tok.encode(c, allow_special=False)) for c in chunks))  # ids to each end
    pieces, encode = [], tok._enc.encode_ordinary
    monkeypatch.setattr(tok._enc, "encode_ordinary", lambda piece: pieces.append(piece) or encode(piece))
    for limit in (0, 1, 62, reach[0], reach[0] + 1, len(whole) - 1, len(whole), len(whole) + 5):
        pieces.clear()
        assert tok.encode(text, allow_special=False, limit=limit) == whole[:limit]
        last = next((j for j, n in enumerate(reach) if n >= limit), len(chunks) - 1)
        assert pieces == chunks[: last + 1], limit  # one piece for 62 ids of 5,000 characters
    assert tok.encode(text, limit=62) == tok.encode(text)[:62]


def test_ids_past_the_vocabulary_are_refused_not_decoded_as_special(tok):
    """The processor's decode dropped an id past the vocabulary as special (no text) and returned '' where one below 0
    raised; generation still treats one as text-less (a model's vocabulary may be larger than its tokenizer's)."""
    assert tok.is_special(tok.vocab_size) and not tok.is_special(tok.n_ranks - 1)
    processor = KimiVLProcessor(tok)
    assert processor.decode([tok.bos_id, *tok.encode("hi")]) == "hi"
    for bad in (-100, tok.vocab_size, 99999):
        with pytest.raises(ValueError, match=f"token ids \\[{bad}\\] are outside the vocabulary"):
            processor.decode([bad])


def test_text_with_a_lone_surrogate_is_refused_not_read_as_the_replacement_character(tok):
    """tiktoken read a lone surrogate (bytes decoded with surrogateescape, a JSON "\\ud800") as U+FFFD: the model saw
    another text than the caller's, silently. It is refused, as a message that cannot be encoded."""
    from kimivl.processing.chat_template import MessageError

    assert tok._enc.encode_ordinary("caf\udcc3") == tok._enc.encode_ordinary("caf\ufffd")  # what tiktoken does
    for text in ("caf\udcc3\udca9", "\ud800", "naïve \U0001f600 \udfff"):
        for allow_special in (True, False):
            with pytest.raises(MessageError, match=r"lone surrogate '\\ud[89a-f][0-9a-f]{2}' \(.*\) at character \d+"):
                tok.encode(text, allow_special=allow_special)
    with pytest.raises(MessageError, match=r"lone surrogate '\\ud800' \(.*\) at character 5: not text"):
        KimiVLProcessor(tok).encode([{"role": "user", "content": "café\ud800"}])
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE  # text that is all characters is encoded as before
