"""What a stage trains (parts less freeze patterns) and the memory it says training will hold."""

from pathlib import Path

import pytest
import torch

from kimivl import KimiVL
from kimivl.cli import main
from kimivl.model.moe import to_dtype
from kimivl.train.optim import build_optimizer
from kimivl.train.recipe import PARTS
from kimivl.train.trainable import hold_frozen_in_bf16, memory_plan, restore_float32, set_trainable

EXPERTS = "*.mlp.experts.*"


def train_step(model):
    opt = build_optimizer(model, lr=1e-2)
    ids = torch.randint(0, model.config.text_config.vocab_size, (1, 24))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return opt


def test_freeze_keeps_the_routed_experts_as_they_were(tiny_model):
    set_trainable(tiny_model, ["multi_modal_projector", "language_model"], [EXPERTS])
    trained = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("vision_tower.") for n in trained)
    routed = [n for n, _ in tiny_model.named_parameters() if ".mlp.experts." in n]
    assert routed and not set(routed) & trained
    assert any(".mlp.shared_experts." in n for n in trained) and any(".self_attn." in n for n in trained)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    train_step(tiny_model)
    after = dict(tiny_model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in routed)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trained


def test_memory_plan_is_what_training_holds(tiny_model):
    set_trainable(tiny_model, ["language_model"], [EXPERTS, "*.embed_tokens.*"])  # every one gets a gradient
    plan = memory_plan(tiny_model)
    opt = train_step(tiny_model)
    params = list(tiny_model.parameters())
    trained = [p for p in params if p.requires_grad]
    assert plan.total == sum(p.numel() for p in params) and plan.trained == sum(p.numel() for p in trained)
    assert plan.weights == 4 * plan.total
    assert plan.gradients == sum(p.grad.numel() * 4 for p in trained) == 4 * plan.trained
    held = sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )
    assert plan.optimizer == held
    assert all(p.grad is None for p in params if not p.requires_grad)
    to_dtype(tiny_model, torch.bfloat16)  # the routers stay float32: each tensor counts in its own dtype
    weights = memory_plan(tiny_model).weights
    assert weights == sum(p.numel() * p.element_size() for p in params) and 2 * plan.total < weights < 2.01 * plan.total


def test_memory_plan_counts_the_state_of_trained_experts(tiny_model):
    """The experts' gate_up stacks (a Muon group of their own) hold one momentum tensor each, as every Muon weight."""
    set_trainable(tiny_model, ["language_model"])
    plan = memory_plan(tiny_model)
    opt = build_optimizer(tiny_model, lr=1e-2)
    opt.init_state()  # every trained parameter's state, as its first step creates it
    held = {
        name: [t for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
        for name, p in tiny_model.named_parameters()
        if p in opt.state
    }
    assert any(name.endswith("gate_up_proj") for name in held)
    assert plan.optimizer == sum(t.numel() * t.element_size() for ts in held.values() for t in ts)


def test_a_pattern_that_matches_nothing_or_everything_is_an_error(tiny_model):
    with pytest.raises(ValueError, match=r"freeze pattern '\*\.mlp\.expert\.\*' matches no parameter"):
        set_trainable(tiny_model, ["language_model"], ["*.mlp.expert.*"])
    with pytest.raises(ValueError, match="matches no parameter of the trained parts \\['language_model'\\]"):
        set_trainable(tiny_model, ["language_model"], ["vision_tower.*"])  # frozen already: a likely mistake
    with pytest.raises(ValueError, match="leaves nothing of \\['multi_modal_projector'\\] to train"):
        set_trainable(tiny_model, ["multi_modal_projector"], ["*"])


def test_info_prints_the_memory_of_a_fine_tuning_plan(capsys, tiny_config, tmp_path):
    assert (
        main(
            [
                "info",
                "--preset",
                "kimi-vl-a3b",
                "--train",
                "multi_modal_projector",
                "language_model",
                "--freeze",
                EXPERTS,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()[-1]
    assert out == (
        "training multi_modal_projector + language_model, less *.mlp.experts.* from a bfloat16 "
        "checkpoint under bf16 autocast: trains 1.60B of 16.41B parameters; holds weights 36.0 GB, gradients 6.4 GB, "
        "optimiser state 9.1 GB (total 51.5 GB, activations on top)"
    )
    tiny_config.save_pretrained(tmp_path)
    assert main(["info", str(tmp_path), "--train", "language_model"]) == 0
    with torch.device("meta"):
        model = KimiVL(tiny_config)
    set_trainable(model, ["language_model"])
    held = hold_frozen_in_bf16(model, lambda name, p: True)
    expected = f"training language_model from a bfloat16 checkpoint under bf16 autocast: {memory_plan(model)}"
    assert capsys.readouterr().out.splitlines()[-1] == expected
    tiny_config.with_weight_dtype("float32").save_pretrained(tmp_path / "f32")  # a config alone: the dtype it declares
    assert main(["info", str(tmp_path / "f32"), "--train", "language_model"]) == 0
    restore_float32(held)
    expected = f"training language_model from a float32 checkpoint under bf16 autocast: {memory_plan(model)}"
    assert capsys.readouterr().out.splitlines()[-1] == expected
    assert main(["info", str(tmp_path), "--freeze", "nothing*"]) == 2
    assert "freeze pattern 'nothing*' matches no parameter" in capsys.readouterr().err


def test_info_train_without_parts_plans_every_part(capsys):
    """``--train`` alone was an argparse error (expected at least one argument), though its help says "default all";
    a checkpoint after it was refused as no part."""
    assert main(["info", "--preset", "tiny", "--train", *PARTS]) == 0
    every = capsys.readouterr().out.splitlines()[-1]
    assert (
        every.startswith(f"training {' + '.join(PARTS)} from a bfloat16 checkpoint")
        and "trains 2.15M of 2.15M" in every
    )
    assert main(["info", "--preset", "tiny", "--train"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == every
    assert main(["info", "--preset", "tiny", "--train", "--dp-shard", "2"]) == 0  # a training run: the plan is made
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"training {' + '.join(PARTS)} sharded")
    tiny = str(Path(__file__).resolve().parents[2] / "models" / "kimivl-tiny")  # the path after --train: read as one
    assert main(["info", tiny, "--train"]) == 0
    first = capsys.readouterr().out
    assert main(["info", "--train", tiny]) == 0 and capsys.readouterr().out == first
    assert main(["info", "--preset", "tiny", "--train", "vit", "experts"]) == 2
    assert "--train takes parts of the model (vision_tower, " in capsys.readouterr().err


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_frozen_bf16_weights_train_exactly_as_float32_in_half_the_memory(tiny_model):
    to_dtype(tiny_model, torch.bfloat16).float().train()  # float32 holding bfloat16 values, as loaded from a bf16
    # checkpoint
    set_trainable(tiny_model, ["language_model"], [EXPERTS, "*.self_attn.q_proj.*"])
    ids = torch.randint(0, tiny_model.config.text_config.vocab_size, (2, 16))
    before, plan = loss_and_grads(tiny_model, ids), memory_plan(tiny_model)
    originals = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    held = hold_frozen_in_bf16(tiny_model)
    dtypes = {n: p.dtype for n, p in tiny_model.named_parameters()}
    bf16 = {n for n, d in dtypes.items() if d == torch.bfloat16}
    assert any(".mlp.experts." in n for n in bf16) and any(".q_proj." in n for n in bf16)
    assert any(n.startswith("vision_tower.") and n.endswith("wqkv.weight") for n in bf16)
    assert "language_model.lm_head.weight" not in bf16 and "language_model.model.embed_tokens.weight" not in bf16
    assert not any(p.requires_grad for n, p in tiny_model.named_parameters() if n in bf16)
    assert not any(".mlp.gate." in n or "norm" in n for n in bf16)  # the router, norms: only autocast's matrices
    after = loss_and_grads(tiny_model, ids)
    assert torch.equal(before[0], after[0]) and before[1].keys() == after[1].keys()
    assert all(torch.equal(before[1][n], after[1][n]) for n in before[1])
    saved = sum(p.numel() * 2 for p in held)
    assert len(held) == len(bf16) and memory_plan(tiny_model).weights == plan.weights - saved
    restore_float32(held)
    assert all(p.dtype == originals[n].dtype and torch.equal(p, originals[n]) for n, p in tiny_model.named_parameters())


def test_a_frozen_projector_held_in_bf16_projects_images_as_in_float32(tiny_model):
    """Holding a frozen projector's ``linear_1`` in bf16 rounded the tower's features to bf16 before the projector's
    float32 LayerNorm (they were cast to ``linear_1``'s dtype): a language-model-only stage on images trained on other
    numbers in one process (loss 0.71197 for 0.71727) than sharded, where nothing is held."""
    to_dtype(tiny_model, torch.bfloat16).float()  # float32 holding bfloat16 values, as loaded from a bf16 checkpoint
    set_trainable(tiny_model, ["language_model"])
    g = torch.Generator().manual_seed(0)
    hws = torch.tensor([[4, 6], [2, 2]])
    patch = tiny_model.config.vision_config.patch_size
    pixels = torch.randn(int(hws.prod(1).sum()), 3, patch, patch, generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = tiny_model.get_image_features(pixels, hws)
        held = hold_frozen_in_bf16(tiny_model)
        assert tiny_model.multi_modal_projector.linear_1.weight.dtype == torch.bfloat16
        assert tiny_model.multi_modal_projector.pre_norm.weight.dtype == torch.float32
        assert torch.equal(tiny_model.get_image_features(pixels, hws), before)
    restore_float32(held)


def test_weights_with_more_precision_than_bf16_stay_float32(tiny_model):
    set_trainable(tiny_model, ["language_model"], [EXPERTS])  # freshly initialised float32 values
    assert hold_frozen_in_bf16(tiny_model) == []
    to_dtype(tiny_model, torch.bfloat16).float()
    nudged = tiny_model.language_model.lm_head.weight
    nudged.requires_grad_(False)
    nudged.data.view(torch.int32)[0, 0] += 1  # one float32 step off a bfloat16 value: more precision than bf16 holds
    held = hold_frozen_in_bf16(tiny_model)
    assert held and nudged.dtype == torch.float32 and not any(p is nudged for p in held)
    restore_float32(held)
    with torch.device("meta"):
        planned = KimiVL(tiny_model.config)
    set_trainable(planned, ["language_model"], [EXPERTS])
    assert len(hold_frozen_in_bf16(planned, lambda name, p: True)) > 0  # a plan knows the weights' origin
