import functools
import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file

from kimivl import KimiVL, precision
from kimivl.precision import cpu_bf16_slowdown, cpu_flags_known, fast_bf16, load_dtype, use_bf16


def slow_cpu(monkeypatch, slowdown=100.0, memory=64 << 30):
    monkeypatch.setattr(precision, "cpu_bf16_slowdown", lambda: slowdown)
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "physical_memory", lambda: memory)


def test_the_slowdown_is_the_ratio_of_matmul_times_and_warns_when_bf16_is_emulated(monkeypatch, caplog):
    measure = cpu_bf16_slowdown.__wrapped__  # uncached, and not the suite's stand-in
    for times, slowdown, warned in (
        ({torch.bfloat16: 0.05, torch.float32: 0.001}, 50.0, True),
        ({torch.bfloat16: 0.0009, torch.float32: 0.001}, 0.9, False),
    ):
        caplog.clear()
        monkeypatch.setattr(precision, "_matmul_seconds", times.__getitem__)
        with caplog.at_level(logging.WARNING, logger="kimivl.precision"):
            assert measure() == pytest.approx(slowdown)
        assert ("multiplies bfloat16 50x slower than float32" in caplog.text) is warned


def test_a_busy_moment_does_not_make_native_bf16_look_emulated(monkeypatch):
    """Timings alternate and the best of each counts: one slowed bf16 timing is outvoted in the next round;
    emulation (every bf16 timing slow) is still found, after ROUNDS rounds."""
    measure = cpu_bf16_slowdown.__wrapped__
    cases = (([0.05, 0.0008, 0.0009], 0.8, 2), ([0.0015] * 3, 1.5, 1), ([0.05, 0.06, 0.05], 50.0, 3))
    for bf16_times, slowdown, rounds in cases:  # 1.5x slower (ARM without bf16 matmul): fast enough, timed once
        calls = []
        times = {torch.bfloat16: iter(bf16_times), torch.float32: iter([0.001] * 3)}
        monkeypatch.setattr(precision, "_matmul_seconds", lambda dtype: calls.append(dtype) or next(times[dtype]))
        assert measure() == pytest.approx(slowdown)
        assert calls == [torch.bfloat16, torch.float32] * rounds


def test_a_cpu_with_bf16_instructions_is_fast_without_timing(monkeypatch):
    native = precision.cpu_native_bf16
    for avx512_bf16, amx, expected in ((True, False, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert native() is expected
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "cpu_bf16_slowdown", lambda: pytest.fail("timed although native"))
    assert fast_bf16("cpu")


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
    assert fast_bf16("mps") and fast_bf16("xpu") and use_bf16("meta")  # other accelerators: bf16 is theirs


def test_a_bf16_checkpoint_loads_in_float32_on_a_cpu_that_multiplies_bf16_slowly(monkeypatch, caplog):
    n = 10**9
    slow_cpu(monkeypatch, memory=64 << 30)
    with caplog.at_level(logging.INFO, logger="kimivl.precision"):
        assert load_dtype(torch.bfloat16, "cpu", n) == torch.float32
        assert load_dtype(torch.float16, "cpu", n) == torch.float32
    assert "loading in float32 (4.0 GB" in caplog.text and "float16 is very slow" not in caplog.text
    assert load_dtype(torch.float32, "cpu", n) == torch.float32
    assert load_dtype(torch.bfloat16, "meta", n) == torch.bfloat16  # not a CPU: as stored
    assert load_dtype(torch.float16, "cuda", n) == torch.float16  # float16 is slow on a CPU only
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        load_dtype(torch.bfloat16, "cpu", n, torch.int8)
    slow_cpu(monkeypatch, memory=None)  # the OS does not say: float32
    assert load_dtype(torch.bfloat16, "cpu", n) == torch.float32
    # float32 weights that would not fit stay in bf16, with a warning
    slow_cpu(monkeypatch, memory=6 << 30)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kimivl.precision"):
        assert load_dtype(torch.bfloat16, "cpu", n) == torch.bfloat16
    assert "float32 weights (4.0 GB) would not fit in the 6.4 GB of memory here" in caplog.text
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
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="kimivl.precision"):
        assert KimiVL.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32
        assert caplog.text == ""  # float32 asked for: bf16 is not measured
        for _ in range(2):
            assert KimiVL.from_pretrained(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16
            assert caplog.text.count("this CPU multiplies bfloat16 60x slower than float32") == 1
        assert KimiVL.from_pretrained(tmp_path).dtype == torch.bfloat16  # as stored
    assert caplog.text.count("this CPU multiplies bfloat16 60x slower than float32") == 1


def router(model):
    gate = model.language_model.model.layers[1].mlp.gate
    return gate.weight, gate.e_score_correction_bias


def test_from_pretrained_keeps_the_stored_dtype_whatever_the_cpu(tiny_model, tmp_path, monkeypatch, caplog):
    """A bf16 checkpoint loads in bf16 even where bf16 is slow (routers in float32, with the stored values); a float16
    one loads in bf16 on CPU; an explicit dtype wins."""
    tiny_model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    on_disk = load_file(tmp_path / "model.safetensors")
    slow_cpu(monkeypatch)
    loaded = KimiVL.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    weight, bias = router(loaded)
    assert weight.dtype == bias.dtype == torch.float32
    prefix = "language_model.model.layers.1.mlp.gate."
    assert torch.equal(weight, on_disk[prefix + "weight"].float())
    assert torch.equal(bias, on_disk[prefix + "e_score_correction_bias"].float())
    assert KimiVL.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["torch_dtype"] = "float16"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="kimivl.precision"):
        assert KimiVL.from_pretrained(tmp_path).dtype == torch.bfloat16
    assert "float16 is very slow on CPU; loading in bfloat16 instead, which rounds the weights" in caplog.text


def test_the_command_line_and_the_demo_load_in_float32_where_bf16_is_slow(
    small_model, small_processor, tmp_path, monkeypatch
):
    """``kimivl chat``/``eval`` (``_load``) and the demo choose float32 for a bf16 checkpoint on a CPU that multiplies
    bf16 slowly (exactly its values), bf16 where bf16 is fast, and what ``--dtype`` names."""
    from kimivl.cli import _load
    from kimivl.data.subset import copy_subset
    from kimivl.demo import DEFAULT_EXAMPLES, run_demo

    small_model.save_pretrained(tmp_path, dtype=torch.bfloat16)  # with its own tokenizer: _load checks the pair
    small_processor.save_pretrained(tmp_path)
    slow_cpu(monkeypatch)
    assert precision.checkpoint_load_dtype(tmp_path, "cpu") == torch.float32
    fp32, _ = _load(str(tmp_path), None, "cpu")
    bf16, _ = _load(str(tmp_path), "bfloat16", "cpu")
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    for (name, a), b in zip(fp32.state_dict().items(), bf16.state_dict().values()):
        assert torch.equal(a, b.float()), name  # every bf16 value is a float32 value
    assert all(t.dtype == torch.float32 for t in router(bf16))
    demo_model = tmp_path / "demo"
    small_model.save_pretrained(demo_model, dtype=torch.bfloat16)
    small_processor.save_pretrained(demo_model)
    copy_subset(DEFAULT_EXAMPLES, tmp_path / "ex", per_task=1)
    loaded = []
    real = KimiVL.from_pretrained.__func__
    monkeypatch.setattr(
        KimiVL, "from_pretrained", classmethod(lambda cls, *a, **k: loaded.append(real(cls, *a, **k)) or loaded[-1])
    )
    run_demo(demo_model, tmp_path / "ex", max_new_tokens=1, progress=False)
    assert [m.dtype for m in loaded] == [torch.float32]
    slow_cpu(monkeypatch, slowdown=1.0)
    run_demo(demo_model, tmp_path / "ex", max_new_tokens=1, progress=False)
    assert _load(str(tmp_path), None, "cpu")[0].dtype == torch.bfloat16
    assert [m.dtype for m in loaded] == [torch.float32, torch.bfloat16, torch.bfloat16]


def test_on_x86_the_instructions_decide_without_timing_and_warn_once(monkeypatch, caplog):
    """An x86 CPU without AVX512-BF16 or AMX emulates bf16 (2-5x slower with AVX-512, about 100x with AVX2): float32,
    whatever a timing would say (near the threshold one chose either, run to run); elsewhere a timing decides."""
    monkeypatch.setattr(precision, "cpu_flags_known", lambda: True)
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "cpu_bf16_slowdown", lambda: pytest.fail("timed on x86"))
    monkeypatch.setattr(precision, "_warn_emulated", functools.cache(precision._warn_emulated.__wrapped__))
    with caplog.at_level(logging.WARNING, logger="kimivl.precision"):
        assert not fast_bf16("cpu") and not fast_bf16("cpu") and not use_bf16("cpu")
    assert caplog.text.count("this CPU lacks bf16 instructions (AVX512-BF16, AMX)") == 1
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: True)
    assert fast_bf16("cpu")
    monkeypatch.setattr(precision, "cpu_flags_known", lambda: False)  # ARM: measured
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: False)
    for slowdown, fast in ((1.5, True), (precision.SLOW, False)):
        monkeypatch.setattr(precision, "cpu_bf16_slowdown", lambda s=slowdown: s)
        assert fast_bf16("cpu") is fast


def test_x86_is_known_by_its_names_on_linux_and_windows(monkeypatch):
    """The suite stands in for ``cpu_flags_known`` (conftest); the module's own is imported before it does."""
    for machine, known in (("x86_64", True), ("AMD64", True), ("i686", True), ("aarch64", False), ("arm64", False)):
        monkeypatch.setattr(precision.platform, "machine", lambda m=machine: m)
        assert cpu_flags_known() is known, machine


def test_memory_is_capped_by_a_cgroup_limit(monkeypatch, tmp_path):
    """In a container or a Slurm job the cgroup's limit, not the host's RAM, bounds float32 weights."""
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    monkeypatch.setattr(precision, "CGROUP_LIMITS", (str(v2), str(v1)))
    monkeypatch.setattr(os, "sysconf", {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 16 << 20}.__getitem__)  # 64 GiB
    assert precision.physical_memory() == 64 << 30  # neither file
    v2.write_text("max\n")  # v2 without a limit
    assert precision.physical_memory() == 64 << 30
    v1.write_text(f"{8 << 30}\n")
    assert precision.physical_memory() == 8 << 30
    v2.write_text(f"{4 << 30}\n")
    assert precision.physical_memory() == 4 << 30
    slow_cpu(monkeypatch, memory=None)
    monkeypatch.setattr(precision, "physical_memory", lambda: 4 << 30)
    assert load_dtype(torch.bfloat16, "cpu", 10**9) == torch.bfloat16  # 4 GB of float32 do not fit in 60% of 4 GiB
