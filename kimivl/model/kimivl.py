"""KimiVL: MoonViT + projector + language model; image features replace the placeholder tokens' embeddings."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kimivl.checkpoint import (
    CONFIG,
    _read_headers,
    check_directory,
    check_save_arguments,
    checkpoint_files,
    load_checkpoint,
    save_checkpoint,
    write_error,
)
from kimivl.checkpoint import check_tensors as check_checkpoint_tensors
from kimivl.config import KimiVLConfig
from kimivl.devices import check_device
from kimivl.model.init import init_weights
from kimivl.model.language_model import LanguageModel, check_cu_seqlens, is_integer, positions_from_cu_seqlens
from kimivl.model.moe import Router, to_dtype
from kimivl.model.moonvit import MoonViT, patch_merge
from kimivl.model.projector import Projector
from kimivl.model.target_logprobs import next_token_loss
from kimivl.precision import held_dtype, stored_dtype


@dataclass
class KimiVLOutput:
    logits: torch.Tensor | None  # (B, S, V) float32; None when a loss alone was asked for
    loss: torch.Tensor | None = None  # mean next-token cross-entropy over labels != ignore_index
    hidden_states: torch.Tensor | None = None  # (B, S, D) after the final norm


def check_placeholder_runs(is_media_BS: torch.Tensor, tokens_M: torch.Tensor) -> None:
    """Each run of image placeholders (consecutive ones, not across rows) must hold whole images, the M images (of
    ``tokens`` placeholders each) filling the runs in order, row after row: a count that only agrees in total would
    put one image's features in another's slots."""
    before = F.pad(is_media_BS[:, :-1], (1, 0))  # the token before is a placeholder too
    after = F.pad(is_media_BS[:, 1:], (0, 1))
    starts = (is_media_BS & ~before).flatten().nonzero()[:, 0]
    lengths = (is_media_BS & ~after).flatten().nonzero()[:, 0] + 1 - starts
    run_ends, image_ends = lengths.cumsum(0), tokens_M.to(lengths.device).cumsum(0)
    split = ~torch.isin(run_ends, image_ends)  # a run that ends inside an image
    if not split.any():
        return
    i = int(split.nonzero()[0])
    image = int((image_ends <= run_ends[i]).sum())  # the image the run ends in
    row, column = divmod(int(starts[i]), is_media_BS.shape[1])
    raise ValueError(
        f"placeholder run {i} (row {row}, from position {column}, {int(lengths[i])} tokens) ends inside image {image}, "
        f"which needs {int(tokens_M[image])} placeholder tokens: each image's (h/2)*(w/2) placeholders must lie in "
        "one run, the images in the order of the runs, row after row"
    )


def check_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """``load_checkpoint``'s checks of the checkpoint at ``path`` against ``model`` while it is on the meta device: a
    ``config.json`` whose sizes are not its weights' (a vocab_size of 1e9) is refused, naming it, before the model asks
    for terabytes. The routers are compared first: their shapes hold the config's expert count, and the whole model's
    state names each expert (minutes and gigabytes for a million)."""
    found = _read_headers(checkpoint_files(path))
    described = f"the model that {os.path.join(os.fspath(path), CONFIG)} describes"
    routers = {
        f"{name}.{attr}": getattr(module, attr)
        for name, module in model.named_modules()
        if isinstance(module, Router)
        for attr in ("weight", "e_score_correction_bias")
    }
    check_checkpoint_tensors(path, found, routers, elsewhere=found.keys(), model=described)
    check_checkpoint_tensors(path, found, model.state_dict(keep_vars=True), model=described)


FORWARD_TENSORS = {
    "input_ids": "a LongTensor (batch, seq) of token ids",
    "pixel_values": "a float tensor (num_patches, 3, 14, 14), as the processor gives",
    "image_grid_hws": "an integer tensor (num_images, 2)",
    "labels": "a LongTensor (batch, seq)",
    "position_ids": "an integer tensor (batch, seq)",
    "cu_seqlens": "an integer tensor (samples + 1,)",
    "attention_mask": "a tensor (batch, seq) of 1 and 0",
}


def check_tensors(**arguments) -> None:
    """``forward``'s tensor arguments (None or a tensor each): a list or a NumPy array is named, not met with an
    AttributeError inside."""
    for name, value in arguments.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{name} must be {FORWARD_TENSORS[name]}, got {type(value).__name__}: convert it with torch.as_tensor"
            )


class KimiVL(nn.Module):
    def __init__(self, config: KimiVLConfig):
        super().__init__()
        config.validate()  # a config changed since it was built is refused here, not when the model is saved
        self.config = config
        self.vision_tower = MoonViT(config.vision_config)
        self.multi_modal_projector = Projector(config.vision_config, config.text_config.hidden_size)
        self.language_model = LanguageModel(config.text_config)
        if self.device.type != "meta":
            self.init_weights(int(torch.randint(2**62, ())))

    def init_weights(self, seed: int, std: float | None = None, shard=None) -> None:
        """Fresh weights for training from scratch (``kimivl.model.init``, ``shard`` for a sharded model), a function
        of ``seed``; ``std`` defaults to the config's ``initializer_range``."""
        init_weights(self, seed, self.config.text_config.initializer_range if std is None else std, shard)

    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.lm_head.weight.dtype

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_hws: torch.Tensor) -> torch.Tensor:
        """Packed patches of many images -> LM-width features, (sum of h/2 * w/2, text hidden size). The tower and the
        projector each compute in their own dtype (either may be cast apart from the rest of the model)."""
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be the processor's normalised floats, got dtype {pixel_values.dtype}: run the "
                "images through KimiVLProcessor (or kimivl.processing's image transforms)"
            )
        weight = self.vision_tower.patch_embed.proj.weight
        feats_NC = self.vision_tower(pixel_values.to(weight.device, weight.dtype), image_grid_hws)
        merged_TKC = patch_merge(feats_NC, image_grid_hws, self.config.vision_config.merge_kernel_size)
        # the dtype of the projector's first op, its LayerNorm: a frozen linear_1 may be held in bf16 apart from it
        return self.multi_modal_projector(merged_TKC.to(self.multi_modal_projector.pre_norm.weight.dtype))

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_hws: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features written into the placeholder positions (no images: ``None`` or the
        empty tensors a processor gives for a text-only conversation). Each image's (h/2)*(w/2) features fill one
        run of placeholders of its own, the images in order of their runs, row after row."""
        if not is_integer(input_ids):
            raise ValueError(f"input_ids must hold token ids (integers), got dtype {input_ids.dtype}")
        if input_ids.dtype not in (torch.int32, torch.int64):  # uint8, int16 ...: a vocabulary id would wrap
            input_ids = input_ids.long()
        vocab = self.config.text_config.vocab_size
        outside = (input_ids < 0) | (input_ids >= vocab)
        is_media = input_ids == self.config.media_placeholder_token_id
        n_slots, n_outside = torch.stack([is_media.sum(), outside.sum()]).tolist()  # one synchronisation
        if n_outside:
            raise ValueError(f"input_ids must be token ids in [0, {vocab}), got {int(input_ids[outside][0])}")
        embeds = self.language_model.model.embed_tokens(input_ids)
        if pixel_values is None or pixel_values.shape[0] == 0:
            if image_grid_hws is not None and image_grid_hws.shape[0]:
                raise ValueError(f"no pixel_values for the {image_grid_hws.shape[0]} images of image_grid_hws")
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image placeholder tokens but no pixel_values were given")
            return embeds
        if image_grid_hws is None:
            raise ValueError("pixel_values given without image_grid_hws")
        feats = self.get_image_features(pixel_values, image_grid_hws)
        if feats.shape[0] != n_slots:
            raise ValueError(
                f"input_ids hold {n_slots} image placeholder tokens "
                f"(id {self.config.media_placeholder_token_id}) but the images give {feats.shape[0]} "
                "features; each image of grid (h, w) needs (h/2)*(w/2) placeholders"
            )
        kh, kw = self.config.vision_config.merge_kernel_size
        check_placeholder_runs(is_media, (image_grid_hws[:, 0] // kh) * (image_grid_hws[:, 1] // kw))
        return embeds.masked_scatter(is_media[..., None], feats.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_hws: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        return_logits: bool | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> KimiVLOutput:
        """``input_ids`` (B, S). With ``cu_seqlens`` the single row is a pack of samples that never attend to
        each other and whose positions restart at 0; each sample's first label is not scored (nothing of its sample
        comes before it). ``attention_mask`` (B, S), 1 for real tokens and 0 for padding,
        runs rows padded to one length (left or right) as each row alone: positions count from each row's first real
        token unless ``position_ids`` are given, and labels are scored only where the token and the one before it are
        real. Logits are returned unless ``labels`` are given: then the loss alone is computed, through the head at
        the labelled positions only (``next_token_loss``), unless ``return_logits=True``."""
        check_tensors(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_hws=image_grid_hws,
            labels=labels,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
            attention_mask=attention_mask,
        )
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} differs from input_ids {tuple(input_ids.shape)}")
            if not is_integer(labels):
                raise ValueError(f"labels must hold token ids (integers), got dtype {labels.dtype}")
            vocab, ignore = self.config.text_config.vocab_size, self.config.ignore_index
            labels = labels.long()  # first: compared in a narrower dtype, the vocabulary's size wraps
            outside = ((labels < 0) | (labels >= vocab)) & (labels != ignore)
            if outside.any():  # a synchronisation before anything runs
                raise ValueError(
                    f"labels must be token ids in [0, {vocab}) or {ignore} (not scored), got {int(labels[outside][0])}"
                )
        if attention_mask is not None:
            real = attention_mask.bool()
            if position_ids is None and cu_seqlens is None:
                position_ids = (real.cumsum(-1) - 1).clamp(min=0)
            if labels is not None and real.shape == labels.shape:  # another shape is refused by the language model
                labels = labels.masked_fill(~(real & F.pad(real[:, :-1], (1, 0))), self.config.ignore_index)
        if cu_seqlens is not None and labels is not None:
            check_cu_seqlens(cu_seqlens, input_ids.shape[1])  # before its bounds index the labels
            first = positions_from_cu_seqlens(cu_seqlens, input_ids.shape[1]).to(labels.device) == 0
            labels = labels.masked_fill(first, self.config.ignore_index)
        embeds = self.embed(input_ids, pixel_values, image_grid_hws)
        hidden = self.language_model(
            embeds, position_ids=position_ids, cu_seqlens=cu_seqlens, attention_mask=attention_mask
        )
        if return_logits is None:
            return_logits = labels is None
        logits = self.language_model.logits(hidden) if return_logits else None
        loss = None
        if labels is not None and logits is not None:  # already computed: no second pass through the head
            targets = labels[:, 1:]
            scored = targets != self.config.ignore_index
            if scored.any():
                loss = F.cross_entropy(logits[:, :-1][scored], targets[scored])
            else:  # nothing to score: 0 with a graph, as next_token_loss gives, not the mean of nothing (NaN)
                loss = logits.sum() * 0.0
        elif labels is not None:
            loss = next_token_loss(hidden, self.language_model.lm_head, labels, self.config.ignore_index)
        return KimiVLOutput(logits=logits, loss=loss, hidden_states=hidden)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = "cpu"
    ) -> KimiVL:
        """Load an official-format checkpoint directory (a file in it is refused, naming the directory). The model is
        built on the meta device and filled shard by shard, so weights are held once. ``dtype`` defaults to the stored
        one (the config's ``torch_dtype``; float16 becomes bfloat16 on CPU); the routers are held in float32, or in
        ``dtype`` where it is wider (``to_dtype``). The command line and the demo pick float32 on a CPU that multiplies
        bf16 slowly (``kimivl.precision.checkpoint_load_dtype``). ``device`` None is a GPU when there is one; a device
        that cannot hold it here (no GPU for ``"cuda"``, ``"meta"``) is a ``DeviceError``."""
        check_directory(path)
        device = check_device(device)
        config = KimiVLConfig.from_pretrained(path)
        with torch.device("meta"):
            model = cls(config)
        check_checkpoint(model, path)
        dtype = held_dtype(stored_dtype(config), device, dtype)
        model = to_dtype(model, dtype).to_empty(device=torch.device(device))
        load_checkpoint(model, path)
        return model.eval()

    def stored_config(self, dtype: torch.dtype | None = None) -> KimiVLConfig:
        """The config to write beside weights saved in ``dtype`` (None: as held): its ``torch_dtype`` fields (in
        text_config, and the top level's and vision_config's where it has them) name that dtype (the widest held
        outside the routers, which are held in at least float32 whatever the model's dtype), which is what
        ``from_pretrained`` loads them in."""
        routers = [m for m in self.modules() if isinstance(m, Router)]
        router_tensors = {id(t) for r in routers for t in (r.weight, r.e_score_correction_bias)}
        tensors = [*self.parameters(), *self.buffers()]
        held = (t.dtype for t in tensors if t.is_floating_point() and id(t) not in router_tensors)
        return self.config.with_weight_dtype(str(dtype or max(held, key=lambda d: d.itemsize)).removeprefix("torch."))

    def save_pretrained(
        self, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None, **frozen
    ) -> None:
        """Write ``config.json`` and safetensors weights (sharded above ``max_shard_bytes``; ``frozen``:
        ``save_checkpoint``'s ``frozen_apart`` and ``frozen_from``, for training checkpoints), in ``dtype`` (a floating
        torch dtype, as ``from_pretrained`` takes; the routers in float32 at least, ``saved_dtype``) or as held; the
        config's ``torch_dtype`` names that dtype (the widest held). Bad arguments, and a directory holding another
        model's weights or config (``save_checkpoint``), are refused before anything is written; a failed save (a full
        disk) raises ``CheckpointError``; a directory that the call created is removed again, whatever the failure."""
        check_save_arguments(max_shard_bytes, dtype)
        created = not os.path.exists(path)
        config = self.stored_config(dtype)
        try:
            save_checkpoint(self, path, max_shard_bytes=max_shard_bytes, dtype=dtype, **frozen)
            try:
                config.save_pretrained(path)
            except OSError as e:
                raise write_error(e, os.path.join(path, "config.json")) from None
        except BaseException:
            if created:
                shutil.rmtree(path, ignore_errors=True)
            raise
