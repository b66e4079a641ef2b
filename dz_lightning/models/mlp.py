"""A small multilayer perceptron, staged as an ``nn.Sequential`` for feature reuse."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

__all__ = ["MLP"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Sequential):
    """Flatten, then ``Linear -> activation`` blocks, then a linear head.

    Being an ``nn.Sequential``, its children are its stages: a perturbation of a layer restarts the forward
    at that layer. Input ``(B, *)`` with ``in_features`` elements per example; output ``(B, num_classes)``.

    Args:
        in_features: elements per example after flattening (64 for 8x8 digits).
        hidden: widths of the hidden layers.
        num_classes: output width.
        activation: nonlinearity between layers.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (32,),
        num_classes: int = 10,
        activation: Literal["relu", "tanh", "gelu"] = "relu",
    ) -> None:
        if in_features < 1 or num_classes < 1 or any(h < 1 for h in hidden):
            raise ValueError(
                f"Expected positive layer sizes, but got in_features={in_features}, hidden={list(hidden)}, "
                f"num_classes={num_classes}."
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Expected `activation` to be one of {sorted(_ACTIVATIONS)}, but got {activation!r}.")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
