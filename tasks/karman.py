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
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from tqdm.auto import tqdm

from dz_lightning.checkpointing import atomic_write, zip_damage

__all__ = ["CYLINDER_DIAMETER", "KarmanSolver", "generate_reference", "initial_state", "load_or_generate"]

CYLINDER_DIAMETER = 20.0
CYLINDER_X = 52.0  # 2 off the centre line: a symmetric set-up would need noise to start shedding

# Notices that PhiFlow 3 / phiml raise on every solver (and every backward through it) and that say nothing about the
# user's run: (category, message regex, module regex of the code that warns). Silenced by these filters only.
_PHIML_NOTICES: tuple[tuple[type[Warning], str, str], ...] = (
    (DeprecationWarning, r".*TorchCustomFunction'> should not be instantiated", r"phiml\."),  # phiml's autograd fn
    (UserWarning, r"Sparse CSR tensor support is in beta state", r"phiml\."),  # torch, on phiml's pressure matrix
    (UserWarning, r"Sparse invariant checks are implicitly disabled", r"phiml\."),
)
# phiml's jit traces the step (and its linear solves) once per input shape with torch.jit, which torch 2.x deprecates;
# attributed to torch's own files, so these are silenced only around a call that traces (the first per shape).
_TRACING_NOTICE = r"`torch\.jit\.(trace|script|trace_method)` is deprecated"


def _silence_phiml_notices() -> None:
    """Install the warning filters for :data:`_PHIML_NOTICES` (idempotent: ``warnings.filterwarnings`` de-duplicates).

    Every other warning, the user's own included, stays visible.
    """
    for category, message, module in _PHIML_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


# (solver class, resolution, dt, cg_tolerance) -> (jit-compiled step, traced input signatures); see __init__
_COMPILED: dict[tuple, tuple[Any, set[tuple]]] = {}


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
        # One compiled step per configuration and process, shared by every solver built with it: torch.jit keeps
        # each trace alive for the whole process, so a step compiled per instance grew the memory by about 10 MB
        # with every solver (long studies and test suites build hundreds). The shared step is the first instance's.
        key = (type(self), self.resolution, float(dt), float(cg_tolerance))
        if key not in _COMPILED:
            _COMPILED[key] = (jit_compile(self._step), set())  # the step, and the input signatures it has traced
        self._jit, self._traced = _COMPILED[key]
        _silence_phiml_notices()

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
        if self.differentiable:
            return self._step(u, nu)
        signature = (tuple(u.shape), u.dtype, u.device)
        with torch.no_grad():
            if signature in self._traced:
                return self._jit(u.detach(), nu.detach())
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_TRACING_NOTICE, category=FutureWarning)
                out = self._jit(u.detach(), nu.detach())
            self._traced.add(signature)
            return out


def initial_state(n: int, resolution: tuple[int, int]) -> Tensor:
    """Fluid at rest; the inflow starts it (the cylinder sits slightly off-centre, which starts the shedding)."""
    return torch.zeros(n, 2, *resolution)


def generate_reference(train_re: list[float], test_re: list[float], resolution: tuple[int, int], factor: int,
                       warmup: int, steps: int, progress: bool = True) -> dict[str, Tensor]:
    """Reference trajectories at ``factor`` x the resolution, down-sampled onto ``resolution``.

    ``progress`` shows a progress bar over the solver steps (minutes on a CPU at the default sizes).

    Returns:
        ``{"train": (S_train, steps + 1, 2, X, Y), "test": (S_test, steps + 1, 2, X, Y), "train_re", "test_re"}``.
    """
    fine = KarmanSolver((resolution[0] * factor, resolution[1] * factor))
    re = torch.tensor(list(train_re) + list(test_re), dtype=torch.float32)
    u = initial_state(len(re), fine.resolution)
    frames = []
    bar = tqdm(total=warmup + steps, desc=f"Karman reference ({len(re)} simulations, {fine.resolution[0]} x "
               f"{fine.resolution[1]})", unit="step", disable=not progress, dynamic_ncols=True)
    for t in range(warmup + steps + 1):
        if t >= warmup:
            frames.append(F.avg_pool2d(u, factor))
        if t < warmup + steps:
            u = fine(u, re)
            bar.update()
    bar.close()
    traj = torch.stack(frames, 1)
    if not torch.isfinite(traj).all():
        raise RuntimeError("The reference simulation diverged (NaN/inf); use a smaller dt or larger viscosity.")
    n = len(train_re)
    return {"train": traj[:n], "test": traj[n:], "train_re": re[:n], "test_re": re[n:]}


def load_or_generate(cache_dir: str, train_re: list[float], test_re: list[float], resolution: tuple[int, int],
                     factor: int = 4, warmup: int = 250, steps: int = 300) -> dict[str, Tensor]:
    """The reference data, computed once and cached in ``cache_dir/<hash>/`` with a ``meta.json``.

    A cached ``data.pt`` is used only when it loads whole and matches its ``meta.json`` (the Reynolds numbers, the
    resolution and the number of steps) with finite values; otherwise it is rebuilt, with a warning that says why.
    Files are written under a name unique to the writer and renamed into place, so concurrent writers (DDP ranks,
    two runs) never share a temporary file and a reader sees a whole file or none.
    """
    meta = {"train_re": list(map(float, train_re)), "test_re": list(map(float, test_re)),
            "resolution": list(resolution), "factor": factor, "warmup": warmup, "steps": steps, "version": 2,
            "domain": [100, 200], "cylinder": [CYLINDER_X, 50, 10]}
    key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    check_cache_dir(cache_dir)  # before minutes of simulation, not after
    folder = Path(cache_dir) / f"karman_{key}"
    if (folder / "data.pt").exists() and (folder / "meta.json").exists():
        data, problem = _load_cached(folder, meta)
        if data is not None:
            return data
        warnings.warn(f"Rebuilding the Karman cache {str(folder / 'data.pt')!r}: {problem}.", RuntimeWarning,
                      stacklevel=2)
    rank_zero_info(f"Generating the Karman reference data once: {len(train_re) + len(test_re)} simulations of "
                   f"{warmup} + {steps} steps at {factor} x {tuple(resolution)}, cached in {folder} (later runs with "
                   "the same settings load it).")
    data = generate_reference(train_re, test_re, resolution, factor, warmup, steps)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "data.pt", lambda path: torch.save(data, path))
    atomic_write(folder / "meta.json", lambda path: path.write_text(json.dumps(meta, indent=2)))
    return data


def check_cache_dir(cache_dir: str | Path, argument: str = "cache_dir") -> None:
    """Raise ``ValueError`` when ``cache_dir`` cannot become a folder: it, or the nearest existing folder above it,
    is a file."""
    path = Path(cache_dir)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise ValueError(f"Expected argument `{argument}` to be a folder (or a path where one can be made), "
                                 f"but {str(candidate)!r} is a file{'' if candidate == path else ' above it'}: "
                                 f"{str(cache_dir)!r}.")
            return


def _load_cached(folder: Path, meta: dict) -> tuple[dict[str, Tensor] | None, str]:
    """``(data, "")`` when the cache is whole and matches ``meta``, else ``(None, what is wrong)``."""
    try:
        stored = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as err:
        return None, f"its meta.json cannot be read ({err})"
    if stored != meta:
        return None, f"its meta.json {stored} does not describe this data set {meta}"
    damage = zip_damage(folder / "data.pt")  # the zip CRCs: flipped bits that torch.load would read as values
    if damage is not None:
        return None, f"the file is corrupted ({damage})"
    try:
        data = torch.load(folder / "data.pt", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        return None, f"the file is truncated or corrupted ({str(err).splitlines()[0] if str(err) else type(err)})"
    if not isinstance(data, dict) or not {"train", "test", "train_re", "test_re"} <= set(data):
        return None, "it does not hold the train and test trajectories"
    x, y = meta["resolution"]
    for split in ("train", "test"):
        want = (len(meta[f"{split}_re"]), meta["steps"] + 1, 2, x, y)
        got = data[split]
        if not isinstance(got, Tensor) or tuple(got.shape) != want:
            return None, f"its {split} trajectories have shape {tuple(getattr(got, 'shape', ()))}, expected {want}"
        if not bool(torch.isfinite(got).all()):
            return None, f"its {split} trajectories hold NaN or infinite values"
        re, want_re = data[f"{split}_re"], torch.tensor(meta[f"{split}_re"], dtype=torch.float64)
        if not isinstance(re, Tensor) or re.shape != want_re.shape or not torch.allclose(re.double(), want_re):
            return None, f"its {split} Reynolds numbers differ from {want_re.tolist()}"
    return data, ""
