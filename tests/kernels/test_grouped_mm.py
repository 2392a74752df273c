"""kimivl.kernels.grouped_mm: the routed experts' grouped matmuls, CPU row padding, autocast, and the per-expert
matmuls of CPU inference on few tokens."""

import pytest
import torch
import torch.nn.functional as F

from kimivl.kernels.grouped_mm import CPU_GROUP_ROWS, _pad_groups, grouped_swiglu


def test_pad_groups_rounds_each_expert_up_with_empty_rows():
    counts = torch.tensor([3, 0, 33])
    expert = torch.tensor([0] * 3 + [2] * 33)
    token = torch.arange(36)
    weight = torch.ones(36)
    padded, token_p, weight_p = _pad_groups(counts, token, weight, expert, t=99)
    assert padded.tolist() == [CPU_GROUP_ROWS, 0, 2 * CPU_GROUP_ROWS]
    assert token_p[:3].tolist() == [0, 1, 2] and set(token_p[3:CPU_GROUP_ROWS].tolist()) == {99}
    assert token_p[CPU_GROUP_ROWS : CPU_GROUP_ROWS + 33].tolist() == list(range(3, 36))
    assert weight_p.sum() == 36 and (weight_p[token_p == 99] == 0).all()


def test_grouped_swiglu_follows_autocast_and_returns_the_input_dtype():
    """Under bf16 autocast the grouped matmuls run in bf16 (float32 weights and inputs are cast), the result comes
    back in the input's dtype, within bf16 rounding of the float32 result."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g)
    idx = torch.randint(0, 3, (40, 2), generator=g)
    w = torch.rand(40, 2, generator=g)
    gate_up, down = torch.randn(3, 2 * 8, 16, generator=g) / 4, torch.randn(3, 16, 8, generator=g) / 3
    want = grouped_swiglu(x, idx, w, gate_up, down)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grouped_swiglu(x, idx, w, gate_up, down)
    assert got.dtype == torch.float32
    assert (got - want).norm() / want.norm() < 0.02
    expected = torch.zeros_like(x)  # one token at a time, in float32
    for t in range(40):
        for e, weight in zip(idx[t].tolist(), w[t]):
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            expected[t] += weight * (down[e] @ (F.silu(gate) * up))
    torch.testing.assert_close(want, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_few_picks_without_gradients_take_one_matmul_pair_per_expert(monkeypatch, bf16):
    """CPU inference whose tokens pick at most as many experts as there are skips the grouped kernel; it gives what
    the grouped path gives (float32 to rounding, under bf16 autocast to bf16 rounding). More picks, or gradients on,
    take the grouped kernel."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, generator=g)
    idx = torch.tensor([[0, 4], [4, 1], [3, 0]])  # 6 picks of 5 experts; expert 2 gets no token
    w = torch.rand(3, 2, generator=g)
    gate_up, down = torch.randn(5, 2 * 8, 16, generator=g) / 4, torch.randn(5, 16, 8, generator=g) / 3
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def run(rows: int, grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return grouped_swiglu(x[:rows], idx[:rows], w[:rows], gate_up, down)

    per_expert = run(2, grad=False)  # 4 picks
    assert not calls and per_expert.dtype == torch.float32
    grouped = run(2, grad=True)
    assert len(calls) == 2
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_expert, grouped, **tol)
    torch.testing.assert_close(run(3, grad=False), run(3, grad=True), rtol=0, atol=0)  # 6 picks: grouped, both
    assert len(calls) == 6
