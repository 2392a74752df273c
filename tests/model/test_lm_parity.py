"""The language model against transformers' DeepseekV3ForCausalLM with the same weights (official key names)."""

import dataclasses

import pytest
import torch
from hf_reference import hf_reference, random_lm

from kimivl.config import KimiVLConfig


def random_tiny_lm():
    cfg = KimiVLConfig.from_preset("tiny").text_config
    return cfg, random_lm(cfg)


def test_logits_match_transformers_deepseek_v3():
    cfg, lm = random_tiny_lm()
    assert cfg.n_group > 1 and cfg.first_k_dense_replace == 1
    _assert_matches_transformers(cfg, lm)


def _assert_matches_transformers(cfg, lm) -> None:
    ref = hf_reference(cfg, lm, attn_implementation="eager")
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = lm.logits(lm(lm.model.embed_tokens(ids)))
        theirs = ref(input_ids=ids).logits.float()
    assert ours.dtype == torch.float32 and ours.shape == (2, 24, cfg.vocab_size)
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize(
    "routing",
    [
        pytest.param({"n_group": 1, "topk_group": 1}, id="one-group"),  # Kimi-VL-A3B's: the tiny preset has 2 groups
        pytest.param({"n_group": 4, "topk_group": 2}, id="best-2-of-4-groups"),
        pytest.param({"norm_topk_prob": False}, id="unnormalised-weights"),
        pytest.param({"n_group": 1, "topk_group": 1, "norm_topk_prob": False}, id="one-group-unnormalised"),
    ],
)
def test_other_routings_match_transformers_deepseek_v3(routing):
    """Routings the tiny preset does not take, with its weights: each picks other experts or weighs them otherwise
    (on the same hidden states, the routers differ), and the logits still match transformers'."""
    base, tiny = random_tiny_lm()
    cfg = dataclasses.replace(base, **routing)
    lm = random_lm(cfg)
    assert torch.equal(lm.model.layers[1].mlp.gate.weight, tiny.model.layers[1].mlp.gate.weight)
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    (w, idx, _), (w0, idx0, _) = lm.model.layers[1].mlp.gate(x), tiny.model.layers[1].mlp.gate(x)
    assert not torch.equal(idx, idx0) or not torch.allclose(w, w0)
    _assert_matches_transformers(cfg, lm)


def test_selection_bias_changes_routing_but_not_weights():
    cfg, lm = random_tiny_lm()
    gate = lm.model.layers[1].mlp.gate
    x = torch.randn(64, cfg.hidden_size)
    w0, idx0, scores = gate(x)
    with torch.no_grad():
        gate.e_score_correction_bias.zero_()
        gate.e_score_correction_bias[3] = 10.0  # expert 3 always chosen, its weight still its own score
    w1, idx1, _ = gate(x)
    assert (idx1 == 3).any(-1).all()
    pos = (idx1 == 3).float().argmax(-1)
    raw = scores.gather(1, idx1)
    expect = raw / raw.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    assert torch.allclose(w1, expect, atol=1e-6)
    assert torch.allclose(
        w1.gather(1, pos[:, None]).squeeze(1), (scores[:, 3] / raw.sum(-1)) * cfg.routed_scaling_factor, atol=1e-6
    )
