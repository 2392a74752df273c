"""A checkpoint's recommended sampling: Hugging Face's ``generation_config.json``.

Of its keys, ``temperature``, ``top_p`` and ``max_new_tokens`` are read, and ``do_sample: false`` means greedy
decoding (temperature 0), as in Hugging Face's ``generate``; the others (token ids, ``top_k``, ...) are ignored.
The shipped models hold one: ``kimivl-tiny`` temperature 0.2 (the spec's for Instruct), ``kimivl-tiny-thinking``
temperature 0.8 with 1024 new tokens (the spec's Thinking range, and a quarter of its 4K context as 32K is of 128K).
``kimivl chat`` and the chat page of ``kimivl serve`` start from ``recommended_sampling``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kimivl.data.formats import parse_json
from kimivl.files import write_text_atomic
from kimivl.inference.sampling import SamplingError, SamplingParams

FILE = "generation_config.json"
KEYS = ("temperature", "top_p", "max_new_tokens")
# the settings where the file says nothing, or there is none (spec section 9: Instruct's temperature)
FALLBACK = {"max_new_tokens": 512, "temperature": 0.2, "top_p": 1.0}


def generation_defaults(checkpoint: str | os.PathLike) -> dict:
    """The sampling settings that ``checkpoint``'s ``generation_config.json`` recommends (a subset of ``KEYS``), or
    ``{}`` without one. A file that is not a JSON object, or a value of the wrong type or range, is an error naming
    the file."""
    file = Path(checkpoint) / FILE
    if not file.is_file():
        return {}
    config = parse_json(file.read_bytes(), str(file), "the file")
    if not isinstance(config, dict):
        raise SamplingError(f"{file}: must be a JSON object of generation settings, got {type(config).__name__}")
    return checked_settings(config, str(file))


def recommended_sampling(checkpoint: str | os.PathLike) -> dict:
    """Every one of ``KEYS``: what ``checkpoint``'s ``generation_config.json`` recommends, else ``FALLBACK``'s."""
    return {**FALLBACK, **generation_defaults(checkpoint)}


def checked_settings(config: dict, where: str) -> dict:
    """``config``'s settings among ``KEYS`` (``do_sample: false`` as temperature 0), or a ``SamplingError`` naming
    ``where`` for a value of the wrong type or range."""
    found = {k: config[k] for k in KEYS if config.get(k) is not None}
    do_sample = config.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise SamplingError(f"{where}: do_sample must be true or false, got {do_sample!r}")
    if do_sample is False:
        found["temperature"] = 0.0
    try:
        SamplingParams.from_kwargs(**found)
    except SamplingError as e:
        raise SamplingError(f"{where}: {e}") from None
    return found


def write_generation_config(directory: str | os.PathLike, settings: dict) -> None:
    """``settings`` (checked ones, ``temperature`` among them) as ``directory``'s ``generation_config.json``, with the
    ``do_sample`` that makes Hugging Face's ``generate`` decode as kimivl does: sampling above temperature 0, greedy
    at 0 (then no temperature, which transformers warns about beside ``do_sample: false``)."""
    config = dict(settings)
    greedy = config["temperature"] == 0
    if greedy:
        del config["temperature"]
    write_text_atomic(Path(directory) / FILE, json.dumps({"do_sample": not greedy, **config}, indent=2) + "\n")
