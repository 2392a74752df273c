"""kimivl.kernels.grouped_mm: the routed experts' grouped matmuls, CPU row padding and autocast."""

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
