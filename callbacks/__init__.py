"""Lightning callbacks for zeroth-order training; they work in any Lightning project."""

from dz_lightning.callbacks.fidelity import GradientFidelity
from dz_lightning.callbacks.predictions import PredictionWriter
from dz_lightning.callbacks.zo_grasp import ZOGraSP

__all__ = ["GradientFidelity", "PredictionWriter", "ZOGraSP"]
