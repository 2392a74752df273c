"""Multimodal sequence packing: encoded samples laid end to end in one row of at most ``budget`` tokens.

Samples never attend to each other (``cu_seqlens``), positions restart per sample, and each sample's first label
is ignored, so no token is ever predicted from another sample (``KimiVL.forward`` ignores it as well; set here, the
labels are the ones scored, which ``heldout_loss`` counts). Images travel with their samples, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kimivl.processing.processor import IGNORE_INDEX, Encoded


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (1, T)
    labels: torch.Tensor  # (1, T)
    cu_seqlens: torch.Tensor  # (samples + 1,) int32
    pixel_values: torch.Tensor | None  # (patches, 3, 14, 14)
    image_grid_hws: torch.Tensor | None  # (images, 2)
    budget: int

    @property
    def n_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def efficiency(self) -> float:
        """Share of the token budget holding real tokens."""
        return self.n_tokens / self.budget

    def kwargs(self) -> dict:
        """Keyword arguments for ``KimiVL.forward``."""
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "cu_seqlens": self.cu_seqlens,
            "pixel_values": self.pixel_values,
            "image_grid_hws": self.image_grid_hws,
        }


def pack(samples: list[Encoded], budget: int) -> PackedBatch:
    """One row holding ``samples`` (their total length must fit ``budget``)."""
    total = sum(len(s.input_ids) for s in samples)
    if not samples or total > budget:
        raise ValueError(f"cannot pack {len(samples)} samples of {total} tokens into a budget of {budget}")
    ids, labels, lengths = [], [], [0]
    for s in samples:
        if s.labels is None:
            raise ValueError("packing needs samples with labels (encode_for_training)")
        ids += s.input_ids
        labels += [IGNORE_INDEX] + s.labels[1:]
        lengths.append(len(s.input_ids))
    with_images = [s for s in samples if len(s.image_grid_hws)]
    pixels = torch.cat([s.pixel_values for s in with_images]) if with_images else None
    grids = torch.cat([s.image_grid_hws for s in with_images]) if with_images else None
    return PackedBatch(
        torch.tensor([ids]),
        torch.tensor([labels]),
        torch.tensor(lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32),
        pixels,
        grids,
        budget,
    )
