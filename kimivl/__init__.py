"""kimivl: Kimi-VL in plain PyTorch."""

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
