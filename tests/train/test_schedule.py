import math

import pytest
import torch

from kimivl.train.schedule import WSD, WarmupCosine, scheduler_at


def test_warmup_cosine_key_steps():
    s = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(4) == pytest.approx(0.5) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert s(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s(110) == pytest.approx(0.1) and s(10_000) == pytest.approx(0.1)


def test_wsd_key_steps():
    s = WSD(warmup_steps=4, stable_steps=10, decay_steps=20, min_ratio=0.0)
    assert [s(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert s(4) == s(13) == 1.0
    assert s(14) == pytest.approx(1.0) and s(24) == pytest.approx(0.5) and s(34) == pytest.approx(0.0)
    assert s(99) == pytest.approx(0.0)
    assert WSD(0, 0, 4, shape="cosine")(2) == pytest.approx(0.5)
    assert WSD(0, 0, 4, shape="sqrt", min_ratio=0.2)(1) == pytest.approx(0.2 + 0.8 * 0.5)


def test_wsd_without_decay_steps_drops_to_min_ratio_after_the_stable_phase():
    s = WSD(warmup_steps=2, stable_steps=3, decay_steps=0, min_ratio=0.25)
    assert [s(i) for i in range(7)] == [0.5, 1.0, 1.0, 1.0, 1.0, 0.25, 0.25]


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="decay_steps"):
        WarmupCosine(warmup_steps=10, total_steps=5)
    with pytest.raises(ValueError, match="shape"):
        WSD(1, 1, 1, shape="step")


def lrs_over(opt, sched, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_resuming_equals_an_uninterrupted_run():
    schedule = WarmupCosine(warmup_steps=3, total_steps=12, min_ratio=0.0)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    full = lrs_over(opt, scheduler_at(opt, schedule), 12)
    assert full == pytest.approx([2.0 * schedule(i) for i in range(12)])

    first = torch.optim.SGD([p], lr=2.0)
    sched = scheduler_at(first, schedule)
    lrs_over(first, sched, 5)
    saved_opt, saved_sched = first.state_dict(), sched.state_dict()

    later_stage = torch.optim.SGD([p], lr=2.0)  # new optimizer, the schedule continues at step 5
    assert lrs_over(later_stage, scheduler_at(later_stage, schedule, step=5), 7) == pytest.approx(full[5:])

    resumed = torch.optim.SGD([p], lr=2.0)  # same run, restored from its state dicts
    resumed_sched = scheduler_at(resumed, schedule)
    resumed.load_state_dict(saved_opt)
    resumed_sched.load_state_dict(saved_sched)
    assert lrs_over(resumed, resumed_sched, 7) == pytest.approx(full[5:])


def test_a_stage_on_the_recipe_wide_curve_reads_it_from_its_offset_and_records_it(tmp_path):
    """The scheduler's state_dict holds the multiplier's fields (a lambda's would be None), loadable as plain data."""
    from kimivl.train.schedule import WSDFrom

    curve, stage = WSD(4, 10, 20, min_ratio=0.1), WSDFrom(4, 10, 20, min_ratio=0.1, offset=12)
    assert [stage(i) for i in range(30)] == [curve(12 + i) for i in range(30)]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    torch.save(scheduler_at(opt, stage).state_dict(), tmp_path / "s.pt")
    recorded = torch.load(tmp_path / "s.pt", weights_only=True)["lr_lambdas"]
    assert recorded == [
        {"warmup_steps": 4, "stable_steps": 10, "decay_steps": 20, "min_ratio": 0.1, "shape": "linear", "offset": 12}
    ]
    with pytest.raises(ValueError, match="offset must be >= 0"):
        WSDFrom(1, 1, 1, offset=-1)
