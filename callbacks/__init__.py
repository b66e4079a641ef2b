"""Lightning callbacks for zeroth-order training; they work in any Lightning project."""

from callbacks.fidelity import GradientFidelity
from callbacks.zo_grasp import ZOGraSP

__all__ = ["GradientFidelity", "ZOGraSP"]
