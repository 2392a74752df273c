"""kimivl: Kimi-VL in plain PyTorch."""

from kimivl.config import KimiVLConfig, TextConfig, VisionConfig
from kimivl.model.kimivl import KimiVL, KimiVLOutput

__all__ = ["KimiVL", "KimiVLConfig", "KimiVLOutput", "TextConfig", "VisionConfig"]
