"""dz_lightning: DeepZero zeroth-order deep learning for PyTorch Lightning.

The engine: loss oracles, gradient estimators, feature reuse, sparsity and the ``ZOModule`` base class.
It knows nothing about any task; ``tasks`` and ``callbacks`` build on it.

The names below are imported on first use (``dz.cge``, ``from dz_lightning import ZOModule``), so that
``dz --help`` and ``dz --version`` start without importing torch and Lightning.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Estimate": "dz_lightning.estimators",
    "FunctionOracle": "dz_lightning.oracle",
    "ModuleOracle": "dz_lightning.oracle",
    "NonFiniteLossError": "dz_lightning.oracle_base",
    "NonFiniteStepError": "dz_lightning.finite_step",
    "Oracle": "dz_lightning.oracle_base",
    "RankFailedError": "dz_lightning.distributed",
    "ResumableDataLoader": "dz_lightning.sampling",
    "SeededRandomSampler": "dz_lightning.sampling",
    "ZOModule": "dz_lightning.module",
    "ZOTrainable": "dz_lightning.trainable",
    "cge": "dz_lightning.estimators",
    "rge": "dz_lightning.estimators",
}

__all__ = sorted(_EXPORTS)  # one list: tests/test_packaging.py ties it to the TYPE_CHECKING imports below

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names resolve lazily (__getattr__)
    from dz_lightning.distributed import RankFailedError  # noqa: F401
    from dz_lightning.estimators import Estimate, cge, rge  # noqa: F401
    from dz_lightning.finite_step import NonFiniteStepError  # noqa: F401
    from dz_lightning.module import ZOModule  # noqa: F401
    from dz_lightning.oracle import FunctionOracle, ModuleOracle  # noqa: F401
    from dz_lightning.oracle_base import NonFiniteLossError, Oracle  # noqa: F401
    from dz_lightning.sampling import ResumableDataLoader, SeededRandomSampler  # noqa: F401
    from dz_lightning.trainable import ZOTrainable  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
