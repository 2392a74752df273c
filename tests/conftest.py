import ctypes
import dataclasses
import os
import resource
import signal
import subprocess
import sys
import threading

import pytest
import torch

from kimivl import KimiVL, KimiVLConfig, KimiVLProcessor, precision
from kimivl.processing.tokenizer import train_bpe

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "What colour is the square? It is red.",
    "Count the circles: there are 3 circles and 2 squares.",
    "你好，世界",
] * 5


@pytest.fixture()
def file_size_limit():
    """``limit(n)``: files this process writes may grow to ``n`` bytes (``RLIMIT_FSIZE``), so that a longer write fails
    in the libraries' own code as on a full disk, with the errno EFBIG instead of ENOSPC; ``limit(None)`` lifts it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process

    def limit(n):
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft if n is None else n, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


@pytest.fixture()
def unprivileged():
    """``run(fn)``: ``fn()`` in a thread of its own for which file permissions hold, as for any user (as root, the
    thread drops every capability, which Linux keeps per thread: root's override of permissions goes, and
    ``os.access`` answers for the modes too); returns what it returns, or raises what it raises."""

    def run(fn):
        outcome = {}

        def call():
            try:
                if os.geteuid() == 0:
                    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
                    if ctypes.CDLL(None, use_errno=True).capset(header, (ctypes.c_uint32 * 6)()) != 0:
                        raise OSError(ctypes.get_errno(), "capset: the capabilities could not be dropped")
                outcome["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
                outcome["error"] = e

        thread = threading.Thread(target=call)
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    return run


@pytest.fixture()
def ascii_filesystem():
    """``run(imports, call, error, arg)``: ``call`` (a Python expression of ``sys.argv[1]``, which is ``arg``) in a
    Python under LANG=C without UTF-8 mode, whose filesystem encoding is ASCII; returns that encoding, the lines of
    ``ascii(str(e))`` for the ``error`` it raised, and its stderr. Skips where that encoding is UTF-8 (macOS, or a
    locale coerced to UTF-8)."""

    def run(imports: str, call: str, error: str, arg: str) -> tuple[str, list[str], str]:
        code = (
            f"import sys\n{imports}\nprint(sys.getfilesystemencoding())\n"
            f"try:\n    {call}\nexcept {error} as e:\n    print(ascii(str(e)))"
        )
        env = {**os.environ, "LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0"}
        done = subprocess.run([sys.executable, "-c", code, arg], env=env, capture_output=True, text=True)
        encoding, *said = done.stdout.splitlines()
        if encoding == "utf-8":
            pytest.skip("the C locale's filesystem encoding is UTF-8 here (macOS, or a locale coerced to UTF-8)")
        return encoding, said, done.stderr

    return run


@pytest.fixture(autouse=True)
def bf16_is_fast(monkeypatch):
    """Every test takes the bf16 paths, whatever this CPU multiplies fast; tests of that choice set it themselves."""
    monkeypatch.setattr(precision, "cpu_flags_known", lambda: False)
    monkeypatch.setattr(precision, "cpu_bf16_slowdown", lambda: 1.0)


@pytest.fixture(scope="session")
def tiny_config() -> KimiVLConfig:
    return KimiVLConfig.from_preset("tiny")


@pytest.fixture()
def tiny_model(tiny_config) -> KimiVL:
    torch.manual_seed(0)
    model = KimiVL(tiny_config).eval()
    with torch.no_grad():  # a non-zero selection bias so routing state is part of every check
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.fixture(scope="session")
def small_processor() -> KimiVLProcessor:
    """A processor whose BPE (300 ranks) was trained on a few sentences."""
    return KimiVLProcessor(train_bpe(CORPUS, vocab_size=300))


@pytest.fixture(scope="session")
def small_model(small_processor) -> KimiVL:
    """The tiny model resized to ``small_processor``'s vocabulary."""
    base = KimiVLConfig.from_preset("tiny")
    n = small_processor.tokenizer.n_ranks
    text = dataclasses.replace(base.text_config, vocab_size=n + 256, bos_token_id=n, eos_token_id=[n + 1, n + 2])
    torch.manual_seed(0)
    return KimiVL(dataclasses.replace(base, text_config=text, media_placeholder_token_id=n + 21)).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, small_model, small_processor):
    """``small_model`` and ``small_processor`` saved as an official-format checkpoint directory."""
    path = tmp_path_factory.mktemp("ckpt")
    small_model.save_pretrained(path)
    small_processor.save_pretrained(path)
    return path
