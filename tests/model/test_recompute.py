"""Activation checkpointing applied from outside (kimivl.distributed.recompute): the same loss and gradients, far
fewer saved activations."""

import torch

from kimivl.distributed.expert_parallel import apply_expert_parallel
from kimivl.distributed.recompute import apply_recompute, recomputed, remove_recompute
from kimivl.model.language_model import LanguageModel
from kimivl.train.balance import ExpertLoadTracker
from tests.distributed.test_expert_parallel import _Group, _text_config
from tests.model.test_kimivl import image_batch, prompt


def packed_batch(cfg):
    pv, hws = image_batch([(4, 6), (2, 2)])
    a, b = prompt(cfg, 6, seed=1), prompt(cfg, 1, seed=2)
    ids = torch.cat([a, b], 1)
    labels = ids.clone()
    labels[ids == cfg.media_placeholder_token_id] = -100
    cu = torch.tensor([0, a.shape[1], ids.shape[1]], dtype=torch.int32)
    return {"input_ids": ids, "pixel_values": pv, "image_grid_hws": hws, "labels": labels, "cu_seqlens": cu}


def step(model, batch):
    """Loss, every parameter's gradient, bytes saved for backward outside checkpointed layers, expert counts."""
    model.zero_grad()
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with ExpertLoadTracker(model) as tracker:  # as in the training loop, backward runs inside the tracker too
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved), tracker.counts


def test_recompute_gives_the_same_loss_and_gradients_with_less_saved(tiny_model, tiny_config):
    tiny_model.train()
    batch = packed_batch(tiny_config)
    loss, grads, saved, counts = step(tiny_model, batch)
    layers = tiny_config.text_config.num_hidden_layers + tiny_config.vision_config.num_hidden_layers
    assert apply_recompute(tiny_model) == layers and recomputed(tiny_model)
    names = [n for n, _ in tiny_model.named_parameters()]
    loss_r, grads_r, saved_r, counts_r = step(tiny_model, batch)
    remove_recompute(tiny_model)
    assert not recomputed(tiny_model)
    assert [n for n, _ in tiny_model.named_parameters()] == names  # the module tree is unchanged
    torch.testing.assert_close(loss_r, loss, rtol=0, atol=0)
    assert grads_r.keys() == grads.keys() and len(grads) > 20
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert saved_r < saved / 2  # inside the layers, only their inputs
    # the forward recomputed in backward passes the routers again, uncounted
    assert counts and all(torch.equal(counts_r[name], counts[name]) for name in counts)


def test_recompute_only_where_gradients_flow_and_never_with_a_cache(tiny_model, tiny_config, monkeypatch):
    import kimivl.distributed.recompute as recompute
    from kimivl.inference.cache import MLACache

    calls = []
    real = recompute.checkpoint
    monkeypatch.setattr(recompute, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = packed_batch(tiny_config)
    apply_recompute(tiny_model)
    apply_recompute(tiny_model)  # harmless: each layer is still checkpointed once, not within a checkpoint
    with torch.no_grad():
        tiny_model(batch["input_ids"], batch["pixel_values"], batch["image_grid_hws"], cu_seqlens=batch["cu_seqlens"])
    assert not calls
    tiny_model(**batch).loss.backward()
    layers = tiny_config.text_config.num_hidden_layers + tiny_config.vision_config.num_hidden_layers
    assert len(calls) == layers
    calls.clear()
    ids = torch.randint(0, 100, (1, 5))
    cache = MLACache(tiny_config.text_config, batch=1, max_len=8)
    tiny_model.requires_grad_(False)  # gradients on, nothing to differentiate (else refused), a cache: as usual
    tiny_model.language_model(tiny_model.embed(ids), cache=cache)
    assert not calls and cache.length == 5
    remove_recompute(tiny_model)


def test_recompute_keeps_the_attention_path_of_its_forward(tiny_model):
    """A layer's forward recomputed in backward takes the attention path of its forward, even when backward runs
    outside training_attention: the same gradients as without recompute."""
    from kimivl import kernels

    tiny_model.train()
    ids = torch.randint(0, 3000, (2, 10), generator=torch.Generator().manual_seed(0))
    grads = []
    for recompute in (False, True):
        tiny_model.zero_grad()
        (apply_recompute if recompute else remove_recompute)(tiny_model)
        with kernels.training_attention():
            loss = tiny_model(ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None})
    remove_recompute(tiny_model)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_removing_recompute_leaves_other_forwards_of_the_instance():
    """Expert parallelism replaces a ``GroupedExperts``' forward on the instance too: only the layers' go."""
    lm = LanguageModel(_text_config())
    apply_expert_parallel(lm, _Group(2, 0))
    apply_recompute(lm)
    remove_recompute(lm)
    assert not recomputed(lm)
    experts = [m.mlp.experts for m in lm.model.layers[1:]]
    assert experts and all("forward" in vars(e) for e in experts)
