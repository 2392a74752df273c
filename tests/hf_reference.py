"""transformers' ``DeepseekV3ForCausalLM`` carrying a kimivl language model's weights: the reference the parity
tests and the speed benchmarks compare against. It lives with the tests, outside the package: transformers is a
test-only dependency (the benchmarks put this folder on their path to import it)."""

from __future__ import annotations

import dataclasses

import torch

from kimivl.config import TextConfig
from kimivl.model.language_model import LanguageModel

# TextConfig fields that DeepseekV3Config names differently or does not take
_SKIP = (
    "extra",
    "rope_theta",
    "rope_scaling",
    "torch_dtype",
    "model_type",
    "topk_method",
    "scoring_func",
    "moe_layer_freq",
    "aux_loss_alpha",
    "seq_aux",
    "eos_token_id",
)


def random_lm(cfg: TextConfig, seed: int = 0) -> LanguageModel:
    """A float32 language model with random weights, unit-centred norms and a non-zero selection bias."""
    torch.manual_seed(seed)
    lm = LanguageModel(cfg).float().eval()
    with torch.no_grad():
        for name, p in lm.named_parameters():
            p.normal_(0, 0.02 if p.dim() > 1 else 0.1).add_(1.0 if "norm" in name else 0.0)
        for layer in lm.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return lm


def hf_reference(cfg: TextConfig, lm: LanguageModel, attn_implementation: str = "sdpa"):
    """transformers' model with ``lm``'s weights: official names, per-expert weights fused into its stacked layout."""
    import transformers

    hf_cfg = transformers.DeepseekV3Config(
        **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in _SKIP},
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rope_interleave=True,
        attn_implementation=attn_implementation,
    )
    ref = transformers.DeepseekV3ForCausalLM(hf_cfg).float().eval()
    state = lm.state_dict()
    mapped = {k: v for k, v in state.items() if ".experts." not in k}
    for layer in filter(cfg.is_moe_layer, range(cfg.num_hidden_layers)):
        p = f"model.layers.{layer}.mlp.experts."
        e = range(cfg.n_routed_experts)
        mapped[p + "gate_up_proj"] = torch.stack(
            [torch.cat([state[f"{p}{i}.gate_proj.weight"], state[f"{p}{i}.up_proj.weight"]]) for i in e]
        )
        mapped[p + "down_proj"] = torch.stack([state[f"{p}{i}.down_proj.weight"] for i in e])
    missing, unexpected = ref.load_state_dict(mapped, strict=False)
    if unexpected or any("rotary" not in m for m in missing):
        raise RuntimeError(f"weights did not map onto transformers: missing {missing}, unexpected {unexpected}")
    return ref


def to_bf16(model: torch.nn.Module) -> None:
    """bf16 parameters but the routers' (float32 in both, as released checkpoints load); buffers such as
    transformers' RoPE frequencies keep float32."""
    for name, p in model.named_parameters():
        if ".mlp.gate." not in name:
            p.data = p.data.to(torch.bfloat16)
