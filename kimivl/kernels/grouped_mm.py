"""Routed experts as two grouped matmuls over the tokens sorted by expert (``torch._grouped_mm``), on any device.

Grouped matmuls are not autocast ops, so autocast is followed by hand. On CPU each expert's rows are padded to a
power of two below ``CPU_GROUP_ROWS`` and to a multiple of it above: the CPU kernel prepares one plan per distinct
group size, which costs more than the multiply itself when sizes change every batch; rounded sizes recur, and a
decoding step's one or few rows per expert are not padded to 32. Float64, and widths whose rows are not multiples of
16 bytes, run one matmul per expert instead (``torch._grouped_mm`` takes neither); so does any dtype but bf16 under
``torch.compile``, whose shape function for ``torch._grouped_mm`` takes bf16 alone (the CPU kernel takes float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CPU_GROUP_ROWS = 32


def grouped_swiglu(
    x_TD: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor, gate_up_E2ID: torch.Tensor, down_EDI: torch.Tensor
) -> torch.Tensor:
    """sum over k of ``w_TK`` * down_e(silu(gate_e(x)) * up_e(x)) with e = ``idx_TK``, for stacked expert weights
    ``gate_up_E2ID`` ([gate; up] rows) and ``down_EDI``; returns (T, D) in ``x_TD``'s dtype."""
    t, k = idx_TK.shape
    flat_idx = idx_TK.reshape(-1)
    order = flat_idx.argsort(stable=True)
    counts = torch.bincount(flat_idx, minlength=gate_up_E2ID.shape[0])
    token, weight = order // k, w_TK.reshape(-1)[order]
    source = x_TD
    if not x_TD.is_cuda:
        counts, token, weight = _pad_groups(counts, token, weight, flat_idx[order], t)
        source = F.pad(x_TD, (0, 0, 0, 1))  # row t: zeros, for the padding slots
    offsets = counts.cumsum(0).to(torch.int32)
    device = x_TD.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_TD.dtype
    x_ND = source.index_select(0, token).to(dtype)
    gate_up_N2I = _grouped_mm(x_ND, gate_up_E2ID.to(dtype).transpose(1, 2), offsets)
    gate, up = gate_up_N2I.chunk(2, dim=-1)
    # the routing weight scales the hidden activation (down_proj is linear): no full-width float32 copy
    h_NI = F.silu(gate) * up * weight[:, None].to(dtype)
    y_ND = _grouped_mm(h_NI, down_EDI.to(dtype).transpose(1, 2), offsets)
    return torch.zeros_like(source).index_add_(0, token, y_ND.to(x_TD.dtype))[:t]


def _grouped_mm(x_NK: torch.Tensor, w_EKM: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of group e (ending at ``offsets[e]``) times ``w_EKM[e]``: ``torch._grouped_mm``, or one matmul per group
    where it cannot: in float64, which it does not multiply, and where a row of ``x_NK`` or ``w_EKM`` is not a
    multiple of 16 bytes (e.g. a hidden size not a multiple of 8 in bf16), which it requires; under ``torch.compile``
    in any dtype but bf16, the only one the compiler's shape function for ``torch._grouped_mm`` takes."""
    aligned = all(s * t.element_size() % 16 == 0 for t in (x_NK, w_EKM) for s in t.stride() if s != 1)
    if torch.compiler.is_compiling():
        takes_dtype = x_NK.dtype == torch.bfloat16
    else:
        takes_dtype = x_NK.dtype != torch.float64
    if takes_dtype and aligned:
        return torch._grouped_mm(x_NK, w_EKM, offs=offsets)
    ends = offsets.tolist()
    return torch.cat([x_NK[a:b] @ w_EKM[e] for e, (a, b) in enumerate(zip([0, *ends], ends))])


def _pad_groups(counts, token, weight, expert, t):
    """Each expert's run of rows padded (with token ``t``, a zero row, and weight 0) to the next power of two up to
    ``CPU_GROUP_ROWS``, beyond it to a multiple of ``CPU_GROUP_ROWS``; the padding rows contribute nothing."""
    power = torch.where(counts > 1, 2 ** torch.log2(counts.clamp(min=1)).ceil().long(), counts)
    whole = (counts + CPU_GROUP_ROWS - 1) // CPU_GROUP_ROWS * CPU_GROUP_ROWS
    padded = torch.where(counts > CPU_GROUP_ROWS, whole, power)
    rank = torch.arange(len(token), device=token.device) - (counts.cumsum(0) - counts)[expert]
    slot = (padded.cumsum(0) - padded)[expert] + rank
    total = int(padded.sum())
    token_padded = token.new_full((total,), t).index_copy(0, slot, token)
    weight_padded = weight.new_zeros(total).index_copy(0, slot, weight)
    return padded, token_padded, weight_padded
