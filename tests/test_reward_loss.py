"""Hand-computed tiny cases for reward_models/loss.py, the Bradley-Terry loss and its logged pair metrics (CPU,
under a second).

Run: pytest -q tests/test_reward_loss.py
"""

import math

import pytest
import torch

from reward_models.loss import bradley_terry_loss, pair_metrics

LOG2 = math.log(2)  # -log sigmoid(0): a pair the model cannot tell apart


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def test_bradley_terry_hand_values():
    # gaps 2 and 0: -log sigmoid(2) = log(1 + e^-2) = 0.126928..., -log sigmoid(0) = log 2 = 0.693147...
    loss = bradley_terry_loss(t([2.0, 0.0]), t([0.0, 0.0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2)) + LOG2) / 2)  # 0.410038
    assert loss.item() == pytest.approx(0.4100376, abs=1e-7)
    # only the gap counts: shifting both scores by 5 changes nothing
    assert bradley_terry_loss(t([7.0, 5.0]), t([5.0, 5.0])).item() == pytest.approx(0.4100376, abs=1e-7)
    # the wrong order costs more than the right one: gap -2 gives log(1 + e^2) = 2.126928...
    assert bradley_terry_loss(t([0.0]), t([2.0])).item() == pytest.approx(2.1269280, abs=1e-6)


def test_bradley_terry_is_stable_for_huge_gaps():
    # -log sigmoid(-1000) = 1000 + log(1 + e^-1000) = 1000; a naive log(sigmoid(.)) gives log(0) = inf
    assert bradley_terry_loss(t([0.0]), t([1000.0])).item() == 1000.0
    assert bradley_terry_loss(t([1000.0]), t([0.0])).item() == 0.0


def test_margin_is_subtracted_from_the_gap():
    # gap 1 with margin 1 is a gap of 0 to the loss: log 2
    assert bradley_terry_loss(t([1.0]), t([0.0]), t([1.0])).item() == pytest.approx(LOG2)
    # per-pair margins: gaps (2, 0) minus margins (2, -1) are (0, 1): (log 2 + log(1 + e^-1)) / 2 = 0.503204...
    per_pair = bradley_terry_loss(t([3.0, 1.0]), t([1.0, 1.0]), t([2.0, -1.0]))
    assert per_pair.item() == pytest.approx(0.5032044, abs=1e-7)
    # a float margin applies to every pair: gaps (1, 2) minus 1 are (0, 1), the same 0.503204...
    assert bradley_terry_loss(t([1.0, 2.0]), t([0.0, 0.0]), 1.0).item() == pytest.approx(0.5032044, abs=1e-7)
    # the default margin is none at all
    assert torch.equal(bradley_terry_loss(t([2.0, 0.0]), t([0.0, 0.0])),
                       bradley_terry_loss(t([2.0, 0.0]), t([0.0, 0.0]), t([0.0, 0.0])))


def test_centring_adds_the_mean_squared_pair_sum():
    chosen, rejected = t([1.0, 3.0]), t([-1.0, 1.0])
    # gaps (2, 2): log(1 + e^-2) = 0.126928; sums (0, 4): mean of squares 8, times 0.01 = 0.08
    assert bradley_terry_loss(chosen, rejected, center_coefficient=0.01).item() == pytest.approx(0.2069280, abs=1e-7)
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(0.1269280, abs=1e-7)
    # a coefficient of 0 adds 0; None adds nothing
    assert bradley_terry_loss(chosen, rejected, center_coefficient=0.0).item() == pytest.approx(0.1269280, abs=1e-7)


def test_gradients_hand_values():
    # one pair at gap 0: d/d chosen of -log sigmoid(c - r) = -(1 - sigmoid(0)) = -0.5, and +0.5 for rejected;
    # centring 0.25 * (c + r)^2 at c + r = 2 adds 0.25 * 2 * 2 = 1 to both; loss log 2 + 0.25 * 4
    chosen, rejected = t([1.0]).requires_grad_(), t([1.0]).requires_grad_()
    loss = bradley_terry_loss(chosen, rejected, center_coefficient=0.25)
    loss.backward()
    assert loss.item() == pytest.approx(LOG2 + 1.0)
    assert chosen.grad.tolist() == pytest.approx([0.5])
    assert rejected.grad.tolist() == pytest.approx([1.5])


@pytest.mark.parametrize("center_coefficient", [None, 0.01])
def test_matches_the_formula_on_random_inputs(center_coefficient):
    generator = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(64, generator=generator) * 3, torch.randn(64, generator=generator) * 3
    margin = torch.rand(64, generator=generator)
    loss = bradley_terry_loss(chosen, rejected, margin, center_coefficient)
    # mean over pairs of log(1 + e^-(c - r - m)), in float64 one pair at a time
    pairs = list(zip(chosen.tolist(), rejected.tolist(), margin.tolist()))
    expected = sum(math.log1p(math.exp(-(c - r - m))) for c, r, m in pairs) / len(pairs)
    if center_coefficient is not None:
        expected += center_coefficient * sum((c + r) ** 2 for c, r, _ in pairs) / len(pairs)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # bit for bit TRL's RewardTrainer.compute_loss, whose numbers the grouped trainer keeps
    trl = -torch.nn.functional.logsigmoid(chosen - rejected - margin).mean()
    if center_coefficient is not None:
        trl += center_coefficient * torch.mean((chosen + rejected) ** 2)
    assert torch.equal(loss, trl)


def test_pair_metrics_hand_values():
    rewards = t([3.0, -1.0, 0.5, 2.0])
    chosen, rejected = rewards[[0, 2]], rewards[[1, 3]]  # pairs (3 over -1), (0.5 over 2)
    metrics = pair_metrics(rewards, chosen, rejected)
    assert list(metrics) == ["min_reward", "mean_reward", "max_reward", "accuracy", "margin"]
    assert metrics["min_reward"].item() == -1.0
    assert metrics["mean_reward"].item() == 1.125  # 4.5 / 4
    assert metrics["max_reward"].item() == 3.0
    assert metrics["accuracy"].item() == 0.5  # the first pair is ordered right, the second wrong
    assert metrics["margin"].item() == 1.25  # gaps 4 and -1.5


def test_pair_metrics_count_ties_as_wrong_and_carry_no_gradient():
    rewards = t([1.0, 1.0]).requires_grad_()
    metrics = pair_metrics(rewards, rewards[:1], rewards[1:])
    assert metrics["accuracy"].item() == 0.0
    assert metrics["margin"].item() == 0.0
    assert not any(v.requires_grad for v in metrics.values())
