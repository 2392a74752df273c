import pytest
import torch

from kimivl import KimiVL, KimiVLConfig


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
