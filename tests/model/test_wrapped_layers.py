"""Layers that fast paths read by weight (kv_b_proj in a one-token cached step, the LM head in the loss, the patch
embedding's conv) are called instead when wrapped (a LoRA adapter) or hooked: the wrapper's update and the hooks
were silently left out. A plain model keeps the fast paths, bit for bit."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kimivl.inference.cache import MLACache
from kimivl.model.mla import MLA
from kimivl.model.plain import plain_layer
from kimivl.model.target_logprobs import next_token_loss, target_logprobs


class LoRA(nn.Module):
    """A LoRA-style adapter as peft builds one: the base layer plus a low-rank update; ``weight`` is the base's."""

    def __init__(self, base: nn.Linear, rank: int = 4):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.up.weight, std=0.05)  # a trained adapter (peft starts it at zero)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


class Shifted(nn.Linear):
    """A subclass of ``nn.Linear`` that adds a term: its ``weight`` alone is not what it computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 0.1


def shifted(base: nn.Linear) -> Shifted:
    layer = Shifted(base.in_features, base.out_features, bias=base.bias is not None)
    layer.load_state_dict(base.state_dict())
    return layer


def image_batch(grids, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(h * w for h, w in grids), 3, 14, 14, generator=g), torch.tensor(grids)


def decode_step_gap(model, ids):
    """Max |logits of a one-token cached step - the full forward's last logits|, and how often ``_absorbed`` ran."""
    lm, calls = model.language_model, []
    absorbed = MLA._absorbed
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(MLA, "_absorbed", lambda self, *a: calls.append(1) or absorbed(self, *a))
        cache = MLACache(model.config.text_config, 1, ids.shape[1])
        lm(model.embed(ids[:, :-1]), cache=cache)
        step = lm.logits(lm(model.embed(ids[:, -1:]), cache=cache))[0, -1]
        full = model(ids).logits[0, -1]
    return (step - full).abs().max().item(), len(calls)


@pytest.mark.parametrize("wrap", [LoRA, shifted])
def test_a_decode_step_calls_a_wrapped_kv_b_proj(tiny_model, wrap):
    ids = torch.randint(0, 3000, (1, 9), generator=torch.Generator().manual_seed(0))
    gap, absorbed = decode_step_gap(tiny_model, ids)
    layers = tiny_model.language_model.model.layers
    assert gap < 1e-5 and absorbed == len(layers)  # a plain model still takes the absorbed step
    for layer in layers:
        layer.self_attn.kv_b_proj = wrap(layer.self_attn.kv_b_proj)
    gap, absorbed = decode_step_gap(tiny_model, ids)
    assert gap < 1e-5 and absorbed == 0  # was 0.35: the adapter was left out of every decoding step


def test_a_forward_hook_on_kv_b_proj_fires_on_decode_steps(tiny_model):
    ids = torch.randint(0, 3000, (1, 6), generator=torch.Generator().manual_seed(1))
    kv_b_proj = tiny_model.language_model.model.layers[0].self_attn.kv_b_proj
    seen = []
    handle = kv_b_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    gap, absorbed = decode_step_gap(tiny_model, ids)
    handle.remove()
    assert gap < 1e-5 and absorbed == len(tiny_model.language_model.model.layers) - 1
    assert seen[0] == 5 and len(seen) > 2  # the prefill, the step's expansion of the cache, the full forward


def test_a_global_hook_sends_layers_down_the_called_path():
    linear = nn.Linear(3, 4)
    assert plain_layer(linear, nn.Linear) and not plain_layer(linear, nn.Conv2d)
    assert not plain_layer(LoRA(linear), nn.Linear) and not plain_layer(shifted(linear), nn.Linear)
    module = nn.modules.module
    for register in (
        module.register_module_forward_hook,
        module.register_module_forward_pre_hook,
        module.register_module_full_backward_hook,
        module.register_module_full_backward_pre_hook,
        linear.register_forward_pre_hook,
        linear.register_full_backward_hook,
    ):
        handle = register(lambda *args: None)
        assert not plain_layer(linear, nn.Linear), register
        handle.remove()
    assert plain_layer(linear, nn.Linear)


def test_the_loss_from_labels_goes_through_a_wrapped_lm_head(tiny_model):
    ids = torch.randint(0, 3000, (2, 10), generator=torch.Generator().manual_seed(2))
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.3, -100)
    head = tiny_model.language_model.lm_head
    out = tiny_model(ids, labels=labels)  # a plain head: the loss is still the fast path's, bit for bit
    assert torch.equal(out.loss, next_token_loss(out.hidden_states, head.weight, labels))
    tiny_model.language_model.lm_head = adapter = LoRA(head)
    loss = tiny_model(ids, labels=labels).loss
    logits = tiny_model(ids, labels=labels, return_logits=True).logits
    scored = labels[:, 1:] != -100
    want = F.cross_entropy(logits[:, :-1][scored], labels[:, 1:][scored])
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)  # was 0.019 apart: the adapter was left out
    loss.backward()
    assert adapter.down.weight.grad is not None and adapter.down.weight.grad.abs().sum() > 0  # had no gradient


@pytest.mark.parametrize("limit", [7 * 50, None])  # chunked, plain
def test_target_logprobs_read_a_plain_head_and_call_a_wrapped_one(limit):
    torch.manual_seed(0)
    hidden, targets = torch.randn(23, 16), torch.randint(0, 50, (23,))
    head = nn.Linear(16, 50, bias=False)
    assert torch.equal(
        target_logprobs(hidden, head, targets, limit), target_logprobs(hidden, head.weight, targets, limit)
    )
    for other in (LoRA(head), nn.Linear(16, 50)):  # a wrapper, and a head with a bias (the weight path has none)
        want = F.log_softmax(other(hidden), -1).gather(-1, targets[:, None])[:, 0]
        torch.testing.assert_close(target_logprobs(hidden, other, targets, limit), want, rtol=1e-6, atol=1e-6)


def test_a_hook_on_the_patch_embedding_fires_and_edits(tiny_model):
    pv, grids = image_batch([(4, 6), (2, 2)])
    proj = tiny_model.vision_tower.patch_embed.proj
    with torch.no_grad():
        plain = tiny_model.get_image_features(pv, grids)
        x_NC = F.linear(pv.flatten(1), proj.weight.flatten(1), proj.bias)  # the fast path, kept for a plain conv
        assert torch.equal(
            tiny_model.vision_tower.patch_embed(pv, [(4, 6), (2, 2)]),
            tiny_model.vision_tower.patch_embed.pos_emb(x_NC, [(4, 6), (2, 2)]),
        )
        seen = []
        handle = proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        torch.testing.assert_close(tiny_model.get_image_features(pv, grids), plain, rtol=1e-5, atol=1e-5)
        handle.remove()
        assert seen == [(28, proj.out_channels, 1, 1)]  # never fired
        handle = proj.register_forward_hook(lambda mod, args, out: out * 0)
        zeroed = tiny_model.get_image_features(pv, grids)
        handle.remove()
    assert (zeroed - plain).abs().max() > 1e-2  # the zeroing hook was ignored
