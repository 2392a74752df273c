"""ViT training (stage 1): MoonViT learns from image-text pairs with L = L_siglip + 2 * L_caption.

Training-only heads around the tower: a small bidirectional text encoder for the SigLIP contrast (both sides
mean-pooled and projected to a shared width), and a small causal text decoder that cross-attends to the tower's
patch features for the captioning loss. Only the tower is kept afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kimivl.model.moonvit import MoonViT
from kimivl.model.target_logprobs import next_token_loss
from kimivl.train.losses import siglip_loss

CAPTION_WEIGHT = 2.0


@dataclass
class CaptionBatch:
    pixel_values: torch.Tensor  # (patches, 3, 14, 14)
    image_grid_hws: torch.Tensor  # (B, 2)
    text_ids: torch.Tensor  # (B, L) [BOS] caption [EOS], right-padded with pad_id
    text_mask: torch.Tensor  # (B, L) bool, True on real tokens


class ViTPretrainer(nn.Module):
    def __init__(self, tower: MoonViT, vocab_size: int, max_text_len: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        dim = tower.config.hidden_size
        self.tower = tower
        self.text_embed = nn.Embedding(vocab_size, dim)
        self.text_pos = nn.Parameter(torch.randn(max_text_len, dim) * 0.02)
        enc_layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.text_encoder = nn.TransformerEncoder(enc_layer, layers, enable_nested_tensor=False)
        dec_layer = nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.caption_decoder = nn.TransformerDecoder(dec_layer, layers)
        self.image_proj = nn.Linear(dim, dim)
        self.text_proj = nn.Linear(dim, dim)
        self.out_norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.log_temp = nn.Parameter(torch.tensor([math.log(10.0)]))  # (1,): FSDP shards no 0-dim tensor
        self.logit_bias = nn.Parameter(torch.tensor([-10.0]))

    def _patch_features(self, batch: CaptionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Tower features padded per image: (B, Nmax, C) and a (B, Nmax) bool mask of real patches."""
        feats_NC = self.tower(batch.pixel_values, batch.image_grid_hws)
        sizes = (batch.image_grid_hws[:, 0] * batch.image_grid_hws[:, 1]).tolist()
        padded = nn.utils.rnn.pad_sequence(list(feats_NC.split(sizes)), batch_first=True)
        lengths = torch.tensor(sizes, device=padded.device)
        mask = torch.arange(padded.shape[1], device=padded.device)[None] < lengths[:, None]
        return padded, mask

    def forward(self, batch: CaptionBatch) -> tuple[torch.Tensor, dict[str, float]]:
        patches_BNC, patch_mask = self._patch_features(batch)
        pooled_img = (patches_BNC * patch_mask[..., None]).sum(1) / patch_mask.sum(1, keepdim=True)
        length = batch.text_ids.shape[1]
        text_BLC = self.text_embed(batch.text_ids) + self.text_pos[:length]
        enc = self.text_encoder(text_BLC, src_key_padding_mask=~batch.text_mask)
        pooled_txt = (enc * batch.text_mask[..., None]).sum(1) / batch.text_mask.sum(1, keepdim=True)
        l_siglip = siglip_loss(self.image_proj(pooled_img), self.text_proj(pooled_txt), self.log_temp, self.logit_bias)
        causal = torch.ones(length, length, dtype=torch.bool, device=text_BLC.device).triu(1)  # True = hidden
        dec = self.caption_decoder(
            text_BLC,
            patches_BNC,
            tgt_mask=causal,
            tgt_is_causal=True,
            tgt_key_padding_mask=~batch.text_mask,
            memory_key_padding_mask=~patch_mask,
        )
        labels = batch.text_ids.masked_fill(~batch.text_mask, -100)
        l_caption = next_token_loss(self.out_norm(dec), self.lm_head, labels)
        loss = l_siglip + CAPTION_WEIGHT * l_caption
        return loss, {"siglip": l_siglip.item(), "caption": l_caption.item()}


def caption_batch(
    images: list[dict[str, torch.Tensor]], texts: list[list[int]], bos: int, eos: int, pad: int, max_len: int
) -> CaptionBatch:
    """Pack processed images (``ImageProcessor`` outputs, one image each) and tokenised captions."""
    rows = [[bos, *t[: max_len - 2], eos] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return CaptionBatch(
        torch.cat([im["pixel_values"] for im in images]),
        torch.cat([im["image_grid_hws"] for im in images]),
        ids,
        ids != pad,
    )


def vit_loss(pretrainer: ViTPretrainer, batch: CaptionBatch) -> tuple[torch.Tensor, dict[str, float], int]:
    """``train_loop`` loss function for this stage."""
    loss, values = pretrainer(batch)
    return loss, values, int(batch.text_mask.sum()) + batch.pixel_values.shape[0]
