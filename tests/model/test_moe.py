import torch
import torch.nn.functional as F

from kimivl.model.moe import GroupedExperts


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
