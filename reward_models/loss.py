"""The reward model's Bradley-Terry loss and the pair metrics logged with it, as pure tensor functions.

The same expressions as TRL's `RewardTrainer.compute_loss` (trl 1.16, trl/trainer/reward_trainer.py),
so the grouped trainer of `reward_models/train.py` trains and logs exactly as TRL's does.
"""

from __future__ import annotations

import torch


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                       center_coefficient: float | None = None) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected - margin) averaged over pairs (InstructGPT, Ouyang et al. 2022,
    eq. 1; the margin as in Llama 2, Touvron et al. 2023), plus `center_coefficient` * mean((r_chosen +
    r_rejected)^2), which pulls scores towards 0 (Eisenstein et al. 2023); no centring when it is None.

    chosen, rejected: (P,) scores of each pair's chosen and rejected response; margin: (P,) or a float."""
    loss = -torch.nn.functional.logsigmoid(chosen - rejected - margin).mean()
    if center_coefficient is not None:
        loss = loss + center_coefficient * torch.mean((chosen + rejected) ** 2)
    return loss


@torch.no_grad()
def pair_metrics(rewards: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's logged reward metrics: the min / mean / max score of the batch, the fraction of pairs whose
    chosen response scores higher (`accuracy`) and the mean score gap (`margin`), as 0-dim tensors.

    rewards: (B,) every scored response; chosen, rejected: (P,) each pair's scores."""
    return {"min_reward": rewards.min(), "mean_reward": rewards.mean(), "max_reward": rewards.max(),
            "accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean()}
