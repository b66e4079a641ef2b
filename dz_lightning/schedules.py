"""Learning-rate schedules used by the paper's recipes."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosine"]


class WarmupCosine(LambdaLR):
    """Linear warm-up for ``warmup_steps``, then cosine decay to ``min_factor`` times the base LR at ``total_steps``.

    Step it every optimizer step (``scheduler_interval: step``). The paper's CIFAR recipe: 3 warm-up epochs of
    a 50-epoch run.

    Args:
        optimizer: the optimizer.
        warmup_steps: steps of linear warm-up from ``1 / warmup_steps`` of the base LR (0 disables warm-up).
        total_steps: length of the whole schedule in steps (> ``warmup_steps``).
        min_factor: final LR as a fraction of the base LR.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int = 1000,
                 min_factor: float = 0.0) -> None:
        if warmup_steps < 0 or total_steps <= warmup_steps:
            raise ValueError(f"Expected 0 <= warmup_steps < total_steps, but got warmup_steps={warmup_steps}, "
                             f"total_steps={total_steps}.")
        if not 0 <= min_factor <= 1:
            raise ValueError(f"Expected argument `min_factor` in [0, 1], but got {min_factor}.")
        self.warmup_steps, self.total_steps, self.min_factor = warmup_steps, total_steps, min_factor
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
