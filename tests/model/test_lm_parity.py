"""The language model against transformers' DeepseekV3ForCausalLM with the same weights (official key names)."""

import torch
from hf_reference import hf_reference, random_lm

from kimivl.config import KimiVLConfig


def random_tiny_lm():
    cfg = KimiVLConfig.from_preset("tiny").text_config
    return cfg, random_lm(cfg)


def test_logits_match_transformers_deepseek_v3():
    cfg, lm = random_tiny_lm()
    assert cfg.n_group > 1 and cfg.first_k_dense_replace == 1
    ref = hf_reference(cfg, lm, attn_implementation="eager")
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ours = lm.logits(lm(lm.model.embed_tokens(ids)))
        theirs = ref(input_ids=ids).logits.float()
    assert ours.dtype == torch.float32 and ours.shape == (2, 24, cfg.vocab_size)
    assert (ours - theirs).abs().max() < 1e-5


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
