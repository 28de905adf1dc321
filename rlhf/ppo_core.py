"""The PPO math of RLHF as small pure tensor functions: every equation of the PPO stage lives here.

No configs, models, accelerators, loggers or IO: tensors and floats in, tensors out, so each function
has a hand-computed test in `tests/test_ppo_core.py` (`pytest -q tests/test_ppo_core.py`).

Shapes: B = batch, T = response length, V = vocabulary. Masks are (B, T), 1 on real response tokens,
0 after the stop token (a prefix mask [1..1, 0..0] per row); the pipeline's are bool, born in
`truncate_after_stop_token`, and any of float, int or bool works here. Masked
positions never influence a result, even when they hold junk such as inf or NaN (`torch.where`, not
multiplication, zeroes them).

References (facts matched, not code copied):
- lm-human-preferences (Ziegler et al. 2019), `train_policy.py` at
  https://github.com/openai/lm-human-preferences/blob/1ab856db6eece70f380be6ed54f56c6d94fe4de6/lm_human_preferences/train_policy.py
  (`LMH` below; `#L150-L153` means that line range of this file).
- "The N Implementation Details of RLHF with PPO" (Huang et al. 2023),
  https://iclr-blogposts.github.io/2024/blog/the-n-implementation-details-of-rlhf-with-ppo/
- "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024), https://arxiv.org/abs/2403.17031
- TRL v0.11, https://github.com/huggingface/trl/blob/v0.11.0/trl/core.py and trl/trainer/utils.py (`TRL` below).
- KL estimators k1/k3: http://joschu.net/blog/kl-approx.html
"""

from __future__ import annotations

from typing import Callable

import torch

# Logits are processed in blocks of about this many tokens: only (block, V)-sized float32 temporaries are alive.
_CHUNK_TOKENS = 1024


def zero_masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return values with positions where mask == 0 set to 0, also when they hold inf or NaN; (B, T) -> (B, T)."""
    return torch.where(mask.bool(), values, 0.0)


# ---------------------------------------------------------------------------------------------
# Masked statistics (TRL `masked_mean` / `masked_var` / `masked_whiten`)
# ---------------------------------------------------------------------------------------------


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of values (B, T) where mask (B, T) == 1, over `dim` or everything (TRL `masked_mean` numerator)."""
    return zero_masked(values, mask).sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of values (B, T) over mask (B, T) == 1, over `dim` or everything, 0 if empty (TRL `masked_mean`)."""
    count = mask.sum(dim=dim).clamp(min=1)  # guard: an empty mask gives 0 / 1, not NaN
    return masked_sum(values, mask, dim) / count


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of values (B, T) over mask (B, T) == 1, times n / (n - 1) when unbiased (TRL `masked_var`)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        variance = variance * n / (n - 1).clamp(min=1)  # n == 1: variance is 0 already; guard the division
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Normalise values (B, T) to mean 0, variance 1 over mask (B, T) == 1, masked positions 0 (TRL `masked_whiten`).

    `reduce` sums a tensor over processes (e.g. an all-reduce): mean and variance are then those of every
    process's values together, as if their batches were one."""
    # unbiased var matches TRL; lm-human's `whiten` uses the biased `tf.nn.moments` (n/(n-1) apart).
    # shift_mean=False keeps the mean (lm-human's reward whitening). One pass of sums (Σx, Σx², n), so that
    # processes exchange a single 3-vector.
    real = zero_masked(values, mask)
    sums = torch.stack([real.sum(), (real * real).sum(), mask.sum().to(real.dtype)])
    total, total_sq, n = reduce(sums) if reduce is not None else sums
    mean = total / n
    var = (total_sq / n - mean**2) * n / (n - 1).clamp(min=1)  # unbiased, as masked_var
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return zero_masked(whitened, mask)


# ---------------------------------------------------------------------------------------------
# Logits -> logprobs / entropy, in chunks to bound memory
# ---------------------------------------------------------------------------------------------


def _map_token_chunks(fn, logits: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """Apply fn to (b, t, V) views of logits (B, T, V) and matching (b, t, ...) views of others, concatenating to
    (B, T)."""
    B, T = logits.shape[:2]
    if B == 0 or T == 0:
        return logits.new_zeros(B, T, dtype=torch.promote_types(logits.dtype, torch.float32))
    t_step = min(T, _CHUNK_TOKENS)
    b_step = max(1, _CHUNK_TOKENS // t_step)
    rows = []
    for b in range(0, B, b_step):  # slicing, never reshaping: a non-contiguous logits[:, ctx - 1 : -1] stays a view
        cols = [fn(logits[b : b + b_step, t : t + t_step], *(o[b : b + b_step, t : t + t_step] for o in others))
                for t in range(0, T, t_step)]
        rows.append(torch.cat(cols, dim=1))
    return torch.cat(rows, dim=0)  # (B, T)


def _scaled_chunk(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Upcast one chunk of logits (b, t, V) to at least float32 and divide by the sampling temperature."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # no copy when already float32
    return logits / temperature if temperature != 1.0 else logits


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability (B, T) of labels (B, T) under softmax(logits (B, T, V) / temperature), in float32 or wider
    (N details, "scale the logits by sampling temperature"; TRL `logprobs_from_logits`)."""
    # gather - logsumexp per chunk: no full-vocabulary log_softmax copy, bf16 upcast one chunk at a time.
    # Under autograd each chunk's float32 copy is still saved for backward; the memory bound is strict
    # under torch.no_grad() (rollouts).

    def chunk_logprobs(logits_chunk, labels_chunk):
        logits_chunk = _scaled_chunk(logits_chunk, temperature)  # (b, t, V)
        picked = torch.gather(logits_chunk, -1, labels_chunk.unsqueeze(-1)).squeeze(-1)  # (b, t)
        return picked - torch.logsumexp(logits_chunk, dim=-1)  # (b, t)

    return _map_token_chunks(chunk_logprobs, logits, labels)


def exact_kl_from_logits(logits: torch.Tensor, ref_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(π(·|s) ‖ π_ref(·|s)) (B, T) at each position, summed over the whole vocabulary: π = softmax(logits
    (B, T, V) / temperature), π_ref given as log-probabilities (B, T, V). Differentiable in the logits."""

    def chunk_kl(logits_chunk, ref_chunk):
        logp = torch.log_softmax(_scaled_chunk(logits_chunk, temperature), dim=-1)  # (b, t, V)
        return (logp.exp() * (logp - ref_chunk.to(logp.dtype))).sum(dim=-1)  # (b, t)

    return _map_token_chunks(chunk_kl, logits, ref_logprobs)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (B, T) of softmax(logits (B, T, V) / temperature), -sum p log p = logsumexp(z) - sum p z,
    computed in chunks (TRL `entropy_from_logits`)."""

    def chunk_entropy(logits_chunk):
        logits_chunk = _scaled_chunk(logits_chunk, temperature)  # (b, t, V)
        probs = torch.softmax(logits_chunk, dim=-1)  # (b, t, V)
        return torch.logsumexp(logits_chunk, dim=-1) - (probs * logits_chunk).sum(dim=-1)  # (b, t)

    return _map_token_chunks(chunk_entropy, logits)


# ---------------------------------------------------------------------------------------------
# KL penalty and rewards
# ---------------------------------------------------------------------------------------------


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate (B, T) of KL(policy || ref) from sampled-token logprobs (B, T) and ref_logprobs (B, T)
    (LMH #L150 for k1; k3 from Schulman, "Approximating KL divergence")."""
    # k1 = log(p/q): unbiased, can be negative per token. k3 = (r - 1) - log r, r = q/p: unbiased and >= 0.
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs  # log r = log q/p, (B, T)
        return torch.expm1(log_ratio) - log_ratio  # (r - 1) - log r; expm1 is exact near r = 1
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


def per_token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      response_mask: torch.Tensor, kl_coef: float,
                      estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (B, T) = -kl_coef * KL on real tokens plus scores (B,) at each row's last real token, with the
    masked KL (B, T) (LMH #L150-L153; N details, "reward at the last token")."""
    # The only place the KL penalty enters PPO. lm-human adds the score at index -1 (fixed-length responses);
    # after truncation at the stop token the last real token is the one the reward model read.
    # Rows with an empty mask get no score.
    kl = zero_masked(kl_penalty(logprobs, ref_logprobs, estimator), response_mask)  # (B, T)
    rewards = -kl_coef * kl  # (B, T), lm-human's `non_score_reward`
    B, T = rewards.shape
    last = T - 1 - first_true_indices(response_mask.flip(-1).bool())  # (B,) last index with mask 1; -1 if none
    has_response = last >= 0  # (B,)
    rows = torch.arange(B, device=rewards.device)[has_response]
    rewards[rows, last[has_response]] += scores[has_response].to(rewards.dtype)
    return rewards, kl


# ---------------------------------------------------------------------------------------------
# Advantages and losses
# ---------------------------------------------------------------------------------------------


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
                gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages (B, T) and returns (B, T) from rewards (B, T) and values (B, T) over response_mask (B, T)
    (LMH #L327-L336; Schulman et al. 2016, arXiv:1506.02438)."""
    # Masked rewards/values are zeroed first, so with a prefix mask the value after the last real token is 0:
    # the episode ends there (bootstrap 0). No whitening here; the caller whitens advantages.
    rewards = zero_masked(rewards, response_mask)  # (B, T)
    values = zero_masked(values, response_mask)  # (B, T)
    T = rewards.shape[-1]
    lastgaelam = 0.0
    advantages_reversed = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0  # (B,)
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]  # (B,) TD error
        lastgaelam = delta + gamma * lam * lastgaelam  # (B,)
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) if T else torch.zeros_like(rewards)  # (B, T)
    returns = advantages + values  # (B, T)
    return zero_masked(advantages, response_mask), zero_masked(returns, response_mask)


def leave_one_out_advantages(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """Advantages (B,) of sequence returns (B,) against the mean return of the other answers to the same prompt:
    rows come in consecutive groups of `group_size` answers per prompt (RLOO; Kool et al. 2019, Ahmadian et al.
    2024, arXiv:2402.14740)."""
    # A_i = R_i - (sum_j R_j - R_i) / (k - 1) = k / (k - 1) * (R_i - mean_j R_j)
    if group_size < 2 or returns.shape[0] % group_size:
        raise ValueError(f"{returns.shape[0]} returns do not split into groups of {group_size} >= 2 answers")
    groups = returns.reshape(-1, group_size)  # (B / k, k)
    return (group_size / (group_size - 1) * (groups - groups.mean(dim=1, keepdim=True))).reshape(-1)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate loss (scalar), token mean over mask (B, T), from logprobs, old_logprobs and advantages
    (B, T), with detached stats clipfrac / approxkl / ratio (LMH #L350-L355 and #L360; TRL naming)."""
    log_ratio = zero_masked(logprobs - old_logprobs, mask)  # (B, T); masked junk cannot overflow exp
    advantages = zero_masked(advantages, mask)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_losses = -advantages * ratio  # (B, T)
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # (B, T)
    loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses2 > pg_losses).float(), mask),
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (scalar) 0.5 * mean(max((V - R)^2, (V_clip - R)^2)) over mask (B, T) from values,
    old_values and returns (B, T), with detached stats clipfrac / error (LMH #L343-L348)."""
    values, old_values, returns = (zero_masked(x, mask) for x in (values, old_values, returns))  # (B, T) each
    vpredclipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)  # (B, T)
    vf_losses1 = (values - returns) ** 2  # (B, T)
    vf_losses2 = (vpredclipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), mask),
            "error": masked_mean(vf_losses1, mask),
        }
    return loss, stats


# ---------------------------------------------------------------------------------------------
# KL coefficient controllers (LMH #L107-L124)
# ---------------------------------------------------------------------------------------------


class FixedKLController:
    """Constant KL coefficient `value`; `update` is a no-op (LMH #L107-L112)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Do nothing: the coefficient is fixed."""

    def state_dict(self) -> dict:
        """Plain dict with the current coefficient, for checkpoints."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restore the coefficient saved by `state_dict`."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019 proportional controller steering the observed KL towards `target` (LMH #L115-L124)."""

    # n_steps and horizon share a unit: lm-human passes episodes per update (the batch size) and a horizon in
    # episodes, so the coefficient changes by at most ~20% per `horizon` episodes.
    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Multiply `value` by 1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> dict:
        """Plain dict with the current coefficient, for checkpoints (target and horizon come from the config)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restore the coefficient saved by `state_dict`."""
        self.value = float(state["value"])


# ---------------------------------------------------------------------------------------------
# Response truncation and masks
# ---------------------------------------------------------------------------------------------


def first_true_indices(bools: torch.Tensor, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Index (B,) of the first True in each row of bools (B, T), T where a row has none (TRL `first_true_indices`)."""
    bools = bools.bool()
    row_len = bools.size(-1)
    zero_or_index = row_len * (~bools).to(dtype) + torch.arange(row_len, dtype=dtype, device=bools.device)  # (B, T)
    return torch.min(zero_or_index, dim=-1).values if row_len else zero_or_index.new_zeros(bools.shape[:-1])


def truncate_after_stop_token(responses: torch.Tensor, stop_token_ids: list[int],
                              pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace tokens of responses (B, T) strictly after the first stop token by pad_token_id; return them with
    the bool response mask (B, T) and whether each row has a stop token (B,) (N details, "truncate at EOS";
    TRL `truncate_response`)."""
    # The stop token itself is kept and real (mask True); a row without a stop token is left whole.
    stop_ids = torch.tensor(stop_token_ids, dtype=responses.dtype, device=responses.device)
    stop_index = first_true_indices(torch.isin(responses, stop_ids))  # (B,) T when no stop token
    positions = torch.arange(responses.shape[-1], device=responses.device)  # (T,)
    response_mask = positions.unsqueeze(0) <= stop_index.unsqueeze(-1)  # (B, T); <= keeps the stop token
    responses_truncated = torch.where(response_mask, responses, pad_token_id)  # (B, T)
    return responses_truncated, response_mask, stop_index < responses.shape[-1]


def response_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Number of real tokens (B,) per row of a response mask (B, T)."""
    return mask.bool().sum(dim=-1)
