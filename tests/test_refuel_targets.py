"""REFUEL's regression targets Q and branch turns on hand-made values (no model, no engine)."""

import numpy as np
import pytest
import torch

from refuel import branch_q, redraw_past_the_end


def test_targets_apply_the_penalty_then_the_kl_term():
    scores = torch.tensor([[1.0, 0.0], [0.5, 0.2]])
    finished = torch.tensor([[True, True], [False, True]])
    old_lp = torch.tensor([[-2.0, -3.0], [-1.0, -4.0]])
    ref_lp = torch.tensor([[-2.5, -3.0], [-1.0, -5.0]])
    q, weights = branch_q(scores, finished, old_lp, ref_lp, torch.tensor([False, False]),
                            kl_coef=0.1, penalty_reward=-10.0)
    # pair 0: 1 - 0.1 * 0.5 = 0.95 and 0 - 0 = 0; pair 1: the unfinished y is penalised (-10 - 0), y' 0.2 - 0.1 * 1
    assert q.flatten().tolist() == pytest.approx([0.95, 0.0, -10.0, 0.1])
    assert weights.tolist() == [1.0, 1.0]


def test_identical_and_nan_pairs_get_weight_zero_and_no_nan():
    scores = torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [0.3, 0.3]])
    q, weights = branch_q(scores, torch.ones(3, 2, dtype=torch.bool), torch.zeros(3, 2), None,
                          torch.tensor([False, False, True]), kl_coef=0.0, penalty_reward=None)
    assert weights.tolist() == [1.0, 0.0, 0.0]
    assert torch.isfinite(q).all() and q[1].tolist() == [0.0, 1.0]


def test_no_penalty_and_no_reference_keep_the_scores():
    scores = torch.tensor([[0.25, -0.5]])
    q, _ = branch_q(scores, torch.tensor([[False, False]]), torch.zeros(1, 2), None,
                    torch.tensor([False]), kl_coef=0.05, penalty_reward=None)
    assert q.tolist() == [[0.25, -0.5]]


def test_a_branch_turn_past_the_end_is_drawn_uniformly_over_the_turns_played():
    """The official setting two draws h uniformly over a dialogue's real turns: for a 2-turn dialogue that is
    1/2 each, where clamping h ~ U{1..5} to the last turn would give turn 2 four times in five."""
    rng = np.random.default_rng(0)
    n = 20_000
    redrawn = [redraw_past_the_end(rng, 2) for _ in range(n)]
    assert np.bincount(redrawn, minlength=5) / n == pytest.approx([0.5, 0.5, 0, 0, 0], abs=0.015)
    assert {redraw_past_the_end(rng, 0) for _ in range(10)} == {0}  # no turn played: turn 0
