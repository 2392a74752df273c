import pytest
import torch

from kimivl import KimiVL, KimiVLConfig
from kimivl.model.moe import Router
from kimivl.train.balance import ExpertLoadTracker, update_bias
from kimivl.train.losses import sequence_aux_loss


def test_update_bias_moves_against_the_load():
    bias = torch.zeros(4)
    update_bias(bias, torch.tensor([10, 2, 4, 0]), rate=0.1)  # mean load 4
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.0, 0.1]))
    with pytest.raises(ValueError, match="float32"):
        update_bias(torch.zeros(4, dtype=torch.bfloat16), torch.ones(4), 0.1)
    with pytest.raises(ValueError, match=r"expert_counts \(1,\) must match the bias \(4,\)"):
        update_bias(bias, torch.tensor([3]), 0.1)  # would broadcast: every bias moved alike


def skewed_model() -> tuple[KimiVL, torch.Tensor]:
    """Tiny model whose routers point expert 0 along the mean direction of their inputs."""
    torch.manual_seed(0)
    model = KimiVL(KimiVLConfig.from_preset("tiny")).eval()
    ids = torch.randint(0, 1000, (2, 64))
    inputs = {}
    routers = [m for m in model.modules() if isinstance(m, Router)]
    hooks = [r.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod, args[0])) for r in routers]
    with torch.no_grad():
        model(ids)
        for r in routers:
            mean = inputs[r].mean(0)
            r.weight[0] = mean / mean.norm()
    for h in hooks:
        h.remove()
    return model, ids


def test_bias_updates_balance_a_skewed_router():
    model, ids = skewed_model()
    with ExpertLoadTracker(model) as tracker, torch.no_grad():
        assert tracker.imbalance() == {}  # no token routed yet
        model(ids)
        assert tracker.routing == {}  # kept only when asked: it holds the graph
        start = tracker.imbalance()
        assert len(start) == 3 and min(start.values()) > 3.5, start  # near 4 = every token on expert 0
        for _ in range(40):
            tracker.update_biases(rate=0.01)
            model(ids)
        end = tracker.imbalance()
    assert max(end.values()) < 1.75, (start, end)
    assert all(int(c.sum()) == 128 * 2 for c in tracker.counts.values())
    model(ids)  # hooks are gone after the block
    assert all(int(c.sum()) == 128 * 2 for c in tracker.counts.values())


def test_a_frozen_router_keeps_its_bias():
    """A stage that froze the language model (train: [multi_modal_projector]) still moved every router's bias, so
    fine-tuning the projector re-routed the LM."""
    model, ids = skewed_model()
    model.requires_grad_(False)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    routers[0].weight.requires_grad_(True)  # this layer trains, the others are frozen
    before = [r.e_score_correction_bias.clone() for r in routers]
    with ExpertLoadTracker(model) as tracker, torch.no_grad():
        model(ids)
        tracker.update_biases(rate=0.01)
    assert not torch.equal(routers[0].e_score_correction_bias, before[0])
    assert all(torch.equal(r.e_score_correction_bias, b) for r, b in zip(routers[1:], before[1:]))


def test_the_bias_selects_but_never_weights():
    torch.manual_seed(0)
    router = Router(KimiVLConfig.from_preset("tiny").text_config)
    torch.nn.init.normal_(router.weight, 0, 0.1)
    x = torch.randn(64, router.weight.shape[1])
    w0, idx0, scores0 = router(x)
    router.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    w1, idx1, scores1 = router(x)
    assert torch.equal(scores0, scores1)
    assert not torch.equal(idx0, idx1)
    for w, idx, s in ((w0, idx0, scores0), (w1, idx1, scores1)):
        chosen = s.gather(1, idx)
        torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True) * router.scaling)
    same = (idx0.sort(-1).values == idx1.sort(-1).values).all(-1)
    assert same.any()
    torch.testing.assert_close(w0[same].sort(-1).values, w1[same].sort(-1).values)


def test_kept_routing_feeds_the_aux_loss(tiny_config):
    torch.manual_seed(0)
    model = KimiVL(tiny_config)
    cfg = tiny_config.text_config
    ids = torch.randint(0, 1000, (2, 16))
    with ExpertLoadTracker(model, keep_routing=True) as tracker:
        model(ids)
    assert set(tracker.routing) == set(tracker.counts)
    aux = sum(
        sequence_aux_loss(scores, idx, [16, 16], cfg.n_routed_experts, cfg.num_experts_per_tok, 1e-3)
        for scores, idx in tracker.routing.values()
    )
    aux.backward()
    gate = model.language_model.model.layers[1].mlp.gate
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    assert gate.e_score_correction_bias.grad is None
    tracker.reset()
    assert tracker.routing == {} and all(int(c.sum()) == 0 for c in tracker.counts.values())
