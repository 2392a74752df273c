import functools
import logging

import pytest
import torch

from kimivl import KimiVL, precision
from kimivl.precision import cpu_bf16_slowdown, fast_bf16, load_dtype, use_bf16


def slow_cpu(monkeypatch, slowdown=100.0, memory=64 << 30):
    monkeypatch.setattr(precision, "cpu_bf16_slowdown", lambda: slowdown)
    monkeypatch.setattr(precision, "physical_memory", lambda: memory)


def test_the_slowdown_is_the_ratio_of_matmul_times_and_warns_when_bf16_is_emulated(monkeypatch, caplog):
    measure = cpu_bf16_slowdown.__wrapped__  # uncached, and not the suite's stand-in
    for times, slowdown, warned in (({torch.bfloat16: 0.05, torch.float32: 0.001}, 50.0, True),
                                    ({torch.bfloat16: 0.0009, torch.float32: 0.001}, 0.9, False)):
        caplog.clear()
        monkeypatch.setattr(precision, "_matmul_seconds", times.__getitem__)
        with caplog.at_level(logging.WARNING, logger="kimivl.precision"):
            assert measure() == pytest.approx(slowdown)
        assert ("multiplies bfloat16 50x slower than float32" in caplog.text) is warned


def test_the_matmul_timing_is_real_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    seconds = precision._matmul_seconds(torch.float32, n=64, repeats=2)
    assert 0 < seconds < 1 and torch.equal(torch.rand(3), expected)


def matmul_dtype(context) -> torch.dtype:
    with context:
        return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype


def test_bf16_is_used_where_it_is_fast_unless_the_caller_says(monkeypatch):
    slow_cpu(monkeypatch, slowdown=precision.SLOW)  # at the threshold: emulated
    assert not fast_bf16("cpu") and not use_bf16("cpu") and use_bf16("cpu", True)
    assert matmul_dtype(precision.autocast("cpu")) == torch.float32
    assert matmul_dtype(precision.autocast("cpu", True)) == torch.bfloat16
    slow_cpu(monkeypatch, slowdown=1.5)
    assert fast_bf16(torch.device("cpu")) and use_bf16("cpu") and not use_bf16("cpu", False)
    assert matmul_dtype(precision.autocast("cpu")) == torch.bfloat16
    assert matmul_dtype(precision.autocast("cpu", False)) == torch.float32


def test_on_a_gpu_bf16_is_fast_from_ampere_on(monkeypatch):
    for major, fast in ((7, False), (8, True), (9, True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        assert fast_bf16("cuda:0") is fast and use_bf16("cuda") is fast and use_bf16("cuda", True)


def test_a_bf16_checkpoint_loads_in_float32_on_a_cpu_that_multiplies_bf16_slowly(monkeypatch, caplog):
    n = 10**9
    slow_cpu(monkeypatch, memory=64 << 30)
    with caplog.at_level(logging.INFO, logger="kimivl.precision"):
        assert load_dtype(torch.bfloat16, "cpu", n) == torch.float32
        assert load_dtype(torch.float16, "cpu", n) == torch.float32
    assert "loading in float32 (4.0 GB" in caplog.text and "float16 is very slow" not in caplog.text
    assert load_dtype(torch.float32, "cpu", n) == torch.float32
    assert load_dtype(torch.bfloat16, "meta", n) == torch.bfloat16  # not a CPU: as stored
    slow_cpu(monkeypatch, memory=None)  # the OS does not say: float32
    assert load_dtype(torch.bfloat16, "cpu", n) == torch.float32
    # float32 weights that would not fit stay in bf16, with a warning
    slow_cpu(monkeypatch, memory=6 << 30)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kimivl.precision"):
        assert load_dtype(torch.bfloat16, "cpu", n) == torch.bfloat16
    assert "float32 weights (4.0 GB) would not fit in this machine's 6.4 GB" in caplog.text
    slow_cpu(monkeypatch, slowdown=1.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kimivl.precision"):
        assert load_dtype(torch.bfloat16, "cpu", n) == torch.bfloat16
        assert load_dtype(torch.float16, "cpu", n) == torch.bfloat16
    assert caplog.text.count("float16 is very slow on CPU") == 1


def test_asking_for_bf16_on_a_cpu_that_emulates_it_warns_once(tiny_model, tmp_path, monkeypatch, caplog):
    tiny_model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    monkeypatch.setattr(precision, "cpu_bf16_slowdown", functools.cache(cpu_bf16_slowdown.__wrapped__))
    monkeypatch.setattr(precision, "_matmul_seconds", {torch.bfloat16: 0.06, torch.float32: 0.001}.__getitem__)
    with caplog.at_level(logging.WARNING, logger="kimivl.precision"):
        for _ in range(2):
            assert KimiVL.from_pretrained(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16
        assert KimiVL.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32
    assert caplog.text.count("this CPU multiplies bfloat16 60x slower than float32") == 1


def test_from_pretrained_follows_the_choice_and_an_explicit_dtype_wins(tiny_model, tmp_path, monkeypatch):
    tiny_model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    slow_cpu(monkeypatch)
    loaded = KimiVL.from_pretrained(tmp_path)
    assert loaded.dtype == torch.float32
    bf16 = KimiVL.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    # exactly the checkpoint's values: every bf16 value is a float32 value
    for (name, a), b in zip(loaded.state_dict().items(), bf16.state_dict().values()):
        assert torch.equal(a, b.float()), name
    slow_cpu(monkeypatch, slowdown=1.0)
    assert KimiVL.from_pretrained(tmp_path).dtype == torch.bfloat16
