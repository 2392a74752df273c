"""Fresh weights: each tensor (and each routed expert) from its own seeded generator, so any part of a model can be
drawn alone and equals the whole model's."""

import pytest
import torch
from torch import nn

from kimivl.model.init import init_weights, initial_rows
from kimivl.model.kimivl import KimiVL
from kimivl.model.moe import GroupedExperts


def fresh(config, seed: int) -> KimiVL:
    with torch.device("meta"):
        model = KimiVL(config)
    model.to_empty(device="cpu").init_weights(seed)
    return model


def test_fresh_weights_follow_the_rules_and_the_seed(tiny_config):
    a, b, c = fresh(tiny_config, 1), fresh(tiny_config, 1), fresh(tiny_config, 2)
    std = tiny_config.text_config.initializer_range
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y), name
        if name.endswith(("norm.weight", "norm0.weight", "norm1.weight", "layernorm.weight")):
            assert torch.equal(x, torch.ones_like(x)), name
        elif name.endswith(("bias", "e_score_correction_bias")):
            assert torch.equal(x, torch.zeros_like(x)), name
        elif x.numel() >= 1000:
            assert float(x.std()) == pytest.approx(std, rel=0.1) and abs(float(x.mean())) < std / 5, name
            assert not torch.equal(x, z), name  # another seed draws other values
    # the same values whatever the order of initialisation and whatever the global RNG did before
    torch.manual_seed(123)
    d = fresh(tiny_config, 1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), d.state_dict().values()))


def test_rows_and_experts_drawn_alone_equal_the_whole_model_s(tiny_config):
    """What a sharded rank draws (``initial_rows``): rows of a matrix, experts of a stack by global id."""
    whole, std = fresh(tiny_config, 3), tiny_config.text_config.initializer_range
    modules = dict(whole.named_modules())
    name = next(n for n, m in modules.items() if isinstance(m, GroupedExperts))
    stack = modules[name]
    for attr in ("gate_up_proj", "down_proj"):
        full = getattr(stack, attr)
        part = initial_rows(stack, attr, f"{name}.{attr}", full.shape, 3, std, first=4, count=2)
        torch.testing.assert_close(part, full[4:6].detach(), rtol=0, atol=0)
    head = whole.language_model.lm_head
    rows = initial_rows(head, "weight", "language_model.lm_head.weight", head.weight.shape, 3, std, first=5, count=7)
    torch.testing.assert_close(rows, head.weight[5:12].detach(), rtol=0, atol=0)


def test_a_tensor_without_a_rule_is_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    with pytest.raises(ValueError, match=r"no initialisation rule for Odd.scale"):
        init_weights(Odd(), 0, 0.02)
