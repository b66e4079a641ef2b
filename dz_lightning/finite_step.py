"""Optimizer steps that leave nothing non-finite behind: check a step, and undo it exactly when it did.

A finite gradient estimate can still make the weights or the optimizer state overflow (finite but huge losses, a
large learning rate, momentum adding up). :class:`StepUndo` keeps the parameters and the optimizer state from before
a step, checks them after it with one fused max-abs reduction (one host sync), and restores them on request.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor
from torch.nn.utils import get_total_norm

__all__ = ["NonFiniteStepError", "StepUndo"]


class NonFiniteStepError(FloatingPointError):
    """An optimizer step made a parameter or an optimizer state tensor non-finite (the step has been undone)."""


class StepUndo:
    """The parameters and optimizer state before a step: enough to check the step and undo it exactly.

    Args:
        optimizers: the (unwrapped) torch optimizers about to step; their parameters and state are copied.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        self.params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
        with torch.no_grad():
            self.saved_params = [p.detach().clone() for p in self.params]
            self.saved_state = [{p: {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v)
                                     for k, v in state.items()} for p, state in opt.state.items()}
                                for opt in optimizers]

    def _tensors(self) -> list[Tensor]:
        state = [v for opt in self.optimizers for s in opt.state.values() for v in s.values()
                 if isinstance(v, Tensor) and v.is_floating_point()]
        return self.params + state

    def nonfinite(self) -> list[Tensor]:
        """The non-finite tensors after the step (empty when all are finite): one fused max-abs, one host sync."""
        tensors = self._tensors()
        with torch.no_grad():
            if not tensors or bool(torch.isfinite(get_total_norm(tensors, norm_type=float("inf")))):
                return []
            return [t for t in tensors if not bool(torch.isfinite(t).all())]  # only on failure: name them

    def restore(self) -> None:
        """Put the parameters and the optimizer state back as they were before the step."""
        with torch.no_grad():
            for p, saved in zip(self.params, self.saved_params, strict=True):
                p.copy_(saved)
        for opt, saved in zip(self.optimizers, self.saved_state, strict=True):
            opt.state.clear()
            opt.state.update(saved)
