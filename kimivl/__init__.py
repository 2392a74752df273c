"""kimivl: Kimi-VL in plain PyTorch."""

from kimivl.config import KimiVLConfig, TextConfig, VisionConfig

__all__ = ["KimiVLConfig", "TextConfig", "VisionConfig"]
