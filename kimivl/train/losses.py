"""Training losses: SigLIP's pairwise sigmoid loss and DeepSeek-V3's sequence-wise expert-balance loss, both in
float32. The captioning (next-token) loss is ``kimivl.model.target_logprobs.next_token_loss``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def siglip_loss(
    img_emb_ND: torch.Tensor, txt_emb_ND: torch.Tensor, log_temp: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Sigmoid loss over all image-text pairs of a batch whose i-th image and i-th text match.

    Embeddings are L2-normalised here; z_ij = exp(log_temp) * x_i . y_j + bias, label +1 on the diagonal and -1
    elsewhere; loss = -sum_ij log sigmoid(label_ij * z_ij) / n (the SigLIP paper's per-image normalisation).
    The paper initialises log_temp = log(10) and bias = -10.
    """
    if img_emb_ND.shape != txt_emb_ND.shape or img_emb_ND.dim() != 2:
        raise ValueError(
            f"siglip_loss needs image and text embeddings of one shape (n, d), got "
            f"{tuple(img_emb_ND.shape)} and {tuple(txt_emb_ND.shape)}"
        )
    x_ND = F.normalize(img_emb_ND.float(), dim=-1)
    y_ND = F.normalize(txt_emb_ND.float(), dim=-1)
    z_NN = x_ND @ y_ND.T * log_temp.float().exp() + bias.float()
    n = z_NN.shape[0]
    labels_NN = 2 * torch.eye(n, device=z_NN.device) - 1
    return -F.logsigmoid(labels_NN * z_NN).sum() / n


def sequence_aux_loss(
    scores_TE: torch.Tensor,
    idx_TK: torch.Tensor,
    seq_lens: torch.Tensor | list[int],
    n_experts: int,
    top_k: int,
    alpha: float,
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss for one MoE layer.

    ``scores_TE`` are the router's unbiased sigmoid scores and ``idx_TK`` its chosen experts for T tokens that
    ``seq_lens`` splits, in order, into sequences. Per sequence of T_s tokens: f_i = E / (K * T_s) * (tokens
    choosing expert i), P_i = mean over its tokens of s_ti / sum_j s_tj; loss = alpha * sum_i f_i * P_i, averaged
    over sequences. Only P carries gradient (f counts choices).
    """
    t, e = scores_TE.shape
    lens_S = torch.as_tensor(seq_lens, device=scores_TE.device, dtype=torch.long)
    if e != n_experts or idx_TK.shape != (t, top_k):
        raise ValueError(
            f"expected scores (T, {n_experts}) and expert ids (T, {top_k}), got "
            f"{tuple(scores_TE.shape)} and {tuple(idx_TK.shape)}"
        )
    if lens_S.dim() != 1 or bool((lens_S <= 0).any()) or int(lens_S.sum()) != t:
        raise ValueError(f"seq_lens must be positive lengths summing to the {t} tokens, got {lens_S.tolist()}")
    n_seq = lens_S.numel()
    seq_T = torch.repeat_interleave(torch.arange(n_seq, device=scores_TE.device), lens_S, output_size=t)
    counts_SE = torch.zeros(n_seq, e, device=scores_TE.device)
    counts_SE.index_put_((seq_T[:, None].expand(t, top_k), idx_TK), torch.ones(()).to(counts_SE), accumulate=True)
    f_SE = counts_SE * (e / top_k) / lens_S[:, None]
    probs_TE = scores_TE.float() / scores_TE.float().sum(-1, keepdim=True)
    p_SE = torch.zeros(n_seq, e, device=scores_TE.device).index_add(0, seq_T, probs_TE) / lens_S[:, None]
    return alpha * (f_SE * p_SE).sum(-1).mean()
