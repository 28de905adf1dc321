"""Statistics across processes: what one process needs from the others' batches.

With one process every function here is the plain local computation (no collective is issued).
"""

from __future__ import annotations

from typing import Callable

import torch


def sum_over_processes(accelerator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A `reduce=` hook for `ppo_core` (tensor -> its sum over every process), or None with one process."""
    if accelerator.num_processes == 1:
        return None
    return lambda t: accelerator.reduce(t, reduction="sum")


def global_mean(value: torch.Tensor | float, accelerator) -> float:
    """The mean of a per-process scalar over every process."""
    t = torch.as_tensor(value, dtype=torch.float32, device=accelerator.device)
    return (accelerator.reduce(t, reduction="mean") if accelerator.num_processes > 1 else t).item()


def gather_over_processes(accelerator):
    """`accelerator.gather` when there are several processes (for checks that must agree), else None."""
    return accelerator.gather if accelerator.num_processes > 1 else None
