import logging

import pytest
import torch

from kimivl.rl.sampler import ProblemSampler

CURRICULUM = {0.0: {"easy": 1}, 0.5: {"easy": 1, "medium": 1}, 0.8: {"easy": 1, "medium": 1, "hard": 2}}


def test_probabilities_follow_success_rates():
    s = ProblemSampler(["easy"] * 4, floor=0.1, decay=0.5)
    torch.testing.assert_close(s.probabilities(0.0), torch.full((4,), 0.25, dtype=torch.float64))
    s.update([0, 1, 2], [1.0, 0.5, 0.25])  # first visits set the rate outright
    prio = torch.tensor([0.1, 0.5, 0.75, 1.0], dtype=torch.float64)  # 1 - rate, the solved one at the floor
    torch.testing.assert_close(s.probabilities(0.0), prio / prio.sum())
    s.update([1], [1.0])  # running rate: 0.5 * 0.5 + 0.5 * 1.0 = 0.75
    assert s.success[1].item() == pytest.approx(0.75)
    assert s.visits.tolist() == [1, 2, 1, 0]


def test_curriculum_moves_from_easy_to_hard():
    labels = ["easy", "easy", "medium", "hard", "hard", "hard"]
    s = ProblemSampler(labels, CURRICULUM)
    p = s.probabilities(0.0)
    assert p[:2].tolist() == [0.5, 0.5] and p[2:].sum() == 0
    p = s.probabilities(0.6)
    assert p.tolist() == pytest.approx([0.25, 0.25, 0.5, 0, 0, 0])
    p = s.probabilities(0.9)  # hard has weight 2 of 4, shared by its three problems
    assert p.tolist() == pytest.approx([0.125, 0.125, 0.25, 1 / 6, 1 / 6, 1 / 6])
    assert set(s.sample(2, 0.1)) == {0, 1}
    assert len(s.sample(5, 0.1)) == 2  # only two problems are allowed this early


def test_priority_within_a_difficulty():
    s = ProblemSampler(["easy", "easy", "hard"], {0.0: {"easy": 1, "hard": 1}}, floor=0.05)
    s.update([0, 1], [1.0, 0.0])
    p = s.probabilities(0.0)
    assert p.tolist() == pytest.approx([0.5 * 0.05 / 1.05, 0.5 * 1 / 1.05, 0.5])


def test_no_curriculum_is_plain_prioritised_sampling():
    s = ProblemSampler(["easy", "hard", "hard", "hard"])
    torch.testing.assert_close(s.probabilities(0.3), torch.full((4,), 0.25, dtype=torch.float64))
    assert s.weights(0.3) == {}
    s.update([1], [1.0])
    prio = torch.tensor([1, 0.05, 1, 1], dtype=torch.float64)
    torch.testing.assert_close(s.probabilities(0.3), prio / prio.sum())


def test_priorities_of_never_sometimes_and_always_solved_problems():
    # problems: never solved, solved 1 in 8, solved half the time, always solved, never tried
    rates = [0.0, 0.125, 0.5, 1.0]
    failure = ProblemSampler(["easy"] * 5, floor=0.05)
    signal = ProblemSampler(["easy"] * 5, floor=0.05, priority="signal")
    for s in (failure, signal):
        s.update(range(4), rates)
    # failure: max(0.05, 1 - s), never tried as s = 0: the never-solved problem gets the most weight
    assert failure.priorities().tolist() == pytest.approx([1.0, 0.875, 0.5, 0.05, 1.0])
    # signal: max(0.05, 4 s (1 - s)), never tried as s = 1/2: never and always solved at the floor
    assert signal.priorities().tolist() == pytest.approx([0.05, 0.4375, 1.0, 0.05, 1.0])
    p = signal.probabilities(0.0)
    assert p.tolist() == pytest.approx([0.05 / 2.5375, 0.4375 / 2.5375, 1 / 2.5375, 0.05 / 2.5375, 1 / 2.5375])
    # a running rate that leaves 0 raises a never-solved problem's priority: 0.5 * 0 + 0.5 * 0.5 = 0.25 -> 0.75
    signal.update([0], [0.5])
    assert signal.priorities()[0].item() == pytest.approx(0.75)


def test_signal_priority_within_a_curriculum():
    labels, curriculum = ["easy", "easy", "easy", "hard"], {0.0: {"easy": 3, "hard": 1}}
    s = ProblemSampler(labels, curriculum, floor=0.1, priority="signal")
    s.update([0, 1, 2], [1.0, 0.25, 0.0])  # priorities 0.1, 0.75, 0.1 among the easy ones (sum 0.95)
    easy = [0.1 / 0.95, 0.75 / 0.95, 0.1 / 0.95]
    assert s.probabilities(0.0).tolist() == pytest.approx([0.75 * p for p in easy] + [0.25])
    state = s.state_dict()
    again = ProblemSampler(labels, curriculum, floor=0.1, priority="signal")
    again.load_state_dict(state)
    torch.testing.assert_close(again.probabilities(0.0), s.probabilities(0.0))


def test_sampling_frequencies_and_resume():
    s = ProblemSampler(["easy"] * 3, seed=1)
    s.update([0, 1], [1.0, 0.5])
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[s.sample(1, 0.0)[0]] += 1
    expected = torch.tensor([0.05, 0.5, 1.0]) / 1.55
    torch.testing.assert_close(counts / 3000, expected.float(), atol=0.03, rtol=0)
    state = s.state_dict()
    again = ProblemSampler(["easy"] * 3, seed=99)
    again.load_state_dict(state)
    assert [s.sample(2, 0.0) for _ in range(5)] == [again.sample(2, 0.0) for _ in range(5)]
    s.update([0, 1, 2], [0.0, 0.0, 0.0])
    again.update([2], [0.0])
    assert state["success"].tolist() == [1.0, 0.5, 0.0] and state["visits"].tolist() == [1, 1, 0]  # a snapshot
    with pytest.raises(ValueError, match="same problem sources"):
        ProblemSampler(["easy"] * 4).load_state_dict(state)


def test_bad_settings():
    with pytest.raises(ValueError, match="start at progress 0"):
        ProblemSampler(["easy"], {0.2: {"easy": 1}})
    with pytest.raises(ValueError, match="no weight"):
        ProblemSampler(["easy"], {0.0: {"hard": 1}})
    # a misspelt level had been weighed as absent (medium problems never drawn); negative weights failed in multinomial
    with pytest.raises(ValueError, match=r"curriculum phase 0.0: unknown difficulties \['mediun'\]"):
        ProblemSampler(["easy", "medium"], {0.0: {"easy": 1, "mediun": 1}})
    with pytest.raises(ValueError, match="curriculum phase 0.0: weights must be finite numbers >= 0"):
        ProblemSampler(["easy", "medium"], {0.0: {"easy": -1, "medium": 2}})
    with pytest.raises(
        ValueError, match="curriculum phase 0.0: weights must be finite numbers >= 0 with a positive sum"
    ):
        ProblemSampler(["easy", "medium"], {0.0: {"easy": 0, "medium": 0}})
    with pytest.raises(ValueError, match="curriculum phase 0.0: weights must be finite"):  # their sum overflows
        ProblemSampler(["easy", "medium"], {0.0: {"easy": 1e308, "medium": 1e308}})
    with pytest.raises(ValueError, match=r"curriculum phase 1: .* a number in \[0, 1\)"):  # never in force
        ProblemSampler(["easy", "hard"], {0.0: {"easy": 1}, 1: {"hard": 1}})
    with pytest.raises(ValueError, match=r"priority_floor must lie in \(0, 1\], got 0"):
        ProblemSampler(["easy"], floor=0)
    with pytest.raises(ValueError, match=r"success_decay must lie in \[0, 1\), got 1"):
        ProblemSampler(["easy"], decay=1)
    with pytest.raises(ValueError, match="priority must be one of"):
        ProblemSampler(["easy"], priority="uncertainty")
    with pytest.raises(ValueError, match="at least one problem"):
        ProblemSampler([])
    with pytest.raises(ValueError, match=r"priority_floor must lie in \(0, 1\], got 1.5"):
        ProblemSampler(["easy"], floor=1.5)
    with pytest.raises(ValueError, match=r"success_decay must lie in \[0, 1\), got -0.1"):
        ProblemSampler(["easy"], decay=-0.1)
    with pytest.raises(ValueError, match="curriculum maps the progress where each phase starts to its weights"):
        ProblemSampler(["easy"], [0.0])
    with pytest.raises(ValueError, match=r"curriculum phase False: .* a number in \[0, 1\)"):  # no phase 0
        ProblemSampler(["easy"], {False: {"easy": 1}})
    for weight in (True, "1"):  # not numbers
        with pytest.raises(ValueError, match="curriculum phase 0.0: weights must be finite numbers"):
            ProblemSampler(["easy"], {0.0: {"easy": weight}})
    with pytest.raises(ValueError, match=r"curriculum phase 0.0 gives no weight to any difficulty present \(easy\)"):
        ProblemSampler(["easy"], {0.0: {"easy": 0, "hard": 1}})


def test_the_bounds_of_the_settings_are_taken():
    """A floor of 1 draws uniformly, a decay of 0 keeps the latest rate alone and an empty curriculum is none."""
    s = ProblemSampler(["easy"] * 3, {}, floor=1, decay=0)
    s.update([0, 1], [1.0, 0.0])
    s.update([0], [0.25])
    assert s.success.tolist() == [0.25, 0.0, 0.0]
    torch.testing.assert_close(s.probabilities(0.5), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_running_rate_weighs_the_old_value_by_decay():
    """decay is the old rate's weight: with decay 0.8 a success after a failure moves the rate to 0.2, not 0.8
    (decay 0.5, used elsewhere, cannot tell the two apart)."""
    s = ProblemSampler(["easy"] * 2, decay=0.8)
    s.update([0, 1], [0.0, 1.0])  # first visits set the rate outright
    s.update([0, 1], [1.0, 0.0])
    assert s.success.tolist() == pytest.approx([0.2, 0.8])
    s.update([0], [1.0])  # 0.8 * 0.2 + 0.2 * 1 = 0.36
    assert s.success[0].item() == pytest.approx(0.36)


def test_a_phase_starts_at_its_own_progress():
    """The phase in force is the one with the largest start <= progress: at exactly 0.5 the second phase."""
    s = ProblemSampler(["easy", "medium", "hard"], CURRICULUM)
    assert s.weights(0.5) == {"easy": 1.0, "medium": 1.0}
    assert s.probabilities(0.5).tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert s.probabilities(0.8).tolist() == pytest.approx([0.25, 0.25, 0.5])
    assert s.weights(0.4999) == {"easy": 1.0}


def test_a_curriculum_warns_of_the_problems_it_never_draws(caplog):
    """Problems labelled "Easy" or unlabelled ("any") were never drawn under a curriculum, without a word."""
    with caplog.at_level(logging.WARNING, logger="kimivl.rl.sampler"):
        sampler = ProblemSampler(["easy", "easy", "Easy", "any", "hard"], {0.0: {"easy": 1, "medium": 1}})
    assert sampler.probabilities(0.0)[2:].tolist() == [0.0, 0.0, 0.0]
    assert sampler.weights(0.0) == {"easy": 1.0}  # medium: no problem holds it
    assert "the curriculum never draws 3 of the 5 problems" in caplog.text
    assert "Easy: 1, any: 1, hard: 1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kimivl.rl.sampler"):
        ProblemSampler(["easy", "hard", "hard", "hard"], {0.0: {"easy": 1}})  # problems counted, not labels
        ProblemSampler(["easy", "hard"], {0.0: {"easy": 1, "hard": 0}})  # a weight of 0 draws none
    assert "the curriculum never draws 3 of the 4 problems: no phase weighs their difficulties (hard: 3;" in caplog.text
    assert "the curriculum never draws 1 of the 2 problems: no phase weighs their difficulties (hard: 1;" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kimivl.rl.sampler"):
        ProblemSampler(["easy", "Easy", "any"])  # without a curriculum every problem is drawn
        ProblemSampler(["easy", "hard"], {0.0: {"easy": 1}, 0.5: {"hard": 1}})
    assert caplog.text == ""


def test_thousands_of_difficulty_labels_are_drawn_and_named_briefly(caplog):
    """Each label's index was found by a list search per problem at each draw (40,000 labels: 9.6 s a draw), and the
    warning named every label it never draws (a line of megabytes)."""
    labels = [f"topic {i:05d}" for i in range(12)] + ["easy"] * 3 + ["hard"]
    with caplog.at_level(logging.WARNING, logger="kimivl.rl.sampler"):
        sampler = ProblemSampler(labels, {0.0: {"easy": 3, "hard": 1}})
    said = caplog.text
    assert "never draws 12 of the 16 problems" in said
    assert "(topic 00000: 1, topic 00001: 1," in said and "topic 00009: 1, 2 other difficulties; 'any'" in said
    assert sampler.probabilities(0.0).tolist() == pytest.approx([0.0] * 12 + [0.25] * 3 + [0.25])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kimivl.rl.sampler"):
        ProblemSampler(labels[2:], {0.0: {"easy": 3, "hard": 1}})
    assert "(topic 00002: 1, " in caplog.text and "topic 00011: 1; 'any'" in caplog.text  # ten named: all of them
