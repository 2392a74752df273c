import copy

import numpy as np
import pytest
import torch

from kimivl.train.calibrate import image_feature_stats, standardize_image_features


def _samples(processor, n=6, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = rng.integers(0, 256, size=(28 * (1 + i % 3), 56, 3), dtype=np.uint8)
        out.append(
            processor.encode(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image", "image": image}, {"type": "text", "text": "what is it?"}],
                    }
                ]
            )
        )
    return out


def test_standardised_features_have_mean_zero_and_the_target_std(small_model, small_processor):
    model = copy.deepcopy(small_model).float().eval()
    with torch.no_grad():  # a large shared direction, as after alignment
        model.multi_modal_projector.linear_2.bias.add_(5.0)
    samples = _samples(small_processor)
    mean, std, tokens = image_feature_stats(model, samples)
    assert tokens == sum(int((g[:, 0] * g[:, 1]).sum()) // 4 for g in (s.image_grid_hws for s in samples))
    assert mean.abs().mean() > 4 * std.mean()
    text_before = model.language_model.model.embed_tokens.weight.clone()
    report = standardize_image_features(model, samples, target_std=0.5)
    mean, std, _ = image_feature_stats(model, samples)
    assert mean.abs().max() < 1e-4
    torch.testing.assert_close(std, torch.full_like(std, 0.5), atol=1e-4, rtol=1e-4)
    assert report["norm_before"] > 5 * report["norm_after"]
    assert torch.equal(model.language_model.model.embed_tokens.weight, text_before)  # only the projector moves


def test_standardising_needs_images_and_a_positive_target(small_model, small_processor):
    text_only = [small_processor.encode([{"role": "user", "content": "hi"}])]
    with pytest.raises(ValueError, match="no sample has an image"):
        standardize_image_features(copy.deepcopy(small_model), text_only)
    with pytest.raises(ValueError, match="target_std must be > 0"):
        standardize_image_features(copy.deepcopy(small_model), _samples(small_processor), target_std=0.0)


def test_a_channel_that_never_varies_stays_finite(small_model, small_processor):
    """A dead channel (std 0) gets a bounded gain, not an infinite one: its weights stay zero and its bias goes to 0."""
    model = copy.deepcopy(small_model).float().eval()
    linear = model.multi_modal_projector.linear_2
    with torch.no_grad():
        linear.weight[0] = 0.0
        linear.bias[0] = 3.0
    samples = _samples(small_processor, n=2)
    standardize_image_features(model, samples)
    assert torch.isfinite(linear.weight).all() and torch.isfinite(linear.bias).all()
    assert not linear.weight[0].any() and linear.bias[0] == 0.0
    mean, std, _ = image_feature_stats(model, samples)
    torch.testing.assert_close(std[1:], torch.ones_like(std[1:]), atol=1e-4, rtol=1e-4)  # target_std defaults to 1
