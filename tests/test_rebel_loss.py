import numpy as np
import pytest
import torch

from rebel import prompt_indices, rebel_loss


def pairs(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_loss_matches_hand_computation():
    new = pairs([-3.0, -5.0], [-2.0, -2.5])
    old = pairs([-4.0, -4.0], [-2.0, -3.0])
    rewards = pairs([1.0, 0.0], [0.2, 0.6])
    # pair 0: (1 - (-1)) - 2*(1 - 0) = 0 ; pair 1: (0 - 0.5) - 2*(0.2 - 0.6) = 0.3
    assert rebel_loss(new, old, rewards, eta=2.0).tolist() == pytest.approx([0.0, 0.3**2])  # one value per pair


def test_eta_scales_the_reward_difference():
    new = old = pairs([-1.0, -1.0])
    rewards = pairs([0.5, 0.0])
    for eta in (0.5, 1.0, 1e3):
        assert rebel_loss(new, old, rewards, eta=eta).item() == pytest.approx((eta * 0.5) ** 2)


def test_gradient_raises_the_better_response():
    """The sign: when R(y) > R(y') a gradient step raises log pi(y) relative to log pi(y')."""
    new = torch.tensor([[-2.0, -2.0]], requires_grad=True)
    rebel_loss(new, new.detach().clone(), pairs([1.0, 0.0]).float(), eta=1.0).sum().backward()
    assert new.grad[0, 0] < 0 < new.grad[0, 1]  # descending the loss increases y's log-prob and lowers y''s


def test_equal_rewards_and_equal_ratios_give_zero_loss():
    new, old = pairs([-1.0, -7.0]), pairs([-2.0, -8.0])
    assert rebel_loss(new, old, pairs([0.3, 0.3]), eta=10.0).item() == 0.0


def test_each_pair_loss_is_its_own():
    """The loop weights pairs (0 for a NaN reward or identical responses): one pair's value must not leak into
    another's."""
    new = old = pairs([-1.0, -1.0], [-1.0, -1.0])
    alone = rebel_loss(new[1:], old[1:], pairs([0.0, 0.0]), eta=1.0)
    together = rebel_loss(new, old, pairs([1.0, 0.0], [0.0, 0.0]), eta=1.0)
    assert together.tolist() == [1.0, alone.item()] == [1.0, 0.0]


def test_prompt_order_is_a_function_of_the_update():
    first = [prompt_indices(10, u, 4, seed=3) for u in range(1, 6)]
    # the stream written out: epoch e is the permutation of seed (3, e); update u takes its 4 positions in turn
    stream = np.concatenate([np.random.default_rng([3, epoch]).permutation(10) for epoch in range(2)])
    assert [batch.tolist() for batch in first] == [stream[4 * u : 4 * u + 4].tolist() for u in range(5)]
    # no hidden state: asked out of order (as a resume does), each update gets the same prompts
    assert [prompt_indices(10, u, 4, seed=3).tolist() for u in (5, 2, 4)] == [first[u - 1].tolist() for u in (5, 2, 4)]
    seen = sorted(i for batch in first[:2] for i in batch[:4]) + sorted(first[2][:2])
    assert sorted(seen) == list(range(10))  # updates 1-2 and half of 3 cover the first epoch exactly once
