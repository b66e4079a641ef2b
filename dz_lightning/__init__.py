"""dz_lightning: DeepZero zeroth-order deep learning for PyTorch Lightning.

The engine: loss oracles, gradient estimators, feature reuse, sparsity and the ``ZOModule`` base class.
It knows nothing about any task; ``tasks`` and ``callbacks`` build on it.
"""

from dz_lightning.distributed import RankFailedError
from dz_lightning.estimators import Estimate, cge, rge
from dz_lightning.module import NonFiniteStepError, ZOModule
from dz_lightning.oracle import FunctionOracle, ModuleOracle, NonFiniteLossError, Oracle
from dz_lightning.sampling import SeededRandomSampler

__version__ = "0.1.0"

__all__ = [
    "Estimate",
    "FunctionOracle",
    "ModuleOracle",
    "NonFiniteLossError",
    "NonFiniteStepError",
    "Oracle",
    "RankFailedError",
    "SeededRandomSampler",
    "ZOModule",
    "cge",
    "rge",
]
