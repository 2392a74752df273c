import pytest
import torch

from kimivl import KimiVL, KimiVLConfig
from kimivl.distributed.expert_parallel import apply_expert_parallel
from kimivl.distributed.plan import activation_bytes, rank_memory_plan
from kimivl.train.optim import partition_params
from kimivl.train.trainable import hold_frozen_in_bf16, memory_plan, set_trainable

EXPERTS = "language_model.*.mlp.experts.*"


def tiny(freeze=()) -> KimiVL:
    with torch.device("meta"):
        model = KimiVL(KimiVLConfig.from_preset("tiny"))
    set_trainable(model, ["vision_tower", "multi_modal_projector", "language_model"], list(freeze))
    hold_frozen_in_bf16(model, lambda name, p: True)
    return model


def largest_chunk(p: torch.Tensor, ranks: int, rows: int | None = None) -> int:
    """Elements of torch.chunk's first (largest) dim-0 chunk of ``p`` (of its first ``rows`` rows)."""
    t = torch.empty(p.shape, device="meta")[:rows]
    return t.chunk(ranks)[0].numel() if t.ndim else 1


@pytest.mark.parametrize("freeze", [(), (EXPERTS,)])
def test_one_rank_holds_what_one_process_holds(freeze):
    model = tiny(freeze)
    plan, single = rank_memory_plan(model, 1), memory_plan(model)
    assert (plan.weights, plan.gradients, plan.optimizer) == (single.weights, single.gradients, single.optimizer)


@pytest.mark.parametrize("freeze", [(), (EXPERTS,)])
def test_each_parameter_is_sharded_as_torch_chunk_does(freeze):
    """dp_shard 6, ep 2: the 8 experts of a layer split 4 and 4, each 4 over 3 ranks (chunks 2, 2, 0: padded to 2
    rows on every rank); every other parameter over 6 ranks."""
    model = tiny(freeze)
    plan = rank_memory_plan(model, 6, 2)

    def shard_bytes(name, p):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return largest_chunk(p, 3, rows=4) * p.element_size()
        return largest_chunk(p, 6) * p.element_size()

    assert plan.weights == sum(shard_bytes(n, p) for n, p in model.named_parameters())
    states = {"muon": 1, "muon_gate_up": 1, "adamw": 2, "adamw_no_decay": 2}
    groups = partition_params(model)
    assert plan.gradients == sum(shard_bytes(n, p) for named in groups.values() for n, p in named)
    assert plan.optimizer == sum(states[g] * shard_bytes(n, p) for g, named in groups.items() for n, p in named)
    # 3 MoE layers x 2 experts' rows of gate_up (128 x 128) and down (128 x 64), float32: trained or bf16 frozen
    experts = 3 * 2 * (128 * 128 + 128 * 64)
    trained = rank_memory_plan(tiny(), 6, 2)
    frozen = rank_memory_plan(tiny((EXPERTS,)), 6, 2)
    assert trained.weights - frozen.weights == experts * (4 - 2)
    assert trained.gradients - frozen.gradients == experts * 4 == 589_824
    assert trained.optimizer - frozen.optimizer == experts * 4  # Muon: one momentum


def test_gathered_parameters_are_the_root_and_two_of_the_largest_units():
    """Tiny, ep 2, float32 masters gathered (as kimivl's FSDP does, whatever the compute dtype).
    Root (outside layers and blocks): patch embedding 64*3*14*14 + 64 + 16*16*64,
    final vision norm 2*64, projector 2*64 + 256*256 + 256 + 128*256 + 128, embed and lm_head 2 * 4096*128, LM norm
    128. Largest layer: an MoE layer, attention 96*128 + 40*128 + 32 + 128*32 + 128*64, router 8*128, half the experts
    4*128*128 + 4*128*64, shared experts 3*64*128, norms 2*128. The root is the largest unit
    (its gradients too)."""
    root = (64 * 3 * 14 * 14 + 64 + 16 * 16 * 64) + 2 * 64 + (2 * 64 + 256 * 256 + 256 + 128 * 256 + 128)
    root += 2 * 4096 * 128 + 128
    layer = (96 * 128 + 40 * 128 + 32 + 128 * 32 + 128 * 64) + 8 * 128 + 4 * 128 * (128 + 64) + 3 * 64 * 128 + 256
    assert (root, layer) == (1_201_728, 153_888)
    staging = root + root  # the largest unit (here the root) gathered, and its gradients flattened for the reduction
    assert rank_memory_plan(tiny(), 2, 2).gathered == 4 * (root + 2 * layer + root + staging)
    assert rank_memory_plan(tiny(), 2, 2, compute_dtype=torch.float32).gathered == 4 * (
        root + 2 * layer + root + staging
    )
    # without expert parallelism a layer gathers all 8 experts
    assert rank_memory_plan(tiny(), 2, 1).gathered == 4 * (root + 2 * (layer + 4 * 128 * 192) + root + staging)


def test_activations_per_tokens_by_the_formula():
    """Tiny, 64 tokens, bf16 (2 bytes), ep 2. Attention 4*64*4*16 (float32 outputs) + 2*(64*(32+8) + 64*4*(16+16) +
    2*64*4*24 + 4*64*4*24);
    MoE MLP 64*2*(2*128 + 4*64)*2 + 3*64*64*2 + 3*64*8*4 (larger than the dense 3*64*256*2); exchanged rows
    2*64*2*128*2; the 4 layer inputs and the residual stream 4*64*128*2 each; logits 64*4096*(2+4+4)."""
    cfg = KimiVLConfig.from_preset("tiny").text_config
    layer = 111_616 + 161_792 + 65_536
    logits = 64 * 4096 * 10
    assert activation_bytes(cfg, 64, ep=2) == 65_536 + 2 * layer + 65_536 + logits == 3_430_400
    assert activation_bytes(cfg, 64, ep=2, recompute=False) == 5 * layer + 65_536 + logits
    assert activation_bytes(cfg, 64) == 3_430_400 - 2 * 65_536  # ep 1, recompute
    assert rank_memory_plan(tiny(), 2, 2, tokens=64).activations == 3_430_400


def test_the_plan_prints_every_figure():
    plan = rank_memory_plan(tiny(), 4, 2, tokens=64)
    text = str(plan)
    assert text.startswith("per rank (dp_shard 4, ep 2): weights ")
    assert f"activations {plan.activations / 1e6:.1f} MB per 64 tokens" in text
    assert f"(total {plan.total / 1e6:.1f} MB)" in text
    assert plan.total == plan.weights + plan.gradients + plan.optimizer + plan.gathered + plan.activations


def test_sizes_that_cannot_shard_the_model_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match=r"ep \(4\) must divide dp_shard \(6\)"):
        rank_memory_plan(model, 6, 4)
    with pytest.raises(ValueError, match=r"ep \(3\) must divide the 8 routed experts"):
        rank_memory_plan(model, 3, 3)
    with pytest.raises(ValueError, match="dp_shard must be a positive integer, got 0"):
        rank_memory_plan(model, 0)

    class Group:
        size, rank = staticmethod(lambda: 2), staticmethod(lambda: 1)

    apply_expert_parallel(model, Group())
    with pytest.raises(ValueError, match="already split by expert parallelism"):
        rank_memory_plan(model, 2, 2)


def test_info_prints_the_per_rank_plan_and_names_bad_layouts(capsys):
    from kimivl.cli import main

    args = ["info", "--preset", "kimi-vl-a3b", "--train", "language_model"]
    assert main([*args, "--dp-shard", "8", "--ep", "8"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert "per rank (dp_shard 8, ep 8)" in line and "optimiser state 8.3 GB" in line and "total 39.5 GB" in line
    assert "activations 3.1 GB per 4,096 tokens" in line  # the head's logits capped where the loss chunks them
    assert main([*args, "--freeze", "*.mlp.experts.*", "--dp-shard", "16", "--ep", "8"]) == 0
    assert "total 20.0 GB" in capsys.readouterr().out
    assert main([*args, "--dp-shard", "6", "--ep", "4"]) == 2
    assert "ep (4) must divide dp_shard (6)" in capsys.readouterr().err
    assert main(["info", "--preset", "kimi-vl-a3b", "--dp-shard", "8"]) == 2
    assert "give --train" in capsys.readouterr().err
    for flags, words in (
        (["--dp-shard", "0"], "--dp-shard must be >= 1, got 0"),
        (["--dp-shard", "8", "--ep", "0"], "--ep must be >= 1, got 0"),
        (["--ep", "8"], "give --dp-shard too"),
        (["--freeze", "nothing.matches"], "nothing.matches"),
    ):
        assert main([*args, *flags]) == 2
        out = capsys.readouterr()
        assert words in out.err and out.out == "", flags  # refused before the table is printed
