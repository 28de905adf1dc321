"""Hand-computed tiny cases for every function in rlhf/ppo_core.py (CPU, about a second).

Run: pytest -q tests/test_ppo_core.py
"""

import math

import pytest
import torch

from rlhf import ppo_core
from rlhf.ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    exact_kl_from_logits,
    first_true_indices,
    kl_penalty,
    leave_one_out_advantages,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    response_lengths,
    truncate_after_stop_token,
    value_loss,
)

JUNK = (float("nan"), float("inf"), -1e6)  # values that must not leak out of masked positions


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def with_junk(x, mask, junk):
    """Copy of x with every masked (mask == 0) position set to junk."""
    return torch.where(mask.bool(), x, torch.full_like(x, junk))


def random_prefix_mask(B, T, generator):
    """(B, T) float mask [1..1, 0..0] with lengths 0..T, always including an empty and a full row."""
    lengths = torch.randint(0, T + 1, (B,), generator=generator)
    lengths[0], lengths[1] = 0, T
    return (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()


# ---------------------------------------------------------------------------------------------
# masked statistics
# ---------------------------------------------------------------------------------------------

VALUES = t([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
MASK = t([[1, 1, 1], [1, 0, 0]])  # real values 1, 2, 3, 4


def test_masked_sum_mean_var_hand_values():
    # real values 1,2,3,4: sum 10, mean 2.5, squared deviations 2.25+0.25+0.25+2.25 = 5
    assert masked_sum(VALUES, MASK).item() == 10.0
    assert torch.equal(masked_sum(VALUES, MASK, dim=1), t([6.0, 4.0]))
    assert masked_mean(VALUES, MASK).item() == 2.5
    assert torch.equal(masked_mean(VALUES, MASK, dim=1), t([2.0, 4.0]))
    assert masked_var(VALUES, MASK, unbiased=False).item() == pytest.approx(5 / 4)
    assert masked_var(VALUES, MASK).item() == pytest.approx(5 / 3)  # Bessel: n / (n - 1) = 4 / 3


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.long, torch.bool])
def test_masked_stats_accept_any_mask_dtype(mask_dtype):
    mask = MASK.to(mask_dtype)
    assert masked_mean(VALUES, mask).item() == 2.5
    assert masked_var(VALUES, mask).item() == pytest.approx(5 / 3)


@pytest.mark.parametrize("junk", JUNK)
def test_masked_stats_ignore_junk(junk):
    values = with_junk(VALUES, MASK, junk)
    assert masked_sum(values, MASK).item() == 10.0
    assert masked_mean(values, MASK).item() == 2.5
    assert masked_var(values, MASK).item() == pytest.approx(5 / 3)


def test_masked_stats_degenerate_masks_are_finite():
    one = t([[1, 0, 0], [0, 0, 0]])
    assert masked_var(VALUES, one).item() == 0.0  # n == 1: no division by zero
    empty = torch.zeros(2, 3)
    assert masked_mean(VALUES, empty).item() == 0.0
    assert masked_var(VALUES, empty).item() == 0.0
    assert torch.equal(masked_mean(VALUES, t([[1, 1, 0], [0, 0, 0]]), dim=1), t([1.5, 0.0]))  # empty row -> 0


def test_masked_whiten_hand_values_and_junk():
    # (x - 2.5) / sqrt(5/3) for x = 1, 2, 3, 4; masked positions 0
    s = math.sqrt(5 / 3)
    expected = t([[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]])
    torch.testing.assert_close(masked_whiten(VALUES, MASK), expected)
    for junk in JUNK:
        torch.testing.assert_close(masked_whiten(with_junk(VALUES, MASK, junk), MASK), expected)
    # shift_mean=False keeps the mean (lm-human reward whitening): values (x - 2.5)/s + 2.5
    unshifted = masked_whiten(VALUES, MASK, shift_mean=False)
    torch.testing.assert_close(unshifted, (expected + 2.5) * MASK)
    assert masked_mean(unshifted, MASK).item() == pytest.approx(2.5)


def test_masked_whiten_mean_zero_std_one_over_mask():
    g = torch.Generator().manual_seed(0)
    values = 3.0 + 5.0 * torch.randn(8, 12, generator=g)
    mask = random_prefix_mask(8, 12, g)
    whitened = masked_whiten(values, mask)
    assert masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert masked_var(whitened, mask).sqrt().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(whitened[mask == 0] == 0)
    # equals plain whitening of the real entries
    real = values[mask.bool()]
    torch.testing.assert_close(whitened[mask.bool()], (real - real.mean()) / real.std())


# ---------------------------------------------------------------------------------------------
# logprobs / entropy from logits
# ---------------------------------------------------------------------------------------------


def reference_logprobs(logits, labels, temperature=1.0):
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def test_logprobs_from_logits_hand_value():
    # softmax([0, ln 3]) = [1/4, 3/4]; temperature 2 on [0, 2 ln 3] gives the same distribution
    logits = t([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # (1, 2, 2)
    labels = torch.tensor([[1, 0]])
    torch.testing.assert_close(logprobs_from_logits(logits, labels), t([[math.log(0.75), math.log(0.25)]]))
    torch.testing.assert_close(
        logprobs_from_logits(2 * logits, labels, temperature=2.0), t([[math.log(0.75), math.log(0.25)]])
    )


@pytest.mark.parametrize("chunk_tokens", [1, 4, 10, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_from_logits_matches_log_softmax_gather(monkeypatch, chunk_tokens, temperature):
    monkeypatch.setattr(ppo_core, "_CHUNK_TOKENS", chunk_tokens)  # exercise row and time chunking
    g = torch.Generator().manual_seed(1)
    full = torch.randn(3, 7, 11, generator=g)
    logits = full[:, 1:-1]  # (3, 5, 11), non-contiguous like logits[:, context_length - 1 : -1]
    labels = torch.randint(0, 11, (3, 5), generator=g)
    got = logprobs_from_logits(logits, labels, temperature)
    torch.testing.assert_close(got, reference_logprobs(logits, labels, temperature))
    # gradients through the chunks match too
    leaf = logits.clone().requires_grad_(True)
    leaf_ref = logits.clone().requires_grad_(True)
    logprobs_from_logits(leaf, labels, temperature).sum().backward()
    reference_logprobs(leaf_ref, labels, temperature).sum().backward()
    torch.testing.assert_close(leaf.grad, leaf_ref.grad)


def test_logprobs_from_logits_bf16_upcasts():
    g = torch.Generator().manual_seed(2)
    logits32 = 4 * torch.randn(2, 6, 50, generator=g)
    labels = torch.randint(0, 50, (2, 6), generator=g)
    logits16 = logits32.bfloat16()
    got = logprobs_from_logits(logits16, labels, temperature=0.7)
    assert got.dtype == torch.float32
    # exact on the bf16 values (computed in float32), close to the float32 logits
    torch.testing.assert_close(got, reference_logprobs(logits16, labels, 0.7))
    torch.testing.assert_close(got, reference_logprobs(logits32, labels, 0.7), atol=0.1, rtol=0.0)
    assert logprobs_from_logits(logits32.double(), labels).dtype == torch.float64  # never downcast


def test_entropy_hand_values():
    # uniform over 4 -> ln 4; [1/4, 3/4] -> -(1/4 ln 1/4 + 3/4 ln 3/4)
    torch.testing.assert_close(entropy_from_logits(torch.zeros(1, 1, 4)), t([[math.log(4.0)]]))
    logits = t([[[0.0, math.log(3.0)]]])
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(entropy_from_logits(logits), t([[expected]]))
    torch.testing.assert_close(entropy_from_logits(3 * logits, temperature=3.0), t([[expected]]))


@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
def test_entropy_matches_minus_sum_p_log_p(monkeypatch, chunk_tokens):
    monkeypatch.setattr(ppo_core, "_CHUNK_TOKENS", chunk_tokens)
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(3, 5, 13, generator=g)
    for temperature in (1.0, 0.7):
        p = torch.softmax(logits / temperature, -1)
        expected = -(p * torch.log(p)).sum(-1)
        torch.testing.assert_close(entropy_from_logits(logits, temperature), expected)
    got16 = entropy_from_logits(logits.bfloat16())
    assert got16.dtype == torch.float32
    torch.testing.assert_close(got16, entropy_from_logits(logits.bfloat16().float()))


def test_exact_kl_hand_values_and_gradient():
    # π = [1/4, 3/4], π_ref uniform over 2: KL = 1/4 ln(1/2) + 3/4 ln(3/2); zero where π = π_ref
    logits = t([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    ref = torch.log(t([[[0.5, 0.5], [0.5, 0.5]]]))
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    torch.testing.assert_close(exact_kl_from_logits(logits, ref), t([[expected, 0.0]]))
    torch.testing.assert_close(exact_kl_from_logits(2 * logits, ref, temperature=2.0), t([[expected, 0.0]]))
    # d KL / d z_1 for π = softmax(z) against a uniform reference: π_1 (log π_1 - log π_ref_1 - KL)
    z = t([[[0.0, math.log(3.0)]]]).requires_grad_()
    exact_kl_from_logits(z, ref[:, :1]).sum().backward()
    torch.testing.assert_close(z.grad[0, 0, 1], t(0.75 * (math.log(1.5) - expected)))


@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
def test_exact_kl_matches_sum_p_log_ratio(monkeypatch, chunk_tokens):
    monkeypatch.setattr(ppo_core, "_CHUNK_TOKENS", chunk_tokens)
    g = torch.Generator().manual_seed(5)
    logits, ref_logits = 3 * torch.randn(3, 5, 13, generator=g), 3 * torch.randn(3, 5, 13, generator=g)
    for temperature in (1.0, 0.7):
        logp, ref = torch.log_softmax(logits / temperature, -1), torch.log_softmax(ref_logits / temperature, -1)
        expected = (logp.exp() * (logp - ref)).sum(-1)
        got = exact_kl_from_logits(logits, ref, temperature)
        torch.testing.assert_close(got, expected)
        assert (got >= 0).all()


def test_empty_logits_give_empty_outputs():
    assert logprobs_from_logits(torch.zeros(2, 0, 5), torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0)
    assert entropy_from_logits(torch.zeros(0, 3, 5)).shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# KL and rewards
# ---------------------------------------------------------------------------------------------


def test_kl_penalty_hand_values():
    # p = 0.5, q = 0.25: k1 = ln 2; log r = ln(q/p) = -ln 2, r = 0.5: k3 = (0.5 - 1) + ln 2
    logprobs, ref_logprobs = t([[math.log(0.5)]]), t([[math.log(0.25)]])
    assert kl_penalty(logprobs, ref_logprobs).item() == pytest.approx(math.log(2))
    assert kl_penalty(logprobs, ref_logprobs, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(logprobs, ref_logprobs, "k3").item() == pytest.approx(math.log(2) - 0.5)
    # the other way round: k1 negative, k3 = (2 - 1) - ln 2 still >= 0
    assert kl_penalty(ref_logprobs, logprobs, "k1").item() == pytest.approx(-math.log(2))
    assert kl_penalty(ref_logprobs, logprobs, "k3").item() == pytest.approx(1 - math.log(2))
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logprobs, ref_logprobs, "k2")


def test_kl_estimators_unbiased_and_k3_nonnegative():
    g = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(6, generator=g), -1)
    q = torch.softmax(torch.randn(6, generator=g), -1)
    true_kl = (p * (p.log() - q.log())).sum()
    for estimator in ("k1", "k3"):  # exact expectation over x ~ p, no sampling noise
        expectation = (p * kl_penalty(p.log(), q.log(), estimator)).sum()
        assert expectation.item() == pytest.approx(true_kl.item(), abs=1e-6)
    lp, ref = torch.randn(50, 20, generator=g), torch.randn(50, 20, generator=g)
    assert torch.all(kl_penalty(lp, ref, "k3") >= 0)
    assert torch.all(kl_penalty(lp, lp, "k3") == 0)


def test_per_token_rewards_score_at_last_real_token():
    scores = t([1.0, 2.0, 3.0])
    mask = t([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    ref_logprobs = torch.full((3, 4), -2.0)
    logprobs = ref_logprobs + 0.1  # k1 = 0.1 on every token
    rewards, kl = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.5)
    expected = t([[-0.05, -0.05, 0.95, 0.0], [-0.05, -0.05, -0.05, 1.95], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)  # empty row: score 3.0 added nowhere
    torch.testing.assert_close(kl, 0.1 * mask)
    for junk in JUNK:  # junk logprobs after the stop token change nothing
        junk_rewards, junk_kl = per_token_rewards(
            scores, with_junk(logprobs, mask, junk), with_junk(ref_logprobs, mask, -junk), mask, 0.5
        )
        torch.testing.assert_close(junk_rewards, expected)
        torch.testing.assert_close(junk_kl, kl)


def test_per_token_rewards_uses_last_position_with_mask_one():
    # not a prefix mask (holes): the score still goes to the last index where mask == 1, not to sum(mask) - 1
    rewards, _ = per_token_rewards(t([5.0]), torch.zeros(1, 4), torch.zeros(1, 4), t([[1, 0, 1, 0]]), kl_coef=0.1)
    torch.testing.assert_close(rewards, t([[0.0, 0.0, 5.0, 0.0]]))


def test_per_token_rewards_k3_and_estimator_passthrough():
    scores, mask = t([0.0]), t([[1, 1]])
    logprobs, ref_logprobs = t([[math.log(0.5), math.log(0.25)]]), t([[math.log(0.25), math.log(0.5)]])
    rewards, kl = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=2.0, estimator="k3")
    torch.testing.assert_close(kl, t([[math.log(2) - 0.5, 1 - math.log(2)]]))
    torch.testing.assert_close(rewards, -2.0 * kl)
    with pytest.raises(ValueError):
        per_token_rewards(scores, logprobs, ref_logprobs, mask, 0.1, estimator="abs")


def test_truncate_then_rewards_put_score_on_stop_token():
    responses = torch.tensor([[5, 2, 7, 8], [5, 6, 7, 8]])  # stop token 2 at index 1; none in row 1
    _, mask, _ = truncate_after_stop_token(responses, [2], pad_token_id=0)
    rewards, _ = per_token_rewards(t([1.0, 2.0]), torch.zeros(2, 4), torch.zeros(2, 4), mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, t([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]]))


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------


def gae_vectorised(rewards, values, mask, gamma, lam):
    """Closed form A_t = sum_{k >= t} (gamma lam)^(k - t) delta_k as a matrix product (CleanRL-style check)."""
    rewards, values = rewards * mask, values * mask
    nextvalues = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * nextvalues - values  # (B, T)
    T = rewards.shape[1]
    k, t_ = torch.arange(T).unsqueeze(1), torch.arange(T).unsqueeze(0)
    discount = torch.where(k >= t_, (gamma * lam) ** (k - t_).clamp(min=0).double(), 0.0)  # (T_k, T_t)
    advantages = (deltas.double() @ discount).float()
    return advantages * mask, (advantages + values) * mask


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rewards = t([[1.0, 2.0, 3.0, 0.0]])
    values = t([[0.5, 1.0, 1.5, 0.0]])
    mask = t([[1, 1, 1, 0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # reward-to-go [6, 5, 3]; minus V [0.5, 1, 1.5]
    torch.testing.assert_close(advantages, t([[5.5, 4.0, 1.5, 0.0]]))
    torch.testing.assert_close(returns, t([[6.0, 5.0, 3.0, 0.0]]))


def test_leave_one_out_advantages_hand_values():
    # group (1, 2, 3, 6): answer 1 against (2 + 3 + 6) / 3 gives -8/3, answer 4 against 2 gives 4;
    # group (0, 0, 4, 4): a 4 against 4/3 gives 8/3
    returns = t([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 4.0, 4.0])
    assert leave_one_out_advantages(returns, 4).tolist() == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0,
                                                                           -8 / 3, -8 / 3, 8 / 3, 8 / 3])
    assert leave_one_out_advantages(returns, 2).tolist() == pytest.approx([-1, 1, -3, 3, 0, 0, 0, 0])
    for bad in (1, 3):  # a single answer has no other; 8 rows do not split into groups of 3
        with pytest.raises(ValueError, match="groups"):
            leave_one_out_advantages(returns, bad)


def test_gae_hand_computed_three_steps():
    # gamma = 0.9, lam = 0.8, gamma*lam = 0.72; r = [1, 0, 2], V = [0.5, 1.0, 1.5], V after the end = 0
    # delta_2 = 2 + 0.9*0   - 1.5 = 0.5
    # delta_1 = 0 + 0.9*1.5 - 1.0 = 0.35
    # delta_0 = 1 + 0.9*1.0 - 0.5 = 1.4
    # A_2 = 0.5;  A_1 = 0.35 + 0.72*0.5 = 0.71;  A_0 = 1.4 + 0.72*0.71 = 1.9112
    # returns = A + V = [2.4112, 1.71, 2.0]
    rewards = t([[1.0, 0.0, 2.0, 9.0], [1.0, 0.0, 2.0, 0.0]])
    values = t([[0.5, 1.0, 1.5, 7.0], [0.5, 1.0, 1.5, 2.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 1, 1]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages[0], t([1.9112, 0.71, 0.5, 0.0]))
    torch.testing.assert_close(returns[0], t([2.4112, 1.71, 2.0, 0.0]))
    # row 1 has a 4th real step (r=0, V=2) so V_3 = 2 bootstraps the third: delta_2 = 2 + 1.8 - 1.5 = 2.3
    assert advantages[1, 2].item() == pytest.approx(2.3 + 0.72 * (0.0 - 2.0))


def test_gae_loop_matches_vectorised_reference():
    g = torch.Generator().manual_seed(5)
    B, T = 6, 9
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = random_prefix_mask(B, T, g)
    for gamma, lam in [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0)]:
        advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
        ref_advantages, ref_returns = gae_vectorised(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(advantages, ref_advantages)
        torch.testing.assert_close(returns, ref_returns)
        assert torch.all(advantages[mask == 0] == 0) and torch.all(returns[mask == 0] == 0)


@pytest.mark.parametrize("junk", JUNK)
def test_gae_ignores_junk_in_masked_positions(junk):
    g = torch.Generator().manual_seed(6)
    rewards, values = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    mask = random_prefix_mask(4, 5, g)
    clean = compute_gae(rewards * mask, values * mask, mask, 0.9, 0.8)
    dirty = compute_gae(with_junk(rewards, mask, junk), with_junk(values, mask, junk), mask, 0.9, 0.8)
    for a, b in zip(clean, dirty):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------


def test_policy_loss_ratio_one_no_clipping():
    g = torch.Generator().manual_seed(7)
    logprobs = torch.randn(3, 5, generator=g)
    advantages = torch.randn(3, 5, generator=g)
    mask = random_prefix_mask(3, 5, g)
    loss, stats = policy_loss(logprobs, logprobs.clone(), advantages, mask, cliprange=0.2)
    torch.testing.assert_close(loss, -masked_mean(advantages, mask))
    assert stats["clipfrac"].item() == 0.0
    assert stats["approxkl"].item() == 0.0
    assert stats["ratio"].item() == pytest.approx(1.0)


def clipping_case():
    # cliprange 0.2; mask [1, 1, 1, 0]
    # t0: A=+1, ratio 1.5: -1.5 vs clipped -1.2 -> max -1.2, clipped
    # t1: A=-1, ratio 0.5: +0.5 vs clipped +0.8 -> max +0.8, clipped
    # t2: A=+2, ratio 0.5: -1.0 vs clipped -1.6 -> max -1.0, not clipped (pessimistic bound is unclipped)
    # loss = (-1.2 + 0.8 - 1.0) / 3 = -1.4 / 3; clipfrac = 2/3
    old_logprobs = t([[-1.0, -1.0, -1.0, -1.0]])
    logprobs = old_logprobs + t([[math.log(1.5), math.log(0.5), math.log(0.5), 0.0]])
    advantages = t([[1.0, -1.0, 2.0, 0.0]])
    mask = t([[1, 1, 1, 0]])
    return logprobs, old_logprobs, advantages, mask


def test_policy_loss_clipping_hand_values():
    logprobs, old_logprobs, advantages, mask = clipping_case()
    logprobs = logprobs.requires_grad_(True)
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    assert loss.item() == pytest.approx(-1.4 / 3)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5 + 0.5) / 3)
    assert stats["approxkl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 3)
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
    loss.backward()
    # clipped tokens get no gradient; t2: d/dlp (-A * ratio) / 3 = -2 * 0.5 / 3
    torch.testing.assert_close(logprobs.grad, t([[0.0, 0.0, -1.0 / 3, 0.0]]))


@pytest.mark.parametrize("junk", JUNK)
def test_policy_loss_ignores_junk(junk):
    logprobs, old_logprobs, advantages, mask = clipping_case()
    dirty_logprobs = with_junk(logprobs, mask, junk).requires_grad_(True)
    loss, stats = policy_loss(
        dirty_logprobs, with_junk(old_logprobs, mask, -junk), with_junk(advantages, mask, junk), mask, 0.2
    )
    clean_loss, clean_stats = policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)
    torch.testing.assert_close(loss, clean_loss)
    for key in clean_stats:
        torch.testing.assert_close(stats[key], clean_stats[key])
    loss.backward()
    torch.testing.assert_close(dirty_logprobs.grad, t([[0.0, 0.0, -1.0 / 3, 0.0]]))  # finite, 0 when masked


def value_case():
    # cliprange_value 0.2; mask [1, 1, 1, 0]
    # t0: old 0, V 1.0, R 1.0: V_clip 0.2; (0)^2 vs (0.8)^2 -> 0.64, clipped
    # t1: old 0, V 0.1, R 1.0: V_clip 0.1; 0.81 vs 0.81 -> 0.81, not clipped (equal)
    # t2: old 1, V 0.5, R 0.0: V_clip 0.8; 0.25 vs 0.64 -> 0.64, clipped
    # loss = 0.5 * (0.64 + 0.81 + 0.64) / 3; clipfrac 2/3; error = (0 + 0.81 + 0.25) / 3
    values = t([[1.0, 0.1, 0.5, 0.0]])
    old_values = t([[0.0, 0.0, 1.0, 0.0]])
    returns = t([[1.0, 1.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 0]])
    return values, old_values, returns, mask


def test_value_loss_clipping_hand_values():
    values, old_values, returns, mask = value_case()
    loss, stats = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * 2.09 / 3)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["error"].item() == pytest.approx(1.06 / 3)
    # a wide clip range leaves the plain 0.5 * MSE
    wide_loss, wide_stats = value_loss(values, old_values, returns, mask, cliprange_value=10.0)
    assert wide_loss.item() == pytest.approx(0.5 * 1.06 / 3)
    assert wide_stats["clipfrac"].item() == 0.0


@pytest.mark.parametrize("junk", JUNK)
def test_value_loss_ignores_junk(junk):
    values, old_values, returns, mask = value_case()
    dirty_values = with_junk(values, mask, junk).requires_grad_(True)
    dirty_old_values, dirty_returns = with_junk(old_values, mask, junk), with_junk(returns, mask, -junk)
    loss, stats = value_loss(dirty_values, dirty_old_values, dirty_returns, mask, 0.2)
    assert loss.item() == pytest.approx(0.5 * 2.09 / 3)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["error"].item() == pytest.approx(1.06 / 3)
    loss.backward()
    # t1 unclipped: d/dV 0.5 * (V - R)^2 / 3 = (0.1 - 1) / 3; clipped t0, t2 and masked t3 get 0
    torch.testing.assert_close(dirty_values.grad, t([[0.0, -0.9 / 3, 0.0, 0.0]]))


# ---------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(123.0, 512)
    assert ctl.value == 0.05
    restored = FixedKLController(1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == 0.05


def test_adaptive_kl_controller_hand_update_and_clipping():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(7.0, 512)  # error 7/6 - 1 = 1/6; mult = 1 + (1/6) * 512 / 10000
    assert ctl.value == pytest.approx(0.1 * (1 + (1 / 6) * 0.0512))
    up = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    up.update(100.0, 512)  # error 15.67 clipped to +0.2
    assert up.value == pytest.approx(0.1 * (1 + 0.2 * 0.0512))
    down = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    down.update(torch.tensor(0.0), 512)  # error -1 clipped to -0.2; a tensor KL is accepted
    assert down.value == pytest.approx(0.1 * (1 - 0.2 * 0.0512))
    same = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    same.update(6.0, 512)
    assert same.value == pytest.approx(0.1)


def test_adaptive_kl_controller_state_dict_resume():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    for kl in (3.0, 8.0):
        ctl.update(kl, 64)
    state = ctl.state_dict()
    assert isinstance(state, dict) and isinstance(state["value"], float)
    resumed = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    resumed.load_state_dict(state)
    ctl.update(9.0, 64)
    resumed.update(9.0, 64)
    assert resumed.value == ctl.value


# ---------------------------------------------------------------------------------------------
# truncation and masks
# ---------------------------------------------------------------------------------------------


def test_first_true_indices():
    bools = torch.tensor([[False, True, True], [False, False, False], [True, False, False]])
    assert torch.equal(first_true_indices(bools), torch.tensor([1, 3, 0]))
    assert first_true_indices(torch.tensor([[0, 0, 1, 1]])).tolist() == [2]  # non-bool input


def test_truncate_after_stop_token():
    responses = torch.tensor([
        [5, 2, 7, 8],  # stop mid-sequence
        [2, 5, 6, 7],  # stop at position 0
        [5, 6, 7, 8],  # no stop token
        [5, 6, 7, 2],  # stop at the last position
        [5, 9, 2, 7],  # second stop id comes first
    ])
    truncated, mask, has_stop = truncate_after_stop_token(responses, stop_token_ids=[2, 9], pad_token_id=0)
    assert torch.equal(truncated, torch.tensor([
        [5, 2, 0, 0],
        [2, 0, 0, 0],
        [5, 6, 7, 8],
        [5, 6, 7, 2],
        [5, 9, 0, 0],
    ]))
    assert mask.dtype == torch.bool
    assert torch.equal(mask, t([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]).bool())
    assert has_stop.tolist() == [True, True, False, True, True]
    assert torch.equal(response_lengths(mask), torch.tensor([2, 1, 4, 4, 2]))
    # pad == stop (e.g. GPT-2): the stop token stays real, the tail is masked
    truncated, mask, has_stop = truncate_after_stop_token(torch.tensor([[4, 3, 3, 6]]), [3], pad_token_id=3)
    assert truncated.tolist() == [[4, 3, 3, 3]] and mask.tolist() == [[1, 1, 0, 0]] and has_stop.tolist() == [True]
    # no stop ids: nothing truncated
    _, mask, has_stop = truncate_after_stop_token(responses, [], 0)
    assert mask.sum().item() == responses.numel() and not has_stop.any()


def test_response_lengths():
    mask = t([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    assert torch.equal(response_lengths(mask), torch.tensor([2, 0, 3]))
    assert torch.equal(response_lengths(mask.bool()), torch.tensor([2, 0, 3]))


def test_masked_whiten_reduce_hook_whitens_two_batches_as_one():
    """`reduce` receives this batch's (Σx, Σx², n) and returns the sums over every process: here a second
    process holds [3, 5] (Σx = 8, Σx² = 34, n = 2) next to this one's [1, 3] and a masked NaN. Together
    [1, 3, 3, 5]: mean 3, unbiased variance (4 + 0 + 0 + 4) / 3 = 8/3."""
    values, mask = t([[1.0, 3.0, float("nan")]]), t([[1, 1, 0]])
    seen = []

    def reduce(sums):
        seen.append(sums.tolist())
        return sums + t([8.0, 34.0, 2.0])

    whitened = masked_whiten(values, mask, reduce=reduce)
    assert seen == [[4.0, 10.0, 2.0]]  # masked NaN left out of the exchanged sums
    torch.testing.assert_close(whitened, t([[-2.0, 0.0, 0.0]]) / math.sqrt(8 / 3 + 1e-8))
    unshifted = masked_whiten(values, mask, shift_mean=False, reduce=reduce)
    torch.testing.assert_close(unshifted, t([[-2.0 / math.sqrt(8 / 3) + 3.0, 3.0, 0.0]]))
