import copy
import math

import pytest
import torch

from kimivl import KimiVL, KimiVLConfig
from kimivl.train.optim import (
    GROUPS,
    MuonAdamW,
    build_optimizer,
    newton_schulz,
    partition_params,
)


def reference_ns(u: torch.Tensor) -> torch.Tensor:
    """The quintic iteration written out for one matrix."""
    x = u.T if u.shape[0] > u.shape[1] else u
    x = x / max(float(torch.linalg.matrix_norm(x)), 1e-7)
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return x.T if u.shape[0] > u.shape[1] else x


def test_two_muon_steps_match_the_formula():
    torch.manual_seed(0)
    w0 = torch.randn(6, 10)
    g1, g2 = torch.randn(6, 10), torch.randn(6, 10)
    lr, wd, mu = 0.05, 0.1, 0.95
    p = torch.nn.Parameter(w0.clone())
    opt = MuonAdamW([p], lr=lr, weight_decay=wd, momentum=mu)
    expected = w0.clone()
    buf = torch.zeros_like(w0)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
        buf = mu * buf + g
        expected = expected * (1 - lr * wd) - lr * 0.2 * math.sqrt(10) * reference_ns(g + mu * buf)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], 0.95 * g1 + g2)


def test_without_nesterov_the_buffer_is_orthogonalised():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.zeros(8, 4))
    g = torch.randn(8, 4)
    p.grad = g
    MuonAdamW([p], lr=1.0, weight_decay=0.0, nesterov=False).step()
    torch.testing.assert_close(p.detach(), -0.2 * math.sqrt(8) * reference_ns(g), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (4, 64, 24)])
def test_newton_schulz_singular_values_near_one(shape):
    """By default five quintic steps (NS5), each matrix on its own."""
    torch.manual_seed(0)
    g = torch.randn(shape)
    o = newton_schulz(g)
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.65 and s.max() < 1.2, (s.min(), s.max())
    torch.testing.assert_close(o, torch.stack([reference_ns(m) for m in g.reshape(-1, *shape[-2:])]).reshape(shape))


def test_stacked_experts_equal_per_matrix_steps():
    torch.manual_seed(0)
    w = torch.randn(3, 8, 5)
    grads = [torch.randn(3, 8, 5) for _ in range(2)]
    stacked = torch.nn.Parameter(w.clone())
    single = [torch.nn.Parameter(w[e].clone()) for e in range(3)]
    opt_stacked = MuonAdamW([stacked], lr=0.02)
    opt_single = MuonAdamW(single, lr=0.02)
    for g in grads:
        stacked.grad = g.clone()
        for e, p in enumerate(single):
            p.grad = g[e].clone()
        opt_stacked.step()
        opt_single.step()
    torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in single]))


def test_chunks_orthogonalise_row_blocks_apart():
    torch.manual_seed(0)
    w, g = torch.randn(2, 12, 7), torch.randn(2, 12, 7)
    fused = torch.nn.Parameter(w.clone())
    gate, up = torch.nn.Parameter(w[:, :6].clone()), torch.nn.Parameter(w[:, 6:].clone())
    fused.grad, gate.grad, up.grad = g.clone(), g[:, :6].clone(), g[:, 6:].clone()
    MuonAdamW([{"params": [fused], "chunks": 2}], lr=0.02).step()
    MuonAdamW([gate, up], lr=0.02).step()
    torch.testing.assert_close(fused.detach(), torch.cat([gate.detach(), up.detach()], dim=1))


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    w = torch.randn(5, 3)
    ours, ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt = MuonAdamW([{"params": [ours], "algorithm": "adamw"}], lr=0.01, weight_decay=0.1, betas=(0.9, 0.95))
    ref_opt = torch.optim.AdamW([ref], lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(3):
        g = torch.randn(5, 3)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach())


def test_a_step_with_a_closure_returns_its_loss_and_steps_on_its_gradient():
    """As a torch optimizer's: ``step(closure)`` computes the loss and gradient with the closure, then steps."""
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    p, ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt, ref_opt = MuonAdamW([p], lr=0.05), MuonAdamW([ref], lr=0.05)

    def closure():
        loss = (p * torch.arange(60.0).reshape(6, 10)).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx((w * torch.arange(60.0).reshape(6, 10)).sum().item())
    ref.grad = torch.arange(60.0).reshape(6, 10)
    ref_opt.step()
    assert not torch.equal(p.detach(), w)
    torch.testing.assert_close(p.detach(), ref.detach())


def test_a_sparse_gradient_is_refused():
    p = torch.nn.Parameter(torch.zeros(4, 3))
    p.grad = torch.zeros(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="MuonAdamW does not support sparse gradients"):
        MuonAdamW([p]).step()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"ns_dtype": "float16"}, "ns_dtype must be 'float32' or 'bfloat16', got 'float16'"),
        ({"lr": -1e-3}, r"need lr >= 0, weight_decay >= 0, 0 <= momentum < 1; got -0.001, 0.1, 0.95"),
        ({"weight_decay": -0.1}, r"got 0.001, -0.1, 0.95"),
        ({"momentum": 1.0}, r"got 0.001, 0.1, 1.0"),
        ({"momentum": -0.5}, r"got 0.001, 0.1, -0.5"),
        ({"algorithm": "sgd"}, "param group algorithm must be 'muon' or 'adamw', got 'sgd'"),
    ],
)
def test_bad_settings_are_refused_and_their_edges_allowed(settings, message):
    p = torch.nn.Parameter(torch.zeros(4, 3))
    group = {"params": [p], **({"algorithm": settings.pop("algorithm")} if "algorithm" in settings else {})}
    with pytest.raises(ValueError, match=message):
        MuonAdamW([group], lr=settings.pop("lr", 1e-3), **settings)
    MuonAdamW([p], lr=0.0, weight_decay=0.0, momentum=0.0, ns_dtype="bfloat16")  # every edge is allowed


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="adamw"):
        MuonAdamW([torch.nn.Parameter(torch.zeros(4))])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return KimiVL(KimiVLConfig.from_preset("tiny"))


def expected_group(name: str, p: torch.Tensor) -> str:
    if name.endswith("experts.gate_up_proj"):
        return "muon_gate_up"
    if name.endswith("experts.down_proj"):
        return "muon"
    if name.endswith("pos_emb.weight") or p.ndim == 1:
        return "adamw_no_decay"
    if any(key in name for key in ("embed_tokens", "lm_head", "patch_embed.proj", "mlp.gate.weight")):
        return "adamw"
    return "muon"


def test_partition_covers_every_trainable_param_once(model):
    groups = partition_params(model)
    assert set(groups) == set(GROUPS)
    placed = {name: g for g, named in groups.items() for name, _ in named}
    assert sum(len(named) for named in groups.values()) == len(placed)
    params = dict(model.named_parameters())
    assert placed.keys() == params.keys()
    for name, group in placed.items():
        assert group == expected_group(name, params[name]), name
    spot = {
        "language_model.model.layers.1.mlp.gate.weight": "adamw",
        "language_model.model.layers.1.self_attn.kv_b_proj.weight": "muon",
        "vision_tower.encoder.blocks.0.wqkv.weight": "muon",
        "vision_tower.encoder.blocks.0.wqkv.bias": "adamw_no_decay",
        "multi_modal_projector.linear_1.weight": "muon",
        "vision_tower.patch_embed.proj.weight": "adamw",
    }
    assert {n: placed[n] for n in spot} == spot
    buffers = {name for name, _ in model.named_buffers()}
    assert buffers and not buffers & placed.keys()


def test_a_parameter_shared_by_two_modules_is_placed_once():
    """A weight two modules hold (tied) is one parameter: placed under the first module's name, optimised once."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].weight = model[0].weight
    groups = partition_params(model)
    assert [name for name, _ in groups["muon"]] == ["0.weight"]
    assert [name for name, _ in groups["adamw_no_decay"]] == ["0.bias", "1.bias"]
    opt = build_optimizer(model, lr=1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == 3


def test_frozen_params_are_left_out():
    torch.manual_seed(0)
    m = KimiVL(KimiVLConfig.from_preset("tiny"))
    m.vision_tower.requires_grad_(False)
    placed = {name for named in partition_params(m).values() for name, _ in named}
    assert placed == {n for n, p in m.named_parameters() if p.requires_grad}
    assert not any(n.startswith("vision_tower") for n in placed)
    opt = build_optimizer(m, lr=1e-3)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in m.parameters() if p.requires_grad}
    m.requires_grad_(False)
    with pytest.raises(ValueError, match=r"the model has no trainable parameters \(all have requires_grad=False\)"):
        build_optimizer(m, lr=1e-3)


def test_build_optimizer_groups(model):
    opt = build_optimizer(model, lr=1e-3)  # the defaults: weight decay 0.1, Nesterov momentum 0.95, 5 NS steps
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["muon_gate_up"]["chunks"] == 2 and by_name["muon_gate_up"]["algorithm"] == "muon"
    assert by_name["adamw"]["weight_decay"] == 0.1 and by_name["adamw_no_decay"]["weight_decay"] == 0.0
    assert by_name["muon"]["momentum"] == 0.95 and by_name["muon"]["ns_steps"] == 5 and by_name["muon"]["nesterov"]


def fake_grads(m: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2


def test_state_dict_resume_gives_the_identical_next_step(model):
    m = copy.deepcopy(model)
    opt = build_optimizer(m, lr=1e-2)
    for seed in range(2):
        fake_grads(m, seed)
        opt.step()
    saved_model = {k: v.detach().clone() for k, v in m.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())

    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved_model)
    resumed_opt = build_optimizer(resumed, lr=1e-2)
    resumed_opt.load_state_dict(saved_opt)
    for mm, oo in ((m, opt), (resumed, resumed_opt)):
        fake_grads(mm, 7)
        oo.step()
    for (name, a), b in zip(m.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_one_step_on_the_tiny_model_moves_every_trainable_param(model):
    m = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = build_optimizer(m, lr=1e-3)
    ids = torch.randint(0, 100, (1, 16))
    out = m(ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    unused = {"vision_tower", "multi_modal_projector"}  # text-only batch: no gradient reaches the vision side
    for n, p in m.named_parameters():
        if n.split(".")[0] not in unused and p.grad is not None:
            assert not torch.equal(p.detach(), before[n]), n


def test_bfloat16_newton_schulz_stays_close_to_float32():
    g = torch.randn(3, 48, 80, generator=torch.Generator().manual_seed(0))
    exact, fast = newton_schulz(g), newton_schulz(g, dtype=torch.bfloat16)
    assert fast.dtype == torch.float32
    assert (fast - exact).norm() / exact.norm() < 0.05
    s = torch.linalg.svdvals(fast)
    assert s.min() > 0.5 and s.max() < 1.3


def test_lr_scale_gives_a_part_its_own_groups_and_a_proportional_step(model):
    plain, scaled = copy.deepcopy(model), copy.deepcopy(model)
    opt = build_optimizer(plain, lr=1e-2)
    opt_scaled = build_optimizer(scaled, lr=1e-2, lr_scale={"vision_tower": 0.1})
    names = [g["name"] for g in opt_scaled.param_groups]
    assert names[: len(opt.param_groups)] == [g["name"] for g in opt.param_groups]  # unscaled groups first
    assert set(names[len(opt.param_groups) :]) == {
        "muon@vision_tower",
        "adamw@vision_tower",
        "adamw_no_decay@vision_tower",
    }
    assert all(g["lr"] == pytest.approx(1e-3 if "@" in g["name"] else 1e-2) for g in opt_scaled.param_groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for m, o in ((plain, opt), (scaled, opt_scaled)):
        fake_grads(m, 3)
        o.step()
    for (n, a), b in zip(plain.named_parameters(), scaled.parameters()):
        step, step_scaled = a.detach() - before[n], b.detach() - before[n]
        if n.startswith("vision_tower."):  # Muon, AdamW and the decay all move in proportion to the rate
            assert torch.allclose(step_scaled, 0.1 * step, rtol=1e-3, atol=1e-7), n
        else:
            assert torch.equal(step_scaled, step), n


@pytest.mark.parametrize("outer_first", [True, False])
def test_a_parameter_under_two_scaled_parts_takes_the_nearer_ones_rate(model, outer_first):
    """{language_model: 0.5, language_model.lm_head: 2.0} gave lm_head 0.5; in the other order 2.0."""
    scales = [("language_model", 0.5), ("language_model.lm_head", 2.0)]
    opt = build_optimizer(model, lr=1e-2, lr_scale=dict(scales if outer_first else scales[::-1]))
    rate = {id(p): group["lr"] for group in opt.param_groups for p in group["params"]}
    assert {rate[id(p)] for p in model.language_model.lm_head.parameters()} == {2e-2}
    assert {rate[id(p)] for p in model.language_model.model.embed_tokens.parameters()} == {5e-3}


def test_a_scaled_part_is_a_whole_submodule_blocks_1_not_blocks_10():
    config = KimiVLConfig.from_preset("tiny")
    config.vision_config.num_hidden_layers = 11
    model = KimiVL(config)
    opt = build_optimizer(model, lr=1e-2, lr_scale={"vision_tower.encoder.blocks.1": 0.5})
    rate = {id(p): group["lr"] for group in opt.param_groups for p in group["params"]}
    blocks = model.vision_tower.encoder.blocks
    assert {rate[id(p)] for p in blocks[1].parameters()} == {5e-3}
    assert {rate[id(p)] for i in (0, *range(2, 11)) for p in blocks[i].parameters()} == {1e-2}


@pytest.mark.parametrize("lr_scale", [{"vision": 0.1}, {"vision_tower": 0.0}, {"language_model": -1.0}])
def test_lr_scale_rejects_unknown_parts_and_bad_factors(model, lr_scale):
    with pytest.raises(ValueError, match="lr_scale"):
        build_optimizer(model, lr=1e-3, lr_scale=lr_scale)
