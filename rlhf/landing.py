"""Landing PPO's policy at a chosen KL (`ppo.land_kl`): after training, the final policy is moved along the
straight line through the reference's weights and its own, W_ref + α (W_policy − W_ref), to the α at which
its KL to the reference is `ppo.land_kl` nats.

The KL is the exact one the eval stage reports (`rlhf.evaluate.answer_logprobs`: the full-vocabulary KL at
each response position, summed over the answer), measured on the policy's own answers to the first
`LAND_PROMPTS` training prompts, at PPO's temperature and answer length; every measurement uses the same
random stream. Along that line the KL grows close to α² (README, the study: 4.09 / 5.08 / 6.22 / 7.46 nats at
α = 0.9 / 1 / 1.1 / 1.2, where α² predicts 4.11 / 6.15 / 7.32). The first measurement, at α = 1, sets
α = sqrt(land_kl / KL(1)); the second, at that α, gives the growth's exponent p between the two (KL ∝ α^p) and
the α at which the policy is saved, α · (land_kl / KL(α))^(1/p). α is capped at `LAND_MAX_SCALE`: past it the
same study's gold falls back (α = 1.3).

Held-out prompts are never read: where the policy lands is chosen on training prompts alone. Outputs: the
landed policy replaces `<ppo>/policy/`, and `<ppo>/landing.json` keeps the measurements and the α chosen.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf.checkpoints import save_policy
from rlhf.evaluate import answer_logprobs
from rlhf.generation import left_pad, sample, stop_token_ids
from rlhf.models import cast_parameters, load_causal_lm
from rlhf.ppo_models import Sequences, rounding_generator
from rlhf.utils import atomic_write_json

LAND_PROMPTS = 256
LAND_STEPS = 2
LAND_MAX_SCALE = 1.25
LAND_SEED_OFFSET = 2_000_003  # the landing's sampling stream, apart from the rollouts' and the eval's
LAND_BATCH = 32


def measure_kl(policy, reference, prompt_ids: list[list[int]], tokenizer, pc, device, seed: int) -> tuple[float, float]:
    """Mean and standard error of the exact sequence KL of `policy` to `reference` over its answers to
    `prompt_ids` (batch from prompt i on sampled with seed + i)."""
    stop_ids = stop_token_ids(tokenizer, pc.stop_tokens)
    kls: list[float] = []
    for start in range(0, len(prompt_ids), LAND_BATCH):
        ids, mask = left_pad(prompt_ids[start:start + LAND_BATCH], tokenizer.pad_token_id, device)
        torch.manual_seed(seed + start)
        responses = sample(policy, ids, mask, pc.max_new_tokens, pc.temperature, stop_ids, tokenizer.pad_token_id)
        seqs = Sequences.join(ids, mask, responses.ids, responses.mask)
        kls += answer_logprobs(policy, reference, seqs, responses, pc.temperature, LAND_BATCH)[2].sum(1).tolist()
    mean = sum(kls) / len(kls)
    se = math.sqrt(sum((k - mean) ** 2 for k in kls) / max(len(kls) - 1, 1) / len(kls))
    return mean, se


def growth_exponent(steps: list[dict[str, float]]) -> float:
    """p of KL ∝ α^p along the line: 2 from one measurement, else the slope in log-log through the last two
    (in [1, 3]; 2 where they are too close to tell)."""
    if len(steps) < 2:
        return 2.0
    (a0, k0), (a1, k1) = ((s["alpha"], s["kl"]) for s in steps[-2:])
    if min(k0, k1) <= 0 or abs(math.log(a1 / a0)) < 1e-3:
        return 2.0
    return min(3.0, max(1.0, math.log(k1 / k0) / math.log(a1 / a0)))


def next_scale(alpha: float, kl: float, target: float, exponent: float = 2.0) -> float:
    """The α whose KL is `target`, from KL(α) = `kl`, with KL growing as α^`exponent` along the line; at most
    `LAND_MAX_SCALE`."""
    if kl <= 0:  # no measurable move away from the reference: go as far as allowed
        return LAND_MAX_SCALE
    return min(LAND_MAX_SCALE, alpha * (target / kl) ** (1 / exponent))


def land_policy(cfg, policy_dir: Path, prompt_ids: list[list[int]], tokenizer, device, dtype: torch.dtype,
                seed: int) -> dict[str, Any]:
    """Move the saved policy in `policy_dir` to `cfg.ppo.land_kl` nats from the reference (module docstring),
    save it there and write `landing.json` beside it; returns what that file holds."""
    pc, prompts = cfg.ppo, prompt_ids[:LAND_PROMPTS]
    trained = load_causal_lm(str(policy_dir), torch.float32, cfg.model.trust_remote_code)
    start = dtype if pc.lora else torch.float32  # the weights PPO started from (`fresh_policy`)
    base = {name: p.detach().float()
            for name, p in load_causal_lm(cfg.model.policy, start, cfg.model.trust_remote_code).named_parameters()}
    weights = {name: p.detach().clone() for name, p in trained.named_parameters()}
    reference = load_causal_lm(cfg.model.policy, dtype, cfg.model.trust_remote_code).to(device).eval()

    def at(alpha: float):
        trained.cpu().float()  # in place: written anew below, then narrowed to `dtype` with a CPU generator
        with torch.no_grad():
            for name, p in trained.named_parameters():
                p.copy_(torch.lerp(base[name], weights[name], alpha))  # W_ref + α (W_policy − W_ref)
        return cast_parameters(trained, dtype, rounding_generator(cfg.run.seed, "cpu"))

    alpha, steps = 1.0, []
    for _ in tqdm(range(LAND_STEPS), desc=f"landing at {pc.land_kl:g} nats", unit="step"):
        policy = at(alpha).to(device).eval()
        kl, se = measure_kl(policy, reference, prompts, tokenizer, pc, device, seed + LAND_SEED_OFFSET)
        steps.append({"alpha": alpha, "kl": kl, "kl_se": se})
        exponent = growth_exponent(steps)
        alpha = next_scale(alpha, kl, pc.land_kl, exponent)
    policy = at(alpha).cpu()
    save_policy(policy, tokenizer, policy_dir, merge=False, generator=rounding_generator(cfg.run.seed, "cpu"))
    last = steps[-1]
    landing = {"target_kl": pc.land_kl, "prompts": len(prompts), "steps": steps, "alpha": alpha,
               "growth_exponent": exponent, "kl_expected": last["kl"] * (alpha / last["alpha"]) ** exponent,
               "capped": alpha == LAND_MAX_SCALE}
    atomic_write_json(policy_dir.parent / "landing.json", landing)
    return landing
