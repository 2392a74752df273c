"""Packing samples into rows, and the seeded, resumable mixture that feeds them."""

import itertools
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from kimivl.data import mixture
from kimivl.data.formats import DataError
from kimivl.data.indexed import JsonlRecords
from kimivl.data.mixture import Mixture
from kimivl.data.packing import pack
from kimivl.processing.processor import IGNORE_INDEX, Encoded
from tests.midway import Midway


def picture(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def chat(question, answer, image=None):
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def samples(small_processor):
    return [
        small_processor.encode_for_training(chat("What colour is it?", "red", picture(56, 28, 0))),
        small_processor.encode_text("Count the circles: there are 3 circles."),
        small_processor.encode_for_training(chat("How many squares?", "2 squares", picture(28, 84, 1))),
    ]


def test_a_packed_row_scores_each_sample_as_if_alone(small_model, samples):
    """Bounds, labels and images of the row; its loss is the token-weighted mean of each sample's loss run alone, so
    no sample sees another and only each sample's own scored tokens count."""
    row = pack(samples, budget=512)
    lengths = [len(s.input_ids) for s in samples]
    assert row.cu_seqlens.tolist() == np.cumsum([0] + lengths).tolist() and row.cu_seqlens.dtype == torch.int32
    assert row.input_ids[0].tolist() == [t for s in samples for t in s.input_ids]
    assert row.labels[0].tolist() == [t for s in samples for t in [IGNORE_INDEX] + s.labels[1:]]
    assert torch.equal(row.pixel_values, torch.cat([samples[0].pixel_values, samples[2].pixel_values]))
    assert row.image_grid_hws.tolist() == [[2, 4], [6, 2]]
    assert row.efficiency == sum(lengths) / 512

    with torch.no_grad():
        packed = small_model(**row.kwargs()).loss
        total, scored = 0.0, 0
        for s in samples:
            alone = small_model(
                torch.tensor([s.input_ids]),
                s.pixel_values if len(s.image_grid_hws) else None,
                s.image_grid_hws if len(s.image_grid_hws) else None,
                torch.tensor([s.labels]),
            ).loss
            n = sum(t != IGNORE_INDEX for t in s.labels[1:])
            total, scored = total + alone * n, scored + n
    assert scored < sum(lengths) - len(samples)  # the chats' prompts are not scored
    assert torch.allclose(packed, total / scored, atol=1e-5)


def test_pack_rejects_overflow_nothing_and_unlabelled_samples(small_processor, samples):
    with pytest.raises(ValueError, match="budget of 20"):
        pack(samples, budget=20)
    with pytest.raises(ValueError, match="cannot pack 0 samples"):
        pack([], budget=20)
    with pytest.raises(ValueError, match="encode_for_training"):
        pack([samples[0], small_processor.encode([{"role": "user", "content": "Hi?"}])], budget=512)


def stream(seed=0, budget=64, fewest=None, encode=None):
    """Sources of 4-, 12- and 200-token samples; the 200-token one never fits the budget. ``encode`` is told each
    text it encodes."""
    texts = {
        "short": [f"item {i} " * 2 for i in range(10)],
        "long": [f"sample {i} " * 6 for i in range(10)],
        "huge": ["word " * 200],
    }

    def encoded(name, text):
        if encode is not None:
            encode(text)
        ids = [sum(map(ord, w)) % 97 for w in text.split()]
        return Encoded(ids, torch.zeros(0, 3, 14, 14), torch.zeros(0, 2, dtype=torch.long), ids)

    return Mixture(
        texts,
        encoded,
        budget,
        start={"short": 1, "long": 0, "huge": 0.1},
        end={"short": 0, "long": 1, "huge": 0.1},
        horizon=40,
        seed=seed,
        fewest=fewest,
    )


def test_the_mixture_is_seeded_resumable_and_skips_samples_over_the_budget(caplog):
    def rows(mix, position, n):
        it = mix.batches(position)
        return [(row.input_ids.tolist(), end) for row, end in (next(it) for _ in range(n))]

    mix = stream()
    with caplog.at_level(logging.WARNING, logger="kimivl.data.mixture"):
        first = rows(mix, 0, 12)
    assert first == rows(stream(), 0, 12) and first != rows(stream(seed=1), 0, 12)
    # resuming from a row's end position continues exactly where the uninterrupted stream went on
    assert rows(stream(), first[4][1], 7) == first[5:]
    assert all(len(ids[0]) <= 64 for ids, _ in first)
    assert mix.skipped > 0 and "(record 1 of source 'huge', 200 tokens) exceeds the 64-token budget; skipped" in (
        caplog.text
    )
    # sources in name order (huge, long, short); weights move from start to end over the horizon, then stay
    assert stream().weights(0) == [0.1, 0.0, 1.0] and stream().weights(20) == [0.1, 0.5, 0.5]
    assert stream().weights(400) == [0.1, 1.0, 0.0]
    # each sample is encoded once: the one that does not fit a row is kept for the next, not encoded again
    encoded = []
    assert rows(stream(encode=encoded.append), 0, 12) == first and len(encoded) == first[-1][1] + 1


def test_a_sample_whose_floor_is_over_the_budget_is_skipped_without_encoding_it(caplog):
    """A document of megabytes was tokenized whole at every draw only to be skipped; with ``fewest`` (a floor on a
    record's tokens) it is skipped unencoded, and unread once found over, and the stream is otherwise the same: the
    same rows, ends and skips."""

    def rows(mix):
        it = mix.batches(0)
        return [(row.input_ids.tolist(), end) for row, end in (next(it) for _ in range(12))]

    measured = []

    def fewest(name, text):  # 5 characters a word, at most 9 characters a token (the tokens here are words)
        measured.append(name)
        return len(text) // 9

    plain, encoded = stream(), []
    floored = stream(fewest=fewest, encode=encoded.append)
    with caplog.at_level(logging.WARNING, logger="kimivl.data.mixture"):
        assert rows(floored) == rows(plain)
    assert floored.skipped == plain.skipped > 0 and encoded and not [t for t in encoded if t.startswith("word")]
    assert measured.count("huge") == 1  # found over the budget once, the record is not read again
    assert "(record 1 of source 'huge', at least 111 tokens) exceeds the 64-token budget; skipped" in caplog.text
    huge = next(i for i in range(100) if floored.pick(i)[0] == "huge")
    assert floored.sample(huge) == (None, 111)
    within = stream(budget=111, fewest=fewest, encode=encoded.append).sample(huge)  # its floor fits: it is encoded
    assert within[0] is not None and within[1] == 200 and encoded[-1].startswith("word")


def test_mixture_errors_name_the_problem(tmp_path):
    ok = {"a": ["x"], "b": []}
    with pytest.raises(ValueError, match=r"unknown sources \['c'\]"):
        Mixture(ok, None, 8, start={"a": 1, "c": 1})
    with pytest.raises(ValueError, match=r"mixture sources 'b' \(no file\) hold no records"):
        Mixture(ok, None, 8, start={"a": 1, "b": 1})
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=rf"mixture sources 'b' \({tmp_path / 'empty.jsonl'}\) hold no records"):
        Mixture({**ok, "b": JsonlRecords(tmp_path / "empty.jsonl", text=True)}, None, 8, start={"a": 1, "b": 1})
    with pytest.raises(ValueError, match="positive sum"):
        Mixture(ok, None, 8, start={"a": 0})
    with pytest.raises(ValueError, match="positive sum"):  # weights that reach no source by the horizon
        Mixture(ok, None, 8, start={"a": 1}, end={"a": 0})


def test_without_replacement_every_item_comes_once_a_pass():
    sources = {"a": list(range(7)), "b": list(range(3))}
    mix = Mixture(sources, None, 8, start={"a": 2, "b": 1}, seed=5, replacement=False)
    picks = [mix.pick(i) for i in range(60)]
    for name, n in (("a", 7), ("b", 3)):
        drawn = [k for s, k in picks if s == name]
        passes = [drawn[p : p + n] for p in range(0, len(drawn) - n + 1, n)]
        assert len(passes) >= 4 and all(sorted(p) == list(range(n)) for p in passes)  # each item once a pass
        assert len({tuple(p) for p in passes}) > 1  # reshuffled between passes
    fresh = Mixture(sources, None, 8, start={"a": 2, "b": 1}, seed=5, replacement=False)
    assert [fresh.pick(i) for i in (59, 3, 40, 0)] == [picks[i] for i in (59, 3, 40, 0)]  # a pure function of i
    # the sources are drawn as with replacement; only the items within them differ
    with_replacement = Mixture(sources, None, 8, start={"a": 2, "b": 1}, seed=5, stream="sft")
    assert [s for s, _ in picks] != [with_replacement.pick(i)[0] for i in range(60)]  # another stream
    with_replacement = Mixture(sources, None, 8, start={"a": 2, "b": 1}, seed=5)
    assert [s for s, _ in picks] == [with_replacement.pick(i)[0] for i in range(60)]
    for i in range(60):  # with replacement, as ever: the source by weight, then a random item of it
        rng = random.Random(f"5//{i}")
        name = rng.choices(["a", "b"], weights=[2.0, 1.0])[0]
        assert with_replacement.pick(i) == (name, rng.randrange(len(sources[name])))


def counted_draws(monkeypatch) -> dict:
    """Counts the mixture's calls of ``sample_rng`` (one per source draw replayed, one per sample picked)."""
    calls = {"n": 0}
    real = mixture.sample_rng

    def counted(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(mixture, "sample_rng", counted)
    return calls


@pytest.mark.parametrize("replacement", [False, True])
def test_a_resume_from_the_saved_draw_counts_draws_what_an_uninterrupted_run_does(monkeypatch, tmp_path, replacement):
    """The draw counts saved with the position (through a checkpoint file) let a resume at sample 5000 go on without
    replaying the 5000 earlier draws, and its samples are those of a run never stopped (a horizon estimated otherwise
    too: the saved one is kept); counts of another mixture (another seed or weights) are not taken, and the draws are
    counted afresh."""
    sources = {"a": list(range(7)), "b": list(range(3)), "c": list(range(11))}

    def mix(seed=5, start=None, horizon=8000):
        start = start or {"a": 5, "b": 1, "c": 2}
        return Mixture(sources, None, 8, start, {"a": 1, "b": 3, "c": 2}, horizon, seed, replacement, "sft")

    at, n = 5000, 300
    never_stopped, stopped = mix(), mix()
    whole = [never_stopped.pick(i) for i in range(at + n)]
    for i in range(at):  # a run that stopped at sample ``at``
        stopped.pick(i)
    torch.save(stopped.state_dict(), tmp_path / "trainer.pt")
    saved = torch.load(tmp_path / "trainer.pt", weights_only=True)
    resumed = mix()
    resumed.load_state_dict(saved)
    calls = counted_draws(monkeypatch)
    assert [resumed.pick(i) for i in range(at, at + n)] == whole[at:]
    assert calls["n"] <= 2 * n
    calls["n"] = 0  # going back replays the samples between, not every one from sample 0
    assert [resumed.pick(i) for i in range(at - 20, at)] == whole[at - 20 : at]
    assert calls["n"] <= (20 if replacement else n + 3 * 20)
    for change in ({"seed": 6}, {"start": {"a": 1, "b": 1, "c": 1}}):
        counted_afresh, other = mix(**change), mix(**change)
        expected = [counted_afresh.pick(i) for i in range(at, at + 20)]
        other.load_state_dict(saved)
        assert [other.pick(i) for i in range(at, at + 20)] == expected
    estimated_otherwise = mix(horizon=9000)  # the same stage, its samples estimated by another kimivl: as saved
    estimated_otherwise.load_state_dict(saved)
    assert [estimated_otherwise.pick(i) for i in range(at, at + 20)] == whole[at : at + 20]
    fixed = {"a": 5, "b": 1, "c": 2}  # weights that do not move: a horizon (which follows the data's lengths) no matter
    stopped = Mixture(sources, None, 8, fixed, None, 8000, 5, replacement, "sft")
    for i in range(at):
        stopped.pick(i)
    resumed = Mixture(sources, None, 8, fixed, None, 9000, 5, replacement, "sft")
    resumed.load_state_dict(stopped.state_dict())
    calls["n"] = 0
    assert [resumed.pick(i) for i in range(at, at + n)] == [stopped.pick(i) for i in range(at, at + n)]
    assert calls["n"] <= 4 * n  # both mixtures' draws (the kept counts), not a replay of the ``at`` before


@pytest.mark.parametrize("replacement", [False, True])
def test_draw_counts_saved_under_another_stream_name_go_on_with_that_stream(monkeypatch, caplog, replacement):
    """A stage renamed between a stop and its resume (its folder moved along) seeded the rest of its samples by the
    new name, and its probe gave its moving mix another horizon: the saved counts were left with an info line, and
    a pass without replacement drew some records twice and others never. Counts that differ only in the stream's
    name, or in the horizon alone (estimated by another kimivl's rule), go on with the saved stream and horizon;
    another mixture is named, for the caller to warn of."""
    sources = {"a": list(range(7)), "b": list(range(3)), "c": list(range(11))}

    def mix(stream, horizon=8000, seed=5):
        return Mixture(
            sources, None, 8, {"a": 5, "b": 1, "c": 2}, {"a": 1, "b": 3, "c": 2}, horizon, seed, replacement, stream
        )

    at, n = 3000, 300
    never_stopped, stopped = mix("sft"), mix("sft")
    whole = [never_stopped.pick(i) for i in range(at + n)]
    for i in range(at):
        stopped.pick(i)
    saved = stopped.state_dict()
    caplog.set_level(logging.INFO, "kimivl.data.mixture")
    assert mix("sft").load_state_dict(saved) is None and "going on" not in caplog.text  # the same stream: no word
    early = mix("chat", horizon=7000)
    early.pick(0)  # a shuffle drawn under the new name is dropped with it
    assert early.load_state_dict(mix("sft").state_dict()) is None and "going on with the stream 'sft'" in caplog.text
    assert [early.pick(i) for i in range(20)] == whole[:20]
    renamed = mix("chat", horizon=7000)
    assert renamed.load_state_dict(saved) is None
    calls = counted_draws(monkeypatch)
    assert [renamed.pick(i) for i in range(at, at + n)] == whole[at:]
    assert calls["n"] <= 2 * n + 2  # the saved counts taken: no replay of the draws before ``at``
    assert renamed.state_dict()["mixture"] == saved["mixture"]  # and saved again as that stream's
    assert mix("chat", seed=6).load_state_dict(saved) == "seed: 5 then, 6 now; stream: 'sft' then, 'chat' now"
    estimated_otherwise = mix("sft", horizon=7000)  # a kimivl whose probe estimates the stage's samples otherwise
    assert estimated_otherwise.load_state_dict(saved) is None and estimated_otherwise.horizon == 8000
    assert [estimated_otherwise.pick(i) for i in range(at, at + n)] == whole[at:]


def test_threads_picking_at_once_draw_what_one_thread_does():
    """The draw counts were one cursor moved in place: a pick in another thread midway through a long replay left
    both counting from a mix of the two positions (duplicates and gaps in an epoch)."""
    sources = {"a": list(range(7)), "b": list(range(5))}
    serial = Mixture(sources, None, 8, start={"a": 2, "b": 1}, seed=5, replacement=False)
    want = {i: serial.pick(i) for i in (300, 40)}
    mix = Mixture(sources, None, 8, start={"a": 2, "b": 1}, seed=5, replacement=False)
    source, midway = mix._source, Midway()

    def paused(j):  # the other thread stops halfway through its replay of 300 draws
        if j == 150:
            midway.stop()
        return source(j)

    mix._source = paused
    assert midway.run(lambda: mix.pick(300), lambda: mix.pick(40)) == (want[300], want[40])


def test_each_stream_and_seed_draws_its_own_samples():
    """Two stages over the same sources (each its own stream), or two seeds, draw unrelated samples: no stage replays
    another's records, and seed s + 1 is not seed s shifted by some number of samples."""
    sources = {"a": list(range(1000)), "b": list(range(1000))}

    def picks(seed, stream, replacement, n=2000):
        mix = Mixture(sources, None, 8, {"a": 1, "b": 1}, seed=seed, stream=stream, replacement=replacement)
        return [mix.pick(i) for i in range(n)]

    for replacement in (True, False):
        one, other = picks(0, "sft", replacement), picks(0, "cooldown", replacement)
        assert one == picks(0, "sft", replacement)  # a pure function of (seed, stream, i)
        assert sum(x == y for x, y in zip(one, other)) < 10  # chance: 2000 / 2 / 1000 = 1 expected
        assert sum(x == y for x, y in zip(one, picks(1, "sft", replacement))) < 10
    # seed 1 is not seed 0 shifted (the old seeding, seed * 1,000,003 + i, made it sample 1,000,003 on)
    seed0, seed1 = (Mixture(sources, None, 8, {"a": 1, "b": 1}, seed=s, stream="sft") for s in (0, 1))
    shifted = [seed0.pick(1_000_003 + i) for i in range(200)]
    assert sum(x == y for x, y in zip(shifted, (seed1.pick(i) for i in range(200)))) < 5
    # without replacement, two stages of one epoch each over a source see it in different orders
    epoch = [k for _, k in picks(0, "epoch-1", False, n=2000) if _ == "a"][:500]
    assert epoch != [k for _, k in picks(0, "epoch-2", False, n=2000) if _ == "a"][:500]


def test_data_that_never_fits_the_budget_is_an_error(caplog):
    """``SKIPPED_IN_A_ROW`` (1000) samples over the budget in a row stop the stream."""
    long = Mixture({"a": ["x"] * 3}, lambda name, text: Encoded([1] * 50, None, None, [1] * 50), 16, {"a": 1})
    with (
        caplog.at_level(logging.ERROR),
        pytest.raises(DataError, match="samples 0 to 999 all exceed the 16-token budget: raise the stage's budget"),
    ):
        next(long.batches(0))


def test_the_budget_is_inclusive():
    """Samples whose lengths sum to the budget share one row, and a sample exactly as long as the budget fills a row
    alone: neither is pushed to the next row nor skipped."""

    def mixture(n):
        def encode(_, k):
            return Encoded(list(range(k)), torch.zeros(0, 3, 14, 14), torch.zeros(0, 2, dtype=torch.long), [1] * k)

        return Mixture({"s": [n]}, encode, 8, start={"s": 1})

    halves, whole = mixture(4), mixture(8)
    rows = [(row.cu_seqlens.tolist(), end) for row, end in itertools.islice(halves.batches(0), 3)]
    assert rows == [([0, 4, 8], 2), ([0, 4, 8], 4), ([0, 4, 8], 6)]
    rows = [(row.cu_seqlens.tolist(), end) for row, end in itertools.islice(whole.batches(0), 2)]
    assert rows == [([0, 8], 1), ([0, 8], 2)] and whole.skipped == 0
