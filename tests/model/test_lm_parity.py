"""The language model against transformers' DeepseekV3ForCausalLM with the same weights (official key names)."""

import dataclasses

import pytest
import torch

from kimivl.config import KimiVLConfig
from kimivl.model.language_model import LanguageModel

transformers = pytest.importorskip("transformers")


def hf_reference(cfg, state):
    """A DeepseekV3ForCausalLM with our (official-name) weights, fused into its expert layout."""
    hf_cfg = transformers.DeepseekV3Config(
        **{k: v for k, v in dataclasses.asdict(cfg).items()
           if k not in ("extra", "rope_theta", "rope_scaling", "torch_dtype", "model_type", "topk_method",
                        "scoring_func", "moe_layer_freq", "aux_loss_alpha", "seq_aux", "eos_token_id")},
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, rope_interleave=True,
        attn_implementation="eager")
    ref = transformers.DeepseekV3ForCausalLM(hf_cfg).float().eval()
    mapped = {}
    for k, v in state.items():
        if ".experts." in k and not k.endswith("gate_up_proj"):
            continue
        mapped[k] = v
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts."
        if p + "0.gate_proj.weight" not in state:
            continue
        e = range(cfg.n_routed_experts)
        mapped[p + "gate_up_proj"] = torch.stack(
            [torch.cat([state[f"{p}{i}.gate_proj.weight"], state[f"{p}{i}.up_proj.weight"]]) for i in e])
        mapped[p + "down_proj"] = torch.stack([state[f"{p}{i}.down_proj.weight"] for i in e])
    missing, unexpected = ref.load_state_dict(mapped, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return ref


def random_lm(seed=0):
    cfg = KimiVLConfig.from_preset("tiny").text_config
    torch.manual_seed(seed)
    lm = LanguageModel(cfg).float().eval()
    with torch.no_grad():
        for name, p in lm.named_parameters():
            p.normal_(0, 0.02 if p.dim() > 1 else 0.1).add_(1.0 if "norm" in name else 0.0)
        for layer in lm.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return cfg, lm


def test_logits_match_transformers_deepseek_v3():
    cfg, lm = random_lm()
    assert cfg.n_group > 1 and cfg.first_k_dense_replace == 1
    ref = hf_reference(cfg, lm.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ours = lm.logits(lm(lm.model.embed_tokens(ids)))
        theirs = ref(input_ids=ids).logits.float()
    assert ours.dtype == torch.float32 and ours.shape == (2, 24, cfg.vocab_size)
    assert (ours - theirs).abs().max() < 1e-5


def test_selection_bias_changes_routing_but_not_weights():
    cfg, lm = random_lm()
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
    assert torch.allclose(w1.gather(1, pos[:, None]).squeeze(1),
                          (scores[:, 3] / raw.sum(-1)) * cfg.routed_scaling_factor, atol=1e-6)
