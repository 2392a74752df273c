import math

import pytest
import torch

from kimivl.rl.objectives import group_baseline, group_normalised, grpo_loss, kl_estimate, length_reward, opmd_loss

# a toy policy: one logit per token of a 3-token vocabulary, the same at every position
SEQS = [[0, 1, 1], [2], [0, 0, 2, 1], [1, 2]]  # two problems x k=2 samples
REWARDS = torch.tensor([1.0, 0.0, 1.0, 1.0])


def toy_logprobs(theta: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(theta, -1)
    return torch.stack([logp[torch.tensor(s)].sum() for s in SEQS])


def test_opmd_loss_and_gradient_equal_the_formula():
    tau = 0.3
    theta_ref = torch.tensor([0.2, -0.5, 0.1], dtype=torch.float64)
    theta = torch.tensor([0.5, -0.1, -0.3], dtype=torch.float64, requires_grad=True)
    logp_ref = toy_logprobs(theta_ref)
    logp = toy_logprobs(theta)
    adv = group_baseline(REWARDS.double(), k=2)
    assert adv.tolist() == [0.5, -0.5, 0.0, 0.0]
    loss = opmd_loss(logp, logp_ref, adv, tau).mean()
    loss.backward()

    # by hand: log pi(y) = sum_t theta[y_t] - L * logsumexp(theta); its gradient is counts - L * softmax
    p = torch.softmax(theta.detach(), -1)
    lse, lse_ref = torch.logsumexp(theta.detach(), -1), torch.logsumexp(theta_ref, -1)
    expected_loss, expected_grad = 0.0, torch.zeros(3, dtype=torch.float64)
    for seq, a in zip(SEQS, adv.tolist()):
        counts = torch.bincount(torch.tensor(seq), minlength=3).double()
        lp = float(theta.detach()[seq].sum() - len(seq) * lse)
        lp_ref = float(theta_ref[seq].sum() - len(seq) * lse_ref)
        residual = a - tau * (lp - lp_ref)
        expected_loss += residual**2 / len(SEQS)
        expected_grad += -2 * tau * residual * (counts - len(seq) * p) / len(SEQS)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    torch.testing.assert_close(theta.grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_opmd_at_the_reference_is_a_policy_gradient():
    """With theta = theta_ref the gradient is -2 tau (r - r_mean) grad log pi: the REINFORCE direction."""
    theta = torch.tensor([0.3, 0.0, -0.2], dtype=torch.float64, requires_grad=True)
    logp = toy_logprobs(theta)
    adv = group_baseline(REWARDS.double(), 2)
    opmd_loss(logp, logp.detach(), adv, tau=0.7).mean().backward()
    theta2 = theta.detach().clone().requires_grad_(True)
    (-(2 * 0.7) * (adv * toy_logprobs(theta2)).mean()).backward()
    torch.testing.assert_close(theta.grad, theta2.grad)


def test_grpo_token_and_sequence_levels():
    new = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])]
    old = [torch.tensor([-1.2, -1.9]), torch.tensor([-0.5])]
    adv = torch.tensor([1.0, -1.0])
    eps = 0.05
    loss = grpo_loss(new, old, adv, clip_eps=eps, level="token")
    r = [math.exp(0.2), math.exp(-0.1)]  # token ratios of sample 0
    expected0 = -(min(r[0], 1 + eps) + min(r[1], 1 + eps)) / 2
    assert loss.tolist() == pytest.approx([expected0, 1.0])
    seq = grpo_loss(new, old, adv, clip_eps=eps, level="sequence")
    assert seq[0].item() == pytest.approx(-min(math.exp(0.1), 1 + eps))
    kl = grpo_loss(new, old, adv, clip_eps=eps, level="token", kl_coef=0.5)
    d = torch.tensor([-0.2, 0.1])
    assert (kl - loss)[0].item() == pytest.approx(0.5 * (d.exp() - d - 1).mean().item())
    with pytest.raises(ValueError, match="level"):
        grpo_loss(new, old, adv, level="word")


def test_grpo_clipping_stops_the_gradient():
    new = torch.tensor([0.5], requires_grad=True)  # ratio e^0.5 > 1 + eps with a positive advantage
    grpo_loss([new], [torch.tensor([0.0])], torch.tensor([1.0]), clip_eps=0.2).sum().backward()
    assert new.grad.item() == 0.0
    new = torch.tensor([0.05], requires_grad=True)  # inside the clip range: gradient -A * ratio
    grpo_loss([new], [torch.tensor([0.0])], torch.tensor([1.0]), clip_eps=0.2).sum().backward()
    assert new.grad.item() == pytest.approx(-math.exp(0.05))


def test_grpo_clips_a_falling_ratio_of_a_negative_advantage():
    """With A < 0 the lower bound 1 - eps clips: a ratio of 0.5 counts as 0.8 and has no gradient; 0.9 is inside."""
    for ratio, want_loss, want_grad in ((0.5, 1.6, 0.0), (0.9, 1.8, 1.8)):
        new = torch.tensor([math.log(ratio)], requires_grad=True)
        loss = grpo_loss([new], [torch.tensor([0.0])], torch.tensor([-2.0]), clip_eps=0.2)
        loss.sum().backward()
        assert loss.item() == pytest.approx(want_loss) and new.grad.item() == pytest.approx(want_grad)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # a mixed group, then an all-correct one
    assert group_baseline(r, 3).tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0])
    norm = group_normalised(r, 3)
    std = math.sqrt(2 / 9)
    assert norm.tolist() == pytest.approx([(2 / 3) / std, -(1 / 3) / std, -(1 / 3) / std, 0, 0, 0], rel=1e-5)
    with pytest.raises(ValueError, match="problems x 4"):
        group_baseline(r, 4)
    assert group_baseline(r, 1).tolist() == [0.0] * 6  # one sample per problem: nothing to compare
    # eps = 1e-6 beside a std of 1e-6: (r - mean) / (std + eps) = +-1e-6 / 2e-6
    assert group_normalised(torch.tensor([0.0, 2e-6]), 2).tolist() == pytest.approx([-0.5, 0.5], rel=1e-4)


def test_equal_rewards_give_advantages_of_exactly_zero():
    """0.7 x 8 left the group mean's float32 rounding as advantages (6e-8; GRPO divided it by its std to 0.06), and
    the normalised updates of Muon and AdamW made full steps of it."""
    r = torch.tensor([0.7] * 8 + [0.7] * 7 + [0.2])
    for advantages in (group_baseline(r, 8), group_normalised(r, 8)):
        assert advantages[:8].tolist() == [0.0] * 8 and advantages[8:].abs().min() > 0.06


def test_a_sequence_ratio_past_floats_range_keeps_the_loss_finite():
    """A sequence log-ratio of 100 overflowed exp in float32: 0 x inf gave NaN for an answer of advantage 0 (every
    answer of a group all right or all wrong), stopping the run."""
    new, old = [torch.full((200,), -0.1, requires_grad=True)], [torch.full((200,), -0.6)]  # log-ratio 100
    for a, want in ((0.0, 0.0), (1.0, -1.2)):
        loss = grpo_loss(new, old, torch.tensor([a]), level="sequence")
        loss.sum().backward()
        assert loss.item() == pytest.approx(want) and torch.isfinite(new[0].grad).all()
    assert torch.isfinite(grpo_loss(new, old, torch.tensor([-1.0]), level="sequence")).all()
    far = [torch.tensor([-100.0, -0.5])]  # a token 99.5 nats less likely than the old policy made it: exp(99.5)
    assert torch.isfinite(grpo_loss(far, [torch.tensor([-0.5, -0.5])], torch.tensor([1.0]), kl_coef=0.1)).all()


def test_grpo_kl_term_has_no_gradient_past_the_cut():
    """Cutting only the KL term's exp at MAX_LOG_RATIO left its -(old - new): a token more than 80 nats less likely
    than under the old policy got dloss/dnew = +kl_coef, so descent pushed it further from the old policy."""
    for gap, want_loss, want_grad in (
        (79.0, math.exp(79) - 80, 0.1 * (1 - math.exp(79))),  # inside the cut: the k3 gradient, raising new
        (81.0, math.exp(80) - 81, 0.0),
        (99.5, math.exp(80) - 81, 0.0),
    ):
        new = torch.tensor([-0.5 - gap], requires_grad=True)
        loss = grpo_loss([new], [torch.tensor([-0.5])], torch.tensor([0.0]), kl_coef=0.1)  # advantage 0: KL alone
        loss.sum().backward()
        assert loss.item() == pytest.approx(0.1 * want_loss, rel=1e-5)
        assert new.grad.item() == pytest.approx(want_grad, rel=1e-5)


def test_kl_estimate_stays_finite_past_float32s_exp():
    """A sequence log-ratio of 100 made kl_ref inf (written to metrics.jsonl as non-standard Infinity)."""
    assert kl_estimate(torch.tensor([100.0]), torch.tensor([0.0])).item() == pytest.approx(math.exp(100) - 101)


def test_length_reward_hand_cases():
    # mixed: lengths 10, 20, 30 -> lambda 0.5, 0, -0.5; the wrong ones keep only the negative part
    lengths = torch.tensor([10, 20, 30, 10, 20, 30])
    correct = torch.tensor([1, 1, 1, 0, 1, 0])
    assert length_reward(lengths, correct, 3).tolist() == [0.5, 0.0, -0.5, 0.0, 0.0, -0.5]
    # all wrong: only penalties (the short one gets 0, not +0.5)
    assert length_reward(torch.tensor([4, 8, 6]), torch.zeros(3), 3).tolist() == [0.0, -0.5, 0.0]
    # all equal lengths: nothing to compare, lambda 0 for everyone, right or wrong
    assert length_reward(torch.tensor([7, 7, 7, 7]), torch.tensor([1, 0, 1, 0]), 4).tolist() == [0.0] * 4
    # each problem's own min and max: the second group's lengths do not affect the first
    out = length_reward(torch.tensor([1, 3, 100, 300]), torch.tensor([1, 1, 1, 1]), 2)
    assert out.tolist() == [0.5, -0.5, 0.5, -0.5]


def test_kl_estimate():
    lp = torch.tensor([-3.0, -2.0])
    assert kl_estimate(lp, lp).item() == 0.0
    d = torch.tensor([0.1, -0.4])
    assert kl_estimate(lp + d, lp).item() == pytest.approx((d.exp() - 1 - d).mean().item())
