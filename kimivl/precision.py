"""Whether a device multiplies bfloat16 fast, and the dtypes kimivl computes and loads in there.

GPUs and CPUs with native bf16 matmul (Ampere and later, AMX, AVX512-BF16) multiply bfloat16 as fast as float32 or
faster. CPUs without it emulate it: AVX-512 ones 2-5x slower than float32, AVX2-only ones (many laptops' chips) about
100x. On x86 the instructions decide (a timing near the line once chose either from run to run); elsewhere (ARM) a
matmul timing does. Where bf16 is slow kimivl trains without bf16 autocast, and its command line and demo load bf16
checkpoints in float32 (exactly: every bf16 value is a float32 value), unless told otherwise;
``KimiVL.from_pretrained`` itself keeps the stored dtype.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time

import torch

from kimivl.checkpoint import check_dtype
from kimivl.config import KimiVLConfig
from kimivl.model.params import parameter_counts

log = logging.getLogger(__name__)

SLOW = 4.0  # bf16 matmuls this many times slower than float32 are emulated ones
FIT = 0.6  # float32 weights are chosen only while they take at most this share of physical memory
ROUNDS = 3  # alternated timings of bf16 and float32 at most
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1
NATIVE_BF16_CHECKS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's feature checks


def _matmul_seconds(dtype: torch.dtype, n: int = 256, repeats: int = 3) -> float:
    """The best of ``repeats`` timings of an (n, n) @ (n, n) matmul on the CPU (the global RNG is left alone, so a
    run draws the same numbers whether or not it measured)."""
    a, b = torch.rand(2, n, n, generator=torch.Generator().manual_seed(0)).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def cpu_native_bf16() -> bool:
    """Whether this CPU has the bf16 instructions oneDNN multiplies with (x86 AVX512-BF16 or AMX tiles)."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in NATIVE_BF16_CHECKS)


def cpu_flags_known() -> bool:
    """Whether torch reads this CPU's bf16 instructions (x86, from CPUID); elsewhere only a timing tells."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@functools.cache
def _warn_emulated() -> None:
    log.warning(
        "this CPU lacks bf16 instructions (AVX512-BF16, AMX), so bfloat16 matmuls are emulated, several times slower "
        "than float32: kimivl's training, command line and demo compute in float32 here unless asked for bf16 "
        "(in Python: KimiVL.from_pretrained(path, dtype=torch.float32))"
    )


@functools.cache
def cpu_bf16_slowdown() -> float:
    """How many times longer a bf16 matmul takes than a float32 one on this CPU (measured once per process: a few
    milliseconds, about a second where bf16 is emulated). The two are timed in alternation, up to ``ROUNDS`` times
    while bf16 looks slow, and the best of each kept: a busy moment slows some timings, not all of them."""
    bf16 = f32 = float("inf")
    for _ in range(ROUNDS):
        bf16, f32 = min(bf16, _matmul_seconds(torch.bfloat16)), min(f32, _matmul_seconds(torch.float32))
        if bf16 / f32 < SLOW:
            break
    slowdown = bf16 / f32
    if slowdown >= SLOW:
        log.warning(
            "this CPU multiplies bfloat16 %.0fx slower than float32 (it lacks native bf16 instructions): "
            "kimivl's training, command line and demo compute in float32 here unless asked for bf16 "
            "(in Python: KimiVL.from_pretrained(path, dtype=torch.float32))",
            slowdown,
        )
    return slowdown


def fast_bf16(device: str | torch.device) -> bool:
    """Whether bf16 matmuls on ``device`` run at least about as fast as float32 ones: natively on NVIDIA GPUs from
    Ampere on (compute capability 8) and on AMD GPUs; on a CPU, where it has the instructions (on x86 nowhere else,
    with a warning once), elsewhere as measured."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        if cpu_native_bf16():
            return True
        if cpu_flags_known():
            _warn_emulated()
            return False
        return cpu_bf16_slowdown() < SLOW
    return True


def use_bf16(device: str | torch.device, bf16: bool | None = None) -> bool:
    """Whether training autocasts to bf16 on ``device``: ``bf16`` when given, else where bf16 is fast."""
    return fast_bf16(device) if bf16 is None else bf16


def autocast(device: str | torch.device, bf16: bool | None = None) -> torch.autocast:
    """bf16 autocast on ``device`` when ``use_bf16(device, bf16)``; a disabled one (float32) otherwise."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(device, bf16))


def physical_memory() -> int | None:
    """Bytes of RAM this process may use: the machine's, or less where a cgroup (a container, a Slurm job) caps it;
    None where the OS does not say."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        memory = None
    for file in CGROUP_LIMITS:
        try:
            with open(file) as f:
                limit = int(f.read().strip())  # "max" (v2, no limit) is not a number
        except (OSError, ValueError):
            continue
        memory = limit if memory is None else min(memory, limit)
    return memory


def stored_dtype(config: KimiVLConfig) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in: its config's ``text_config.torch_dtype``, which
    ``KimiVLConfig.from_dict`` takes from the top level's ``torch_dtype`` or ``dtype`` where text_config names none
    (bfloat16 where no field names one)."""
    return getattr(torch, config.text_config.torch_dtype)


def held_dtype(stored: torch.dtype, device: str | torch.device, requested: torch.dtype | None = None) -> torch.dtype:
    """The dtype ``KimiVL.from_pretrained`` holds a checkpoint stored in ``stored`` in on ``device``: ``requested``
    when the caller names one, else ``stored``, except that on a CPU float16 becomes bfloat16 (float16 is very slow
    there). bf16 on a CPU that emulates it gets the slowdown's warning."""
    device = torch.device(device)
    if requested is not None:
        check_dtype(requested)
    dtype = requested
    if dtype is None and device.type == "cpu" and stored == torch.float16:
        log.warning(
            "float16 is very slow on CPU; loading in bfloat16 instead, which rounds the weights (3 fewer mantissa "
            "bits); pass dtype=torch.float32 to hold them exactly"
        )
        dtype = torch.bfloat16
    dtype = stored if dtype is None else dtype
    if dtype == torch.bfloat16 and device.type == "cpu":
        fast_bf16(device)  # measured once: warns where bf16 is emulated
    return dtype


def load_dtype(
    stored: torch.dtype, device: str | torch.device, n_params: int, requested: torch.dtype | None = None
) -> torch.dtype:
    """The dtype kimivl's command line and demo hold a checkpoint stored in ``stored`` in on ``device``: float32 for a
    bfloat16 or float16 checkpoint on a CPU where bf16 is slow, while ``n_params`` float32 weights take at most
    ``FIT`` of the machine's memory; else ``held_dtype`` (``requested`` when the caller names one)."""
    device = torch.device(device)
    if (
        requested is None
        and device.type == "cpu"
        and stored in (torch.float16, torch.bfloat16)
        and not fast_bf16(device)
    ):
        need, memory = 4 * n_params, physical_memory()
        if memory is not None and need > FIT * memory:
            log.warning(
                "float32 weights (%.1f GB) would not fit in the %.1f GB of memory here: loading in bfloat16, "
                "which this CPU multiplies slowly",
                need / 1e9,
                memory / 1e9,
            )
            return torch.bfloat16
        log.info(
            "loading in float32 (%.1f GB; this CPU multiplies bf16 slowly; dtype=torch.bfloat16 takes half the memory)",
            need / 1e9,
        )
        return torch.float32
    return held_dtype(stored, device, requested)


def checkpoint_load_dtype(
    path: str | os.PathLike, device: str | torch.device, requested: torch.dtype | None = None
) -> torch.dtype:
    """``load_dtype`` for the checkpoint directory ``path`` (from its config: nothing is loaded): what the command line
    and the demo pass to ``KimiVL.from_pretrained``."""
    config = KimiVLConfig.from_pretrained(path)
    return load_dtype(stored_dtype(config), device, parameter_counts(config)["total"].total, requested)
