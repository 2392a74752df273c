import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

from kimivl.config import KimiVLConfig
from kimivl.model.language_model import LanguageModel
from kimivl.model.moe import GroupedExperts, Router, to_dtype


def _reference(experts: GroupedExperts, x, idx, w):
    """Each token through each of its experts with plain matmuls, weighted and summed."""
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for e, weight in zip(idx[i].tolist(), w[i]):
            gate, up = (experts.gate_up_proj[e] @ x[i]).chunk(2)
            out[i] += weight * (experts.down_proj[e] @ (F.silu(gate) * up))
    return out


def test_grouped_experts_equal_a_per_token_loop_with_padded_groups():
    g = torch.Generator().manual_seed(0)
    experts = GroupedExperts(n_experts=5, dim=12, hidden=8)
    with torch.no_grad():
        experts.gate_up_proj.normal_(generator=g)
        experts.down_proj.normal_(generator=g)
    x = torch.randn(70, 12, generator=g)
    idx = torch.randint(0, 4, (70, 2), generator=g)  # expert 4 gets no token
    idx[:, 1] = (idx[:, 0] + 1) % 4
    w = torch.rand(70, 2, generator=g)
    upstream = torch.randn(70, 12, generator=g)
    grads = []
    for fn in (experts, lambda *a: _reference(experts, *a)):
        inputs = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        out = fn(inputs[0], idx, inputs[1])
        out.backward(upstream)
        grads.append((out, inputs[0].grad, inputs[1].grad, experts.gate_up_proj.grad.clone()))
        experts.zero_grad()
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def tiny_lm():
    cfg = KimiVLConfig.from_preset("tiny").text_config
    torch.manual_seed(0)
    lm = LanguageModel(cfg)
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(0, 0.02)
        for layer in lm.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return cfg, lm


@torch.no_grad()
def test_group_limited_routing_never_picks_an_expert_outside_the_kept_groups():
    """With every biased choice below 0, the experts chosen still lie in the ``topk_group`` best groups (by the sum of
    each group's best two), as DeepSeek-V3's reference code masks with -inf; a mask of 0 would let an excluded expert
    win."""
    text = dataclasses.replace(
        KimiVLConfig.from_preset("tiny").text_config, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2
    )
    router = Router(text)
    torch.manual_seed(0)
    router.weight.normal_(0, 0.5)
    router.e_score_correction_bias.normal_(-2.0, 0.3)
    w, idx, scores = router(torch.randn(64, text.hidden_size))
    choice = (scores + router.e_score_correction_bias).view(64, 4, 2)
    kept = choice.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
    assert (idx[:, :, None] // 2 == kept[:, None, :]).any(-1).all()
    torch.testing.assert_close(
        w, scores.gather(1, idx) / scores.gather(1, idx).sum(-1, keepdim=True) * text.routed_scaling_factor
    )


def test_router_stays_exact_float32_through_the_explicit_cast_and_device_moves():
    _, lm = tiny_lm()
    gate = lm.model.layers[1].mlp.gate
    w, b = gate.weight.detach().clone(), gate.e_score_correction_bias.clone()
    assert to_dtype(lm, torch.bfloat16) is lm
    assert gate.weight.dtype == torch.float32 and torch.equal(gate.weight, w)
    assert torch.equal(gate.e_score_correction_bias, b)
    assert lm.model.layers[1].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert lm.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    lm.to("meta")  # a device move changes no dtype
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32 and gate.weight.is_meta
    assert lm.model.layers[1].self_attn.q_proj.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="floating-point dtype, not torch.int64"):
        to_dtype(lm, torch.int64)


def test_a_plain_cast_rounds_the_router_too():
    """model.to(dtype) is PyTorch's: the routers take the dtype as well (their values rounded); they still score in
    float32."""
    cfg, lm = tiny_lm()
    gate = lm.model.layers[1].mlp.gate
    w = gate.weight.detach().clone()
    lm.to(torch.bfloat16)
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.bfloat16
    assert torch.equal(gate.weight.float(), w.bfloat16().float())
    x = torch.randn(5, cfg.hidden_size).bfloat16()
    assert gate(x)[2].dtype == torch.float32


def test_the_router_scores_in_float32_under_bf16_autocast():
    """Training runs under autocast; its routers must pick the experts inference picks (autocast ran F.linear in
    bf16, and 25 of 1000 tokens took another expert set)."""
    cfg, lm = tiny_lm()
    gate = lm.model.layers[1].mlp.gate
    with torch.no_grad():
        gate.weight.normal_(0, 0.5)
    x = torch.randn(1000, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    want = gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gate(x)
    assert got[2].dtype == torch.float32
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_a_float64_router_scores_in_float64():
    cfg, lm = tiny_lm()
    to_dtype(lm, torch.float64)
    gate = lm.model.layers[1].mlp.gate
    x = torch.randn(6, cfg.hidden_size, dtype=torch.float64)
    w_TK, idx_TK, scores_TE = gate(x)
    assert w_TK.dtype == scores_TE.dtype == torch.float64
    torch.testing.assert_close(scores_TE, (x @ gate.weight.T).sigmoid(), rtol=1e-15, atol=1e-15)


def test_a_compiled_float32_moe_block_equals_the_block():
    """``torch.compile`` of a float32 model failed in the MoE blocks' grouped matmuls ("Expected inputs of BF16
    type"). The aot_eager backend traces as the default one does (fake tensors) without generating code, which would
    take half a minute."""
    cfg, lm = tiny_lm()
    moe = lm.model.layers[1].mlp
    x = torch.randn(2, 8, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = moe(x)
        got = torch.compile(moe, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_state_dict_lacking_one_experts_tensor_loads_the_rest():
    """With one per-expert tensor absent, ``load_state_dict(strict=False)`` left the whole layer's experts unloaded,
    called the present ones unexpected and the stacked names (never in a state dict) missing."""
    _, lm = tiny_lm()
    absent = "model.layers.1.mlp.experts.3.up_proj.weight"
    kept = lm.state_dict()[absent].clone()
    given = {k: torch.full_like(v, 0.5) if ".experts." in k else v for k, v in lm.state_dict().items() if k != absent}
    result = lm.load_state_dict(given, strict=False)
    assert result.missing_keys == [absent] and result.unexpected_keys == []
    loaded = lm.state_dict()
    assert all((loaded[k] == 0.5).all() for k in given if ".experts." in k)
    assert torch.equal(loaded[absent], kept)
    with pytest.raises(RuntimeError, match=f'Missing key\\(s\\) in state_dict: "{absent}"'):
        lm.load_state_dict(given)


def test_an_experts_tensor_of_another_shape_is_named_with_both_shapes():
    """A wrong-shaped per-expert tensor failed inside torch.cat (Sizes of tensors must match ...) naming no key; it is
    reported as load_state_dict reports any size mismatch, strict or not, beside the other tensors' mismatches."""
    _, lm = tiny_lm()
    whole = lm.state_dict()
    bad = "model.layers.1.mlp.experts.3.up_proj.weight"
    shape = tuple(whole[bad].shape)
    given = {**whole, bad: whole[bad][:, :-1]}
    message = re.escape(
        f"size mismatch for {bad}: copying a param with shape torch.Size([{shape[0]}, {shape[1] - 1}]) from "
        f"checkpoint, the shape in current model is torch.Size([{shape[0]}, {shape[1]}])"
    )
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=message):
            lm.load_state_dict(given, strict=strict)
    assert all(torch.equal(lm.state_dict()[k], v) for k, v in whole.items())


def test_a_meta_model_loads_a_layers_experts_from_two_shards_with_assign():
    """Loading shard by shard onto a model built on the meta device (``assign=True``), a layer's experts split across
    two shards failed: the absent experts' meta values could not be copied; the second shard now fills them."""
    cfg, lm = tiny_lm()
    whole = lm.state_dict()
    with torch.device("meta"):
        empty = LanguageModel(cfg)
    first = {k: v for k, v in whole.items() if ".experts.1." not in k and ".experts.2." not in k}
    second = {k: v for k, v in whole.items() if k not in first}
    assert {k for k in empty.load_state_dict(first, strict=False, assign=True).missing_keys} == set(second)
    assert empty.load_state_dict(second, strict=False, assign=True).missing_keys == list(first)
    assert all(torch.equal(empty.state_dict()[k], v) for k, v in whole.items())
