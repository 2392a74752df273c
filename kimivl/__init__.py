"""kimivl: Kimi-VL in plain PyTorch. The public names are imported from their modules when first used, so
``import kimivl`` (and the command line's ``--help``) does not wait for torch."""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and editors
    from kimivl.config import KimiVLConfig, TextConfig, VisionConfig
    from kimivl.inference.chat import generate, stream_generate
    from kimivl.model.kimivl import KimiVL, KimiVLOutput
    from kimivl.processing.processor import KimiVLProcessor

__all__ = [
    "KimiVL",
    "KimiVLConfig",
    "KimiVLOutput",
    "KimiVLProcessor",
    "TextConfig",
    "VisionConfig",
    "generate",
    "stream_generate",
]
_HOMES = {
    "KimiVL": "kimivl.model.kimivl",
    "KimiVLConfig": "kimivl.config",
    "KimiVLOutput": "kimivl.model.kimivl",
    "KimiVLProcessor": "kimivl.processing.processor",
    "TextConfig": "kimivl.config",
    "VisionConfig": "kimivl.config",
    "generate": "kimivl.inference.chat",
    "stream_generate": "kimivl.inference.chat",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'kimivl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
