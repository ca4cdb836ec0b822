"""Learning-rate schedule: linear warmup then cosine decay, stepped once per optimizer step."""

from __future__ import annotations

import math

import torch


def warmup_cosine_factor(
    step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.0
) -> float:
    """Multiplier of the base lr at `step` (0-based): (step+1)/warmup during warmup, then a
    cosine from 1 down to `min_factor` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_factor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR of `warmup_cosine_factor`; its state_dict makes resume exact."""
    if total_steps < 1 or warmup_steps < 0 or not 0 <= min_factor <= 1:
        raise ValueError(
            f"need total_steps >= 1, warmup_steps >= 0, 0 <= min_factor <= 1; got "
            f"{total_steps}, {warmup_steps}, {min_factor}"
        )
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_factor)
    )
