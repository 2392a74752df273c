"""The vision tower's collectives lined up across ranks.

Under FSDP each vision block is a unit: its forward all-gathers its weights, its backward reduce-scatters their
gradients, on every rank of the group together. ``KimiVL.embed`` runs the tower only for a row with images, so when
one rank's row has images and another's has none, the ranks' collectives no longer match (gloo stops with "collective
mismatch", nccl hangs). Before each sharded forward the ranks agree whether any of them has images; a rank without
runs the tower and projector on one blank image of the smallest grid and adds 0 x its features to the loss, so it
makes the same collectives in the same order, and its gradients gain exact zeros. When the language model is frozen,
only a row with images back-propagates through its layers (to reach the projector); the rank without adds that 0 to
its token embeddings too (``pad_embeddings``), so its backward also runs through every layer, as the others' does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from kimivl.distributed.world import World, max_over_ranks


def has_images(pixel_values: torch.Tensor | None) -> bool:
    """Whether a forward's ``pixel_values`` hold any patch."""
    return pixel_values is not None and pixel_values.shape[0] > 0


def vision_pad(model: nn.Module, world: World, images: bool) -> torch.Tensor:
    """0, to add to the loss of the forward that follows: on a rank whose forward has no ``images`` while another
    rank's has some, 0 x the embedding of a blank image (through the tower and projector, collectives included).
    Call it before that forward, so that its backward runs after the forward's, as the tower's does on the ranks
    with images. One process, or a model without ``embed`` (the vit stage's tower, whose rows all hold images): a
    plain 0, no collective."""
    zero = torch.zeros((), device=world.device)
    if not world.active or not hasattr(model, "embed"):
        return zero
    if max_over_ranks(int(images), world) == 0 or images:
        return zero
    vision = model.config.vision_config
    kh, kw = vision.merge_kernel_size
    p = vision.patch_size
    pixels = torch.zeros(kh * kw, 3, p, p, device=world.device)
    grid = torch.tensor([[kh, kw]], device=world.device)
    ids = torch.full((1, 1), model.config.media_placeholder_token_id, device=world.device)  # its one merged feature
    return model.embed(ids, pixels, grid).float().sum() * 0.0


@contextlib.contextmanager
def pad_embeddings(model: nn.Module, pad: torch.Tensor) -> Iterator[None]:
    """The forwards of the block add ``vision_pad``'s ``pad`` to their token embeddings, when it is one (it requires
    grad): their backward then runs through the language model's layers, frozen or not, as a row with images does on
    another rank (their values are unchanged, 0 added)."""
    if not pad.requires_grad:
        yield
        return
    hook = model.language_model.model.embed_tokens.register_forward_hook(lambda m, args, out: out + pad.to(out.dtype))
    try:
        yield
    finally:
        hook.remove()
