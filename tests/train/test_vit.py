import torch
import torch.nn.functional as F
from PIL import Image

from kimivl.processing.image import ImageProcessor
from kimivl.train.vit import CAPTION_WEIGHT, ViTPretrainer, caption_batch


def _batch(vocab: int):
    rng = torch.Generator().manual_seed(0)
    sizes = [(28, 56), (84, 28), (56, 56)]
    images = [ImageProcessor()(Image.new("RGB", size, (40 * i, 90, 200))) for i, size in enumerate(sizes)]
    texts = [torch.randint(3, vocab, (n,), generator=rng).tolist() for n in (5, 2, 7)]
    return caption_batch(images, texts, bos=1, eos=2, pad=0, max_len=16)


def test_pretrainer_loss_is_siglip_plus_twice_the_caption_cross_entropy(tiny_model):
    vocab = tiny_model.config.text_config.vocab_size
    torch.manual_seed(0)
    trainer = ViTPretrainer(tiny_model.vision_tower, vocab)
    batch = _batch(vocab)
    decoded = []
    trainer.out_norm.register_forward_hook(lambda m, i, out: decoded.append(out))
    pooled = []
    trainer.image_proj.register_forward_hook(lambda m, i, out: pooled.append(i[0]))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss, values = trainer(batch)
    # the caption term is next-token cross-entropy over every position of the full logits, padding excluded
    labels = batch.text_ids.masked_fill(~batch.text_mask, -100)
    logits = trainer.lm_head(decoded[0])[:, :-1].flatten(0, 1)
    expected = F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)
    assert abs(values["caption"] - expected.item()) < 1e-5
    assert abs(loss.item() - values["siglip"] - CAPTION_WEIGHT * values["caption"]) < 1e-4
    # the contrast sees each image's mean patch feature, its padding left out
    sizes = (batch.image_grid_hws[:, 0] * batch.image_grid_hws[:, 1]).tolist()
    with torch.no_grad():
        feats = trainer.tower(batch.pixel_values, batch.image_grid_hws).split(sizes)
    torch.testing.assert_close(pooled[0], torch.stack([f.mean(0) for f in feats]))
    # the head runs at the scored positions only: 6 + 3 + 8 next tokens, never the full (3 x 8, vocab)
    scored = int(batch.text_mask[:, 1:].sum())
    assert scored == 17
    dim = tiny_model.vision_tower.config.hidden_size  # the head's weight, transposed, is (dim, vocab)
    rows = {shape[:-1].numel() for shape in saved if len(shape) > 1 and shape[-1] == vocab} - {dim}
    assert rows == {scored}
    loss.backward()
    assert trainer.lm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in trainer.tower.parameters() if p.requires_grad)
