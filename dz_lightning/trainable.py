"""What the bundled callbacks need from a LightningModule: the zeroth-order training protocol `ZOTrainable`.

:class:`~dz_lightning.ZOModule` follows it; so can any user module that trains by ZO its own way.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from dz_lightning.oracle_base import Oracle

__all__ = ["ZOTrainable"]


@runtime_checkable
class ZOTrainable(Protocol):
    """A module whose parameters are estimated by ZO (checked with ``isinstance(module, ZOTrainable)``).

    Attributes:
        zo_masks: name (a key of :meth:`zo_parameters`) -> bool mask of the coordinates the estimator perturbs;
            ``None`` means dense. Callbacks such as ZO-GraSP set it; the module's estimator reads it.
    """

    zo_masks: dict[str, Tensor] | None

    def zo_parameters(self) -> dict[str, Tensor]:
        """The parameters the estimator perturbs: name -> tensor (the names masks and oracles use)."""
        ...

    def make_oracle(self, batch: Any) -> Oracle:
        """The loss oracle of ``batch`` over :meth:`zo_parameters` (names as there)."""
        ...
