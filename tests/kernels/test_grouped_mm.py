"""kimivl.kernels.grouped_mm: the routed experts' grouped matmuls, CPU row padding and autocast."""

import pytest
import torch
import torch.nn.functional as F

from kimivl.kernels.grouped_mm import CPU_GROUP_ROWS, _pad_groups, grouped_swiglu


def test_pad_groups_rounds_each_expert_up_with_empty_rows():
    """Small groups go up to a power of two (a decoding step's single rows stay single), larger ones to a multiple
    of CPU_GROUP_ROWS; padding slots take the zero row ``t`` with weight 0 after each expert's own rows."""
    assert CPU_GROUP_ROWS == 32
    counts = torch.tensor([3, 0, 33, 1, 17, 32])
    expert = torch.repeat_interleave(torch.arange(6), counts)
    token = torch.arange(86)
    weight = torch.ones(86)
    padded, token_p, weight_p = _pad_groups(counts, token, weight, expert, t=99)
    assert padded.tolist() == [4, 0, 64, 1, 32, 32]
    assert token_p[:4].tolist() == [0, 1, 2, 99]
    assert token_p[4:68].tolist() == list(range(3, 36)) + [99] * 31
    assert token_p[68:69].tolist() == [36]
    assert token_p[69:101].tolist() == list(range(37, 54)) + [99] * 15
    assert token_p[101:].tolist() == list(range(54, 86))
    assert weight_p.sum() == 86 and (weight_p[token_p == 99] == 0).all()


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


def test_grouped_swiglu_with_few_rows_per_expert_matches_a_per_token_loop():
    """Decode-sized batches (one to five tokens over 16 experts: groups of 1-3 rows, padded to 1, 2 or 4)."""
    g = torch.Generator().manual_seed(1)
    gate_up, down = torch.randn(16, 2 * 8, 16, generator=g) / 4, torch.randn(16, 16, 8, generator=g) / 3
    for tokens in (1, 2, 5):
        x = torch.randn(tokens, 16, generator=g)
        idx = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(tokens)])
        idx[:, 0] = 3  # one expert chosen by every token
        w = torch.rand(tokens, 4, generator=g)
        expected = torch.zeros_like(x)
        for t in range(tokens):
            for e, weight in zip(idx[t].tolist(), w[t]):
                gate, up = (gate_up[e] @ x[t]).chunk(2)
                expected[t] += weight * (down[e] @ (F.silu(gate) * up))
        torch.testing.assert_close(grouped_swiglu(x, idx, w, gate_up, down), expected, rtol=1e-4, atol=1e-5)


def test_grouped_swiglu_multiplies_float64_which_grouped_mm_does_not():
    """A float64 model loaded and saved, but every MoE layer's forward failed (torch._grouped_mm has no float64)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 16, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 5, (9, 2), generator=g)
    idx[:, 1] = (idx[:, 0] + 1) % 5  # two distinct experts per token; expert 4 may get none
    w = torch.rand(9, 2, generator=g, dtype=torch.float64)
    gate_up = torch.randn(5, 2 * 8, 16, generator=g, dtype=torch.float64) / 4
    down = torch.randn(5, 16, 8, generator=g, dtype=torch.float64) / 3
    got = grouped_swiglu(x, idx, w, gate_up, down)
    expected = torch.zeros_like(x)
    for t in range(9):
        for e, weight in zip(idx[t].tolist(), w[t]):
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            expected[t] += weight * (down[e] @ (F.silu(gate) * up))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim,hidden", [(12, 8), (16, 6), (10, 5)])
def test_sizes_grouped_mm_cannot_stride_run_per_group(dtype, dim, hidden):
    """torch._grouped_mm wants rows of 16 bytes: a hidden size or expert width not a multiple of 8 (bf16) or 4
    (float32) raised "strides should be multiple of 16 bytes"; such sizes run one matmul per expert instead."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, dim, generator=g)
    idx = torch.randint(0, 4, (11, 2), generator=g)
    idx[:, 1] = (idx[:, 0] + 1) % 4
    w = torch.rand(11, 2, generator=g)
    gate_up, down = torch.randn(4, 2 * hidden, dim, generator=g) / 4, torch.randn(4, dim, hidden, generator=g) / 3
    x, w, gate_up, down = (t.to(dtype) for t in (x, w, gate_up, down))
    expected = torch.zeros(11, dim, dtype=torch.float64)  # one token at a time, in float64 from the same values
    for t in range(11):
        for e, weight in zip(idx[t].tolist(), w[t].double()):
            gate, up = (gate_up[e].double() @ x[t].double()).chunk(2)
            expected[t] += weight * (down[e].double() @ (F.silu(gate) * up))
    got = grouped_swiglu(x, idx, w, gate_up, down)
    assert got.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_under_compile_only_bf16_takes_grouped_mm(monkeypatch, dtype):
    """The compiler's shape function for ``torch._grouped_mm`` takes bf16 alone, so ``torch.compile`` of a float32
    model failed ("Expected inputs of BF16 type"): while compiling, other dtypes run one matmul per expert."""
    g = torch.Generator().manual_seed(4)
    x, idx, w = torch.randn(20, 16, generator=g), torch.randint(0, 4, (20, 2), generator=g), torch.rand(20, 2)
    gate_up, down = torch.randn(4, 16, 16, generator=g) / 4, torch.randn(4, 16, 8, generator=g) / 3
    x, gate_up, down = x.to(dtype), gate_up.to(dtype), down.to(dtype)
    eager = grouped_swiglu(x, idx, w, gate_up, down)
    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiling = grouped_swiglu(x, idx, w, gate_up, down)
    assert len(calls) == (2 if dtype == torch.bfloat16 else 0)
    torch.testing.assert_close(compiling, eager, rtol=1e-5, atol=1e-6)
