import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from kimivl.model.target_logprobs import target_logprobs


def reference(hidden, weight, targets):
    """The full log-softmax, in float32 or in float64 for float64 inputs."""
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


def grads(fn, hidden, weight, targets, upstream):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fn(h, w, targets)
    (out * upstream).sum().backward()
    return out.detach(), h.grad, w.grad


@pytest.mark.parametrize("limit", [1, 7 * 50, 10**9])  # one row per chunk, uneven chunks, the plain path
def test_equals_full_log_softmax_with_gradients(limit):
    torch.manual_seed(0)
    hidden, weight = torch.randn(23, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    targets, upstream = torch.randint(0, 50, (23,)), torch.randn(23, dtype=torch.float64)
    want = grads(reference, hidden, weight, targets, upstream)
    got = grads(lambda h, w, t: target_logprobs(h, w, t, limit=limit), hidden, weight, targets, upstream)
    for a, b in zip(got, want):  # float64 throughout (the log-probs were float32)
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_chunks_skip_the_gradient_of_a_frozen_input(frozen):
    """With a frozen head, backward still allocated the head's (vocab, D) float32 gradient and multiplied it out: a
    third of its matmul work wasted. The other input's gradient is unchanged, and the frozen one gets none."""
    torch.manual_seed(3)
    n, v, d = 23, 50, 16
    hidden, weight = torch.randn(n, d, dtype=torch.float64), torch.randn(v, d, dtype=torch.float64)
    targets, upstream = torch.randint(0, v, (n,)), torch.randn(n, dtype=torch.float64)
    _, want_hidden, want_weight = grads(reference, hidden, weight, targets, upstream)
    h, w = hidden.clone().requires_grad_(frozen != "hidden"), weight.clone().requires_grad_(frozen != "weight")
    out = target_logprobs(h, w, targets, limit=7 * v)
    with FlopCounterMode(display=False) as flops:
        (out * upstream).sum().backward()
    assert flops.get_total_flops() == 2 * (2 * n * v * d)  # the logits again, and the one gradient asked for
    if frozen == "weight":
        assert w.grad is None
        torch.testing.assert_close(h.grad, want_hidden, rtol=1e-12, atol=1e-12)
    else:
        assert h.grad is None
        torch.testing.assert_close(w.grad, want_weight, rtol=1e-12, atol=1e-12)


def test_chunks_follow_autocast_like_the_linear_head():
    torch.manual_seed(1)
    hidden, weight = torch.randn(40, 32), torch.randn(64, 32)
    targets, upstream = torch.randint(0, 64, (40,)), torch.randn(40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = grads(reference, hidden, weight, targets, upstream)
        got = grads(lambda h, w, t: target_logprobs(h, w, t, limit=64 * 6), hidden, weight, targets, upstream)
    torch.testing.assert_close(got[0], want[0])  # the same bf16 logits, log-softmax in float32
    for a, b in zip(got[1:], want[1:]):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02 * b.abs().max().item())


def test_memory_stays_within_the_limit():
    hidden, weight = torch.randn(4096, 8, requires_grad=True), torch.randn(4096, 8, requires_grad=True)
    targets = torch.randint(0, 4096, (4096,))
    seen = []

    def pack(t):
        if t.dim() == 2 and t.shape[1] == 4096 and t.dtype == torch.float32 and t.shape[0] == 4096:
            seen.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = target_logprobs(hidden, weight, targets, limit=4096 * 64)
    out.sum().backward()
    assert not seen  # no (positions, vocab) tensor kept for backward
    assert hidden.grad.shape == hidden.shape and weight.grad.abs().sum() > 0


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r"hidden \(3, 4\) and targets \(2,\) disagree"):
        target_logprobs(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"hidden \(2, 3, 4\) and targets \(2, 2\) disagree"):
        target_logprobs(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"hidden \(4,\) and targets \(\) disagree"):
        target_logprobs(torch.zeros(4), torch.zeros(5, 4), torch.zeros((), dtype=torch.long))


@pytest.mark.parametrize("limit", [7 * 50, 10**9])  # chunks, the plain path
def test_batched_positions_keep_their_shape(limit):
    """(B, S, D) hidden states with (B, S) targets were taken for (N,) positions: a (B, 1, S) result, and in chunks
    the wrong rows' logits."""
    torch.manual_seed(2)
    hidden, weight = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    targets, upstream = torch.randint(0, 50, (3, 5)), torch.randn(3, 5, dtype=torch.float64)

    def flat_reference(h, w, t):
        return reference(h.reshape(-1, 16), w, t.reshape(-1)).reshape(t.shape)

    want = grads(flat_reference, hidden, weight, targets, upstream)
    got = grads(lambda h, w, t: target_logprobs(h, w, t, limit=limit), hidden, weight, targets, upstream)
    assert got[0].shape == (3, 5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("limit", [7 * 50, 10**9])
def test_a_head_with_a_bias_or_a_hook_is_called(limit):
    """Only a plain bias-free ``nn.Linear`` is read as its weight; a bias, or a hook, takes part in the logits."""
    torch.manual_seed(4)
    hidden, targets = torch.randn(23, 16), torch.randint(0, 50, (23,))
    biased, hooked = torch.nn.Linear(16, 50), torch.nn.Linear(16, 50, bias=False)
    hooked.register_forward_hook(lambda m, i, out: out * 2)
    for head in (biased, hooked):
        want = F.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
        torch.testing.assert_close(target_logprobs(hidden, head, targets, limit=limit), want)
