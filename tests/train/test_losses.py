import math

import pytest
import torch

from kimivl.model.target_logprobs import next_token_loss
from kimivl.train.losses import sequence_aux_loss, siglip_loss


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_siglip_loss_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    log_temp, bias = torch.tensor(math.log(2.0), requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    # dots [[0.6, 1.0], [0.8, 0.0]] -> z = 2 * dots - 1 = [[0.2, 1.0], [0.6, -1.0]]
    # -log sigmoid(label * z) = softplus(-label * z): diagonal labels +1, off-diagonal -1
    expected = (softplus(-0.2) + softplus(1.0) + softplus(0.6) + softplus(1.0)) / 2
    loss = siglip_loss(img, txt, log_temp, bias)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert siglip_loss(3 * img, 0.5 * txt, log_temp, bias).item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert log_temp.grad is not None and bias.grad is not None


def test_siglip_loss_names_embeddings_of_other_shapes():
    t, b = torch.tensor(0.0), torch.tensor(0.0)
    for img, txt in ((torch.randn(3, 4), torch.randn(2, 4)), (torch.randn(4), torch.randn(4))):
        with pytest.raises(ValueError, match=r"one shape \(n, d\), got"):
            siglip_loss(img, txt, t, b)


def test_siglip_loss_prefers_matching_pairs():
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True)
    t, b = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    matched, shuffled = siglip_loss(x, x, t, b), siglip_loss(x, x.roll(1, 0), t, b)
    assert matched < shuffled
    matched.backward()
    assert x.grad.abs().sum() > 0


def test_caption_loss_shifts_inside():
    logits = torch.zeros(1, 3, 2)  # through an identity head the hidden states are the logits
    logits[0, 0, 1] = math.log(3.0)  # position 0 predicts label[1] = 1 with p = 3/4
    logits[0, 2] = torch.tensor([50.0, -50.0])  # the last position predicts nothing
    labels = torch.tensor([[-100, 1, 0]])  # position 1 predicts label[2] = 0 with p = 1/2
    expected = (math.log(4 / 3) + math.log(2)) / 2
    assert next_token_loss(logits, torch.eye(2), labels).item() == pytest.approx(expected, rel=1e-6)
    ignored = torch.tensor([[5, -100, 0]])
    assert next_token_loss(logits, torch.eye(2), ignored).item() == pytest.approx(math.log(2), rel=1e-6)


def test_caption_loss_goes_through_the_head():
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    head = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # position 0's logits: (2, 0, 0)
    loss = next_token_loss(hidden, head, torch.tensor([[-100, 0]]))
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-6)


def test_caption_loss_with_nothing_scored_is_zero_with_a_graph():
    hidden = torch.randn(2, 4, 5, requires_grad=True)
    loss = next_token_loss(hidden, torch.randn(7, 5), torch.full((2, 4), -100))
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_caption_loss_names_a_shape_mismatch():
    with pytest.raises(ValueError, match="disagree"):
        next_token_loss(torch.randn(2, 4, 5), torch.randn(7, 5), torch.zeros(2, 3, dtype=torch.long))


def test_caption_loss_matches_the_model_loss(tiny_model):
    ids = torch.randint(0, 200, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    out = tiny_model(ids, labels=labels, return_logits=True)
    head = tiny_model.language_model.lm_head.weight
    torch.testing.assert_close(next_token_loss(out.hidden_states, head, labels), out.loss)
    torch.testing.assert_close(tiny_model(ids, labels=labels).loss, out.loss)


def test_sequence_aux_loss_by_hand():
    # E = 2, K = 1; sequence 0 has two tokens, sequence 1 one token.
    scores = torch.tensor([[0.6, 0.2], [0.3, 0.3], [0.9, 0.1]], requires_grad=True)
    idx = torch.tensor([[0], [1], [0]])
    # seq 0: f = 2 / (1 * 2) * [1, 1] = [1, 1]; P = mean([0.75, 0.25], [0.5, 0.5]) = [0.625, 0.375]; sum = 1.0
    # seq 1: f = 2 / (1 * 1) * [1, 0] = [2, 0]; P = [0.9, 0.1]; sum = 1.8
    loss = sequence_aux_loss(scores, idx, [2, 1], n_experts=2, top_k=1, alpha=0.01)
    assert loss.item() == pytest.approx(0.01 * (1.0 + 1.8) / 2, rel=1e-6)
    loss.backward()
    # f is a constant: d/ds_ti = alpha / n_seq / T_s * (f_i - sum_j f_j s'_tj) / sum_j s_tj
    # seq 0 tokens: f_i - 1.0 = 0; seq 1: 0.005 * ([2, 0] - 1.8) / 1.0
    expected = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.001, -0.009]])
    torch.testing.assert_close(scores.grad, expected, rtol=1e-5, atol=1e-7)


def test_sequence_aux_loss_is_alpha_when_perfectly_balanced():
    # E = 4, K = 2, T = 2: choices cover each expert once and scores are uniform -> f = 1, P = 1/4 -> sum = 1
    scores = torch.full((2, 4), 0.5)
    idx = torch.tensor([[0, 1], [2, 3]])
    assert sequence_aux_loss(scores, idx, torch.tensor([2]), 4, 2, alpha=0.3).item() == pytest.approx(0.3)


def test_sequence_aux_loss_rejects_bad_lengths():
    idx = torch.zeros(3, 1, dtype=torch.long)
    for lens in ([2, 2], [3, 0], [[2, 1]]):  # not summing to T, an empty sequence, not a list of lengths
        with pytest.raises(ValueError, match="seq_lens"):
            sequence_aux_loss(torch.rand(3, 2), idx, lens, 2, 1, 0.1)
    for scores, ids in ((torch.rand(3, 3), idx), (torch.rand(3, 2), idx.expand(3, 2))):
        with pytest.raises(ValueError, match=r"expected scores \(T, 2\) and expert ids \(T, 1\)"):
            sequence_aux_loss(scores, ids, [3], 2, 1, 0.1)
