"""The unsteady wake flow behind a cylinder (Karman vortex street) in PhiFlow, and its cached reference data.

As in Solver-in-the-Loop's karman-2d: a domain twice as long as wide (100 x 200), a cylinder of radius 10 near
(50, 50), inflow at one end, and a viscosity ``20 / re`` (``re``: the cylinder's Reynolds number) that varies per
simulation. The *source* solver runs on a
coarse grid; the *reference* solver runs at ``factor`` times the resolution and is down-sampled (average pooling)
onto the coarse grid. States are torch tensors ``(N, 2, X, Y)`` of cell-centred velocity (u, v); a batch of N
simulations runs as one PhiFlow batch dimension.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CYLINDER_DIAMETER", "KarmanSolver", "generate_reference", "initial_state", "load_or_generate"]

CYLINDER_DIAMETER = 20.0
CYLINDER_X = 52.0  # 2 off the centre line: a symmetric set-up would need noise to start shedding


class KarmanSolver:
    """One time step of the wake flow at a given grid, on PhiFlow's torch backend (staggered velocity inside).

    The domain is 100 wide (x) and 200 long (y); the flow enters at y = 0 and passes a cylinder of radius 10 at
    (50, 50). States cross the interface as cell-centred velocity ``(N, 2, X, Y)`` with ``Y = 2 X``.

    Args:
        resolution: ``(X, Y)`` cells, ``Y = 2 X``.
        dt: time step.
        differentiable: ``False`` (the default) runs the jit-compiled step under ``no_grad`` on detached inputs: a
            black box to the trainer. ``True`` runs it eagerly with autograd (FO-SOL only).
        cg_tolerance: relative/absolute tolerance of the forward pressure solve; the adjoint solve of the
            differentiable step uses it as a relative tolerance only (independent of the loss's scale).
    """

    def __init__(self, resolution: tuple[int, int] = (16, 32), dt: float = 1.0, differentiable: bool = False,
                 cg_tolerance: float = 1e-4) -> None:
        from phi.torch.flow import ZERO_GRADIENT, Box, Obstacle, Sphere, StaggeredGrid, jit_compile

        x, y = resolution
        if x < 4 or y != 2 * x:
            raise ValueError(f"Expected a resolution (X, Y) with Y = 2 X >= 8 (the domain is 100 x 200), but got "
                             f"{resolution}.")
        self.resolution, self.dt, self.differentiable = (x, y), dt, differentiable
        self.bounds = Box(x=100, y=200)
        self.obstacle = Obstacle(Sphere(x=CYLINDER_X, y=50, radius=10))
        # finite boxes past the boundary (infinite boxes sample to all ones in PhiFlow 3.4)
        self.inflow = StaggeredGrid(Box(x=(-10, 110), y=(-10, 200 / y * 2)), ZERO_GRADIENT, bounds=self.bounds,
                                    x=x, y=y)
        self.template = StaggeredGrid(0, ZERO_GRADIENT, bounds=self.bounds, x=x, y=y)
        self.tolerance = cg_tolerance
        self._jit = jit_compile(self._step)

    def _step(self, u: Tensor, nu: Tensor) -> Tensor:
        from phi.torch.flow import (
            ZERO_GRADIENT,
            CenteredGrid,
            Solve,
            advect,
            batch,
            channel,
            diffuse,
            field,
            fluid,
            math,
            spatial,
            vec,
        )

        centered = CenteredGrid(math.tensor(u, batch("b"), channel(vector="x,y"), spatial("x,y")), ZERO_GRADIENT,
                                bounds=self.bounds, resolution=self.template.resolution)
        v = field.resample(centered, to=self.template)
        v = diffuse.explicit(v, math.tensor(nu, batch("b")), self.dt)
        v = v * (1 - self.inflow) + self.inflow * vec(x=0, y=1)
        v = advect.semi_lagrangian(v, v, self.dt)
        # The adjoint (backward) pressure solve gets a purely relative tolerance: by default PhiFlow copies the
        # forward Solve, whose absolute tolerance would stop the adjoint solve at once when the loss (hence its
        # right-hand side) is small, as it is for a trained corrector; FO gradients would then be inexact.
        adjoint = Solve("CG", self.tolerance, 0.0, max_iterations=2000)
        v, _ = fluid.make_incompressible(v, [self.obstacle], Solve("CG", self.tolerance, self.tolerance,
                                                                   max_iterations=2000, gradient_solve=adjoint))
        return v.at_centers().values.native("b,vector,x,y")

    def __call__(self, u: Tensor, re: Tensor) -> Tensor:
        """Advance states ``u`` ``(N, 2, X, Y)`` with Reynolds numbers ``re`` ``(N,)`` by one step."""
        if u.dim() != 4 or tuple(u.shape[1:]) != (2, *self.resolution):
            raise ValueError(f"Expected states of shape (N, 2, {self.resolution[0]}, {self.resolution[1]}), but got "
                             f"{tuple(u.shape)}.")
        nu = (CYLINDER_DIAMETER / re).to(u)  # Re = U D / nu with inflow speed U = 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # phiml's tracing and sparse-matrix notices
            if self.differentiable:
                return self._step(u, nu)
            with torch.no_grad():
                return self._jit(u.detach(), nu.detach())


def initial_state(n: int, resolution: tuple[int, int]) -> Tensor:
    """Fluid at rest; the inflow starts it (the cylinder sits slightly off-centre, which starts the shedding)."""
    return torch.zeros(n, 2, *resolution)


def generate_reference(train_re: list[float], test_re: list[float], resolution: tuple[int, int], factor: int,
                       warmup: int, steps: int) -> dict[str, Tensor]:
    """Reference trajectories at ``factor`` x the resolution, down-sampled onto ``resolution``.

    Returns:
        ``{"train": (S_train, steps + 1, 2, X, Y), "test": (S_test, steps + 1, 2, X, Y), "train_re", "test_re"}``.
    """
    fine = KarmanSolver((resolution[0] * factor, resolution[1] * factor))
    re = torch.tensor(list(train_re) + list(test_re), dtype=torch.float32)
    u = initial_state(len(re), fine.resolution)
    frames = []
    for t in range(warmup + steps + 1):
        if t >= warmup:
            frames.append(F.avg_pool2d(u, factor))
        if t < warmup + steps:
            u = fine(u, re)
    traj = torch.stack(frames, 1)
    if not torch.isfinite(traj).all():
        raise RuntimeError("The reference simulation diverged (NaN/inf); use a smaller dt or larger viscosity.")
    n = len(train_re)
    return {"train": traj[:n], "test": traj[n:], "train_re": re[:n], "test_re": re[n:]}


def load_or_generate(cache_dir: str, train_re: list[float], test_re: list[float], resolution: tuple[int, int],
                     factor: int = 4, warmup: int = 250, steps: int = 300) -> dict[str, Tensor]:
    """The reference data, computed once and cached in ``cache_dir/<hash>/`` with a ``meta.json``."""
    meta = {"train_re": list(map(float, train_re)), "test_re": list(map(float, test_re)),
            "resolution": list(resolution), "factor": factor, "warmup": warmup, "steps": steps, "version": 2,
            "domain": [100, 200], "cylinder": [CYLINDER_X, 50, 10]}
    key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / f"karman_{key}"
    if (folder / "data.pt").exists() and (folder / "meta.json").exists():
        return torch.load(folder / "data.pt", weights_only=True)
    data = generate_reference(train_re, test_re, resolution, factor, warmup, steps)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "data.pt.tmp"
    torch.save(data, tmp)
    tmp.replace(folder / "data.pt")  # whole or not at all
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return data
