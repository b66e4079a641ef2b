"""Networks that expose their stages for feature reuse."""

from dz_lightning.models.mlp import MLP

__all__ = ["MLP"]
